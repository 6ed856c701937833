"""The stage protocol (`edgexfer.runfolder.stage`): the lock, provenance, report sections and done mark around each
stage's own work; a stage that raises leaves no done mark; a changed setting makes its stage and the later ones
stale; `--backbone auto` is a stage of its own (select) whose choice a resumed run keeps, also in a run folder made
before select was a stage. Fast tier: the tiny random backbone, in this process."""
from __future__ import annotations

import json

import pytest

from tests.conftest import FAST_RUN_ARGS, TEST_BACKBONE, invoke


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


@pytest.fixture
def auto_candidates(monkeypatch):
    """`--backbone auto` among the tiny test backbone only (no real weights)."""
    from edgexfer import transfer

    monkeypatch.setattr(transfer, "default_candidates", lambda: [TEST_BACKBONE])


def _auto_args(image_folder, runs):
    i = FAST_RUN_ARGS.index("--backbone")
    args = FAST_RUN_ARGS[:i] + FAST_RUN_ARGS[i + 2:]
    return ("run", "--data", image_folder, "--runs", runs, "--name", "auto", "--backbone", "auto", *args)


def _stage_lines(stderr: str) -> dict[str, str]:
    return {line[4:].split()[0].rstrip(":"): line for line in stderr.splitlines() if line.startswith("==> ")}


def test_select_is_a_stage_that_records_its_choice_and_a_resumed_run_keeps_it(auto_candidates, image_folder,
                                                                              tmp_path):
    from edgexfer.runfolder import SELECTION_FILE, RunFolder

    r = invoke(*_auto_args(image_folder, tmp_path))
    assert r.exit_code == 0, r.stderr[-3000:]
    run = tmp_path / "auto"
    assert list(_stage_lines(r.stderr)) == ["select", "finetune", "export", "quantize", "evaluate", "bench"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["requested_backbone"] == "auto" and cfg["model"]["backbone"] == TEST_BACKBONE
    assert cfg["model"]["image_size"] == 32 and cfg["model"]["image_size_reason"] == "--image-size 32"
    rep = report(run)
    assert list(rep["stages"]) == ["select", "finetune", "export", "quantize", "evaluate", "bench"]
    sel = rep["stages"]["select"]
    assert sel["done"] and set(sel["settings"]) == {"data", "model.requested_backbone", "model.weights",
                                                    "model.max_latency_ms"}
    assert rep["backbone"]["name"] == TEST_BACKBONE and rep["backbone"]["requested"] == "auto"
    assert rep["backbone"]["selection"] == json.loads((run / SELECTION_FILE).read_text())
    folder = RunFolder(run)
    assert all(folder.why_stale(s, folder.config()) is None for s in rep["stages"])

    # the same command again: the choice stands, nothing runs
    files = {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name in (SELECTION_FILE, "checkpoint.pt")}
    r = invoke(*_auto_args(image_folder, tmp_path))
    assert r.exit_code == 0, r.stderr[-3000:]
    lines = _stage_lines(r.stderr)
    assert list(lines) == ["select", "finetune", "export", "quantize", "evaluate", "bench"]
    assert all("done already" in line for line in lines.values()), lines
    assert {p: (run / p).stat().st_mtime_ns for p in files} == files

    # a run folder made before select was a stage: its choice is in config.json, finetune done, no select record
    rep = report(run)
    del rep["stages"]["select"]
    (run / "report.json").write_text(json.dumps(rep))
    r = invoke(*_auto_args(image_folder, tmp_path))
    assert r.exit_code == 0, r.stderr[-3000:]
    assert all("done already" in line for line in _stage_lines(r.stderr).values()), r.stderr[-3000:]
    assert {p: (run / p).stat().st_mtime_ns for p in files} == files  # not selected again, not trained again


def test_select_runs_again_when_its_record_is_stale_and_clears_what_followed(auto_candidates, image_folder, tmp_path):
    from edgexfer import pipeline
    from edgexfer.runfolder import RunFolder

    r = invoke(*_auto_args(image_folder, tmp_path))
    assert r.exit_code == 0, r.stderr[-3000:]
    run = RunFolder(tmp_path / "auto")
    rep = report(run.path)
    rep["stages"]["select"]["settings"]["model.max_latency_ms"] = "another"  # as if chosen under another budget
    (run.path / "report.json").write_text(json.dumps(rep))
    cfg = run.config()
    assert run.why_stale("select", cfg) == "its settings changed since (model.max_latency_ms)"
    seen = []
    pipeline.run(run.path, cfg, on_stage=lambda s, what: seen.append((s, what)))
    status = {s: what for s, what in seen if what != "end"}
    assert status["select"].startswith("runs again") and set(status.values()) - {status["select"]} == {"start"}
    assert list(report(run.path)["stages"]) == ["select", "finetune", "export", "quantize", "evaluate", "bench"]


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
