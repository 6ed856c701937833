"""Stage provenance and invalidation (issue 14 item 1): a stage is done only if the settings it ran with and
the files it read still match; a stage that runs again clears what it and the later stages recorded, and the
later stages' files; `run` with a changed quantize setting re-runs quantize and every stage after it."""
from __future__ import annotations

import json

from tests.conftest import run_cli


def report(run):
    return json.loads((run / "report.json").read_text())


def test_every_stage_records_its_settings_and_inputs(tiny_run):
    from edgexfer.exporters.metadata_io import content_sha256
    from edgexfer.runfolder import STAGES, RunFolder

    stages = report(tiny_run)["stages"]
    assert set(stages) == set(STAGES)
    assert set(stages["quantize"]["settings"]) >= {"quantize.recipe", "quantize.target", "quantize.calibration",
                                                   "quantize.guard_images", "quantize.qat_epochs", "max_accuracy_drop"}
    from edgexfer.runtime.atomic import sha256_file

    assert stages["quantize"]["inputs"] == {"model.onnx": content_sha256(tiny_run / "model.onnx"),
                                            "checkpoint.pt": sha256_file(tiny_run / "checkpoint.pt")}  # QAT reads it
    assert set(stages["bench"]["inputs"]) >= {"model.onnx", "model.int8.onnx"}
    run = RunFolder(tiny_run)
    cfg = run.config()
    assert all(run.why_stale(s, cfg) is None for s in STAGES)


def test_a_changed_setting_or_input_makes_a_stage_stale(run_copy):
    from edgexfer.exporters.metadata_io import read_meta, write_meta
    from edgexfer.runfolder import RunFolder

    run = RunFolder(run_copy)
    cfg = run.config()
    cfg.bench.iters += 1
    assert run.why_stale("bench", cfg) == "its settings changed since (bench)"
    assert run.why_stale("quantize", cfg) is None  # bench settings are not quantize's
    cfg = run.config()
    m = read_meta(run_copy / "model.onnx")
    m.metrics = {**m.metrics, "accuracy": 0.5}  # evaluate's figures are not the content
    write_meta(run_copy / "model.onnx", m)
    assert run.why_stale("quantize", cfg) is None
    m.provenance = {**m.provenance, "created": "another export"}
    write_meta(run_copy / "model.onnx", m)
    assert run.why_stale("quantize", cfg) == "its input files changed since (model.onnx)"
    rep = report(run_copy)
    del rep["stages"]["evaluate"]["settings"]  # a run folder from before stage provenance
    (run_copy / "report.json").write_text(json.dumps(rep))
    assert "recorded before" in run.why_stale("evaluate", cfg)


def test_run_with_a_changed_bound_reruns_quantize_and_after(run_copy):
    from edgexfer import pipeline

    cfg = pipeline.RunFolder(run_copy).config()
    seen = []
    pipeline.run(run_copy, cfg, on_stage=lambda s, what: seen.append((s, what)))
    assert seen == [(s, "done already (resumed)") for s in pipeline.STAGES]  # nothing changed: nothing ran

    cfg.max_accuracy_drop = 0.5
    seen.clear()
    pipeline.run(run_copy, cfg, on_stage=lambda s, what: seen.append((s, what)))
    status = {s: what for s, what in seen if what != "end"}
    assert status["finetune"] == status["export"] == "done already (resumed)"
    assert status["quantize"] == "runs again: its settings changed since (max_accuracy_drop)"
    assert status["evaluate"] == status["bench"] == "start"  # quantize cleared their records: they ran afresh
    rep = report(run_copy)
    assert rep["quantize"]["guard"]["max_accuracy_drop"] == 0.5
    assert rep["quantization_impact"]["max_accuracy_drop"] == 0.5
    assert json.loads((run_copy / "config.json").read_text())["max_accuracy_drop"] == 0.5
    assert all(pipeline.RunFolder(run_copy).why_stale(s, cfg) is None for s in pipeline.STAGES)


def test_export_keeps_a_current_file_and_force_clears_what_followed(run_copy):
    int8 = run_copy / "model.int8.onnx"
    before = (run_copy / "model.onnx").read_bytes()
    p = run_cli("export", run_copy, check=True)
    assert "is current" in p.stdout and (run_copy / "model.onnx").read_bytes() == before and int8.is_file()

    run_cli("export", run_copy, "--force", check=True)
    rep = report(run_copy)
    assert set(rep["stages"]) == {"finetune", "export"}
    assert not {"quantize", "models", "quantization_impact", "bench", "recommendation"} & set(rep)
    assert not int8.exists() and not (run_copy / "model.int8.e2e.onnx").exists()  # derived from the old file
    assert (run_copy / "model.onnx").is_file() and (run_copy / "checkpoint.pt").is_file()


def test_quantize_alone_says_what_is_no_longer_measured(run_copy):
    run_cli("quantize", run_copy, "--max-accuracy-drop", "0.5", check=True)
    rep = report(run_copy)
    assert rep["quantize"]["guard"]["max_accuracy_drop"] == 0.5 and "evaluate" not in rep["stages"]
    md = (run_copy / "report.md").read_text()
    assert "Not measured since the files last changed: test accuracy (`edgexfer evaluate RUN`); latency" in md
    assert any(c["bound"].startswith("<= 50.0%") for c in rep["checks"])  # the guard check follows the new bound
    run_cli("evaluate", run_copy, check=True)
    md = (run_copy / "report.md").read_text()
    assert "Not measured since the files last changed: latency" in md and "evaluate RUN" not in md
