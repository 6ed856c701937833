"""The stage protocol (`edgexfer.runfolder.stage`): the lock, provenance, report sections and done mark around each
stage's own work; a stage that raises leaves no done mark; a changed setting makes its stage and the later ones
stale. Fast tier: the tiny random backbone, in this process."""
from __future__ import annotations

import json

import pytest



def report(run) -> dict:
    return json.loads((run / "report.json").read_text())


def test_a_stage_that_raises_leaves_no_done_mark(fast_run_copy):
    from edgexfer.runfolder import LOCK_FILE, RunFolder, stage

    seen = {}

    @stage("bench")
    def fails_before_writing(st):
        seen["locked"] = (st.run.path / LOCK_FILE).is_file()
        seen["cfg"] = st.cfg.bench.iters
        raise RuntimeError("no room")

    @stage("bench")
    def fails_while_writing(st):
        st.begin()  # from here it replaces what it recorded
        raise RuntimeError("killed")

    @stage("bench")
    def works(st):
        st.begin()
        return "ok"

    run = RunFolder(fast_run_copy)
    cfg = run.config()
    with pytest.raises(RuntimeError, match="no room"):
        fails_before_writing(fast_run_copy)  # before `begin`: the folder is as it was
    assert seen == {"locked": True, "cfg": cfg.bench.iters}
    assert run.why_stale("bench", cfg) is None and "bench" in report(fast_run_copy)
    assert not (fast_run_copy / LOCK_FILE).exists()

    with pytest.raises(RuntimeError, match="killed"):
        fails_while_writing(fast_run_copy)
    rep = report(fast_run_copy)
    assert "bench" not in rep["stages"] and run.why_stale("bench", cfg) == "not done"
    assert set(rep["stages"]) == {"finetune", "export", "quantize", "evaluate"}  # the earlier ones stand

    assert works(fast_run_copy, cfg) == "ok"
    rec = report(fast_run_copy)["stages"]["bench"]
    assert rec["done"] and rec["settings"] == run.provenance("bench", cfg)["settings"]
    assert run.why_stale("bench", cfg) is None


def test_a_changed_setting_makes_its_stage_and_the_later_ones_run_again(fast_run_copy):
    from edgexfer import pipeline
    from edgexfer.runfolder import RunFolder

    run = RunFolder(fast_run_copy)
    cfg = run.config()
    cfg.quantize.guard_images += 1
    assert run.why_stale("quantize", cfg) == "its settings changed since (quantize.guard_images)"
    assert run.why_stale("export", cfg) is None and run.why_stale("evaluate", cfg) is None
    seen = []
    pipeline.run(fast_run_copy, cfg, on_stage=lambda s, what: seen.append((s, what)))
    status = {s: what for s, what in seen if what != "end"}
    assert status == {"finetune": "done already (resumed)", "export": "done already (resumed)",
                      "quantize": "runs again: its settings changed since (quantize.guard_images)",
                      "evaluate": "start", "bench": "start"}  # quantize cleared the later records: they ran afresh
    assert all(run.why_stale(s, cfg) is None for s in pipeline.STAGES)
    written = json.loads((fast_run_copy / "config.json").read_text())
    assert written["quantize"]["guard_images"] == cfg.quantize.guard_images


def test_workspace_caches_through_its_api(fast_run):
    from edgexfer.errors import EdgexferError
    from edgexfer.runfolder import RunFolder, Workspace

    run = RunFolder(fast_run)
    cfg = run.config()
    ws = Workspace(run, cfg)
    calls = []
    assert ws.cached(("k",), lambda: calls.append(1) or len(calls)) == 1
    assert ws.cached(("k",), lambda: calls.append(1) or len(calls)) == 1 and calls == [1]
    assert ws.cached(("k",), lambda: calls.append(1) or len(calls), enough=lambda v: v >= 2) == 2
    x, _ = ws.tensors("val")
    assert ws.tensors("val")[0] is x and len(ws.tensors("val", limit=1)[0]) == 1
    cfg.model.image_size = 24  # another input size: tensors of their own, never the 32 px ones
    assert ws.tensors("val")[0].shape[-1] == 24
    cfg.model.backbone = "auto"
    with pytest.raises(EdgexferError, match="no backbone chosen yet"):
        ws.preprocessing  # noqa: B018
