"""Provenance of derived files, and validation decides / test reports (issue 14, items 1 and 2).

- A derived ONNX file starts with no metrics: after `evaluate` has written FP32's metrics into model.onnx,
  quantizing again must not ship them inside the INT8 file; evaluate then writes the INT8 file's own.
- The source hash a derived file records still matches model.onnx after evaluate rewrote it, and
  `edgexfer inspect` says so (and says when it does not).
- What is recommended or bundled never depends on test-split numbers; a test result that disagrees with
  the accuracy guard is reported loudly.
"""
from __future__ import annotations

import copy
import json
import shutil

import pytest

from edgexfer.exporters.inspect_model import format_text, inspect
from edgexfer.exporters.metadata_io import content_sha256, read_meta, write_meta
from edgexfer.report import TEST_DROP_CHECK, checks, recommend, report_md
from edgexfer.runtime.atomic import sha256_file
from edgexfer.runtime.bundle import bundle, choose_model


def test_requantize_after_evaluate_ships_no_fp32_metrics(run_copy):
    from edgexfer import pipeline

    fp32, int8 = run_copy / "model.onnx", run_copy / "model.int8.onnx"
    fp32_metrics = read_meta(fp32).metrics
    assert fp32_metrics["split"] == "test"  # the fixture's evaluate wrote them
    pipeline.quantize(run_copy)
    meta = read_meta(int8)
    assert meta.metrics == {}, "a derived file must not carry its source's metrics"
    q = meta.quantization
    assert q["source_file"] == "model.onnx" and q["source_content_sha256"] == content_sha256(fp32)
    assert "source_sha256" not in q  # the hash of bytes that evaluate rewrites

    before = sha256_file(fp32)
    pipeline.evaluate(run_copy)  # rewrites model.onnx with its metrics, and the INT8 file with its own
    rep = json.loads((run_copy / "report.json").read_text())
    own = read_meta(int8).metrics
    assert own["accuracy"] == rep["models"]["int8"]["accuracy"] and own["n"] == rep["models"]["int8"]["n"]
    assert read_meta(int8).quantization["source_content_sha256"] == content_sha256(fp32)
    assert inspect(int8)["source_check"]["status"] == "matches"
    # a changed metric alone changes the bytes, not the recorded hash
    m = read_meta(fp32)
    m.metrics = {**m.metrics, "accuracy": 0.123}
    write_meta(fp32, m)
    assert sha256_file(fp32) != before and inspect(int8)["source_check"]["status"] == "matches"


def test_fp16_and_dynamic_start_without_metrics(tiny_run, tmp_path):
    from edgexfer.exporters.quantize import convert_fp16

    out = tmp_path / "model.fp16.onnx"
    convert_fp16(tiny_run / "model.onnx", out)
    meta = read_meta(out)
    assert read_meta(tiny_run / "model.onnx").metrics and meta.metrics == {}
    assert meta.quantization["source_content_sha256"] == content_sha256(tiny_run / "model.onnx")


def test_inspect_shows_whether_source_matches(run_copy, tmp_path):
    int8, fp32 = run_copy / "model.int8.onnx", run_copy / "model.onnx"
    if "source_content_sha256" not in (read_meta(int8).quantization or {}):
        pytest.skip("the session run was made before source_content_sha256")
    info = inspect(int8)
    assert info["source_check"]["status"] == "matches" and "matches the recorded sha256" in format_text(info)
    assert inspect(fp32)["source_check"] is None  # not derived
    m = read_meta(fp32)
    m.provenance = {**m.provenance, "created": "another export"}  # anything but metrics is the source's content
    write_meta(fp32, m)
    info = inspect(int8)
    assert info["source_check"]["status"] == "differs" and "DOES NOT MATCH" in format_text(info)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copyfile(int8, alone / "model.int8.onnx")
    assert inspect(alone / "model.int8.onnx")["source_check"]["status"] == "not found"


# -- validation decides, test reports -------------------------------------------------------------------

def _report(guard_passes: bool | None, test_drop: float, int8_faster: bool = True) -> dict:
    """A report.json with an accuracy guard's verdict (None: no guard record) and a test-split drop."""
    rep = {
        "models": {
            "fp32": {"file": "model.onnx", "size_bytes": 4_000_000, "accuracy": 0.9, "n": 60,
                     "latency_ms": {"p50": 2.0}},
            "int8": {"file": "model.int8.onnx", "size_bytes": 1_200_000, "accuracy": 0.9 - test_drop, "n": 60,
                     "latency_ms": {"p50": 1.0 if int8_faster else 3.0}},
        },
        "quantize": {"target": {"target": "avx2", "host": "avx2", "why": "the recipe", "host_measures_faithfully": True}},
        "quantization_impact": {"accuracy_drop": test_drop, "within_bound": test_drop <= 0.01 + 1e-9,
                                "max_accuracy_drop": 0.01},
    }
    if guard_passes is not None:
        rate = 0.004 if guard_passes else 0.03
        rep["quantize"]["guard"] = {
            "within_bound": guard_passes, "max_accuracy_drop": 0.01, "measured_on": "this host",
            "fp32_accuracy": 1.0, "shipped_accuracy": 1 - rate, "chosen_fp32_layers": 2, "quantizable_layers": 40,
            "layers_kept_fp32": [], "candidates": [],
            "disagreement": {"rate": rate, "images": 1000, "disagreeing": int(rate * 1000), "upper95": rate + 0.005},
            "validation": {"images": 30, "fp32_accuracy": 0.9, "int8_accuracy": 0.9, "drop": 0.0, "drop_se": 0.0},
            "confidence": "one sentence"}
    return rep


def _perturb_test(rep: dict, int8_accuracy: float) -> dict:
    """The same report with other test-split numbers (accuracy, impact); nothing validation-side changed."""
    rep = copy.deepcopy(rep)
    for k, m in rep.get("models", {}).items():
        if "accuracy" in m:
            m["accuracy"] = int8_accuracy if k != "fp32" else 0.9
    if rep.get("quantization_impact"):
        drop = 0.9 - int8_accuracy
        rep["quantization_impact"].update(accuracy_drop=drop, within_bound=drop <= 0.01 + 1e-9)
    return rep


def _run_folder(path, rep: dict):
    path.mkdir()
    for f in ("model.onnx", "model.int8.onnx"):
        (path / f).write_bytes(b"")  # choose_model looks at which files exist and at report.json only
    (path / "report.json").write_text(json.dumps(rep))
    return path


@pytest.mark.parametrize("guard_passes,int8_faster,expect", [
    (True, True, "model.int8.onnx"), (True, False, "model.onnx"), (False, True, "model.onnx"),
    (None, True, "model.onnx")])
def test_choice_never_depends_on_test_split(tmp_path, guard_passes, int8_faster, expect):
    base = _report(guard_passes, 0.0, int8_faster)
    choices = set()
    for i, acc in enumerate((0.9, 0.5, 0.0, 0.895, 0.95)):  # within the bound, far over it, better than FP32
        rep = _perturb_test(base, acc)
        r = recommend(rep, 0.01)
        model, why, _ = choose_model(_run_folder(tmp_path / f"run{i}", rep))
        choices.add((r["file"], r["why"], r.get("outside_bound") is not None, model.name, why))
        assert r["test_accuracy"] == rep["models"][r["model"]]["accuracy"]  # reported beside the choice
    assert len(choices) == 1, choices
    assert next(iter(choices))[0] == expect
    if guard_passes is None:
        assert "no accuracy-guard record" in next(iter(choices))[4]


def test_test_split_disagreement_warns_but_does_not_switch(tmp_path, capsys):
    from edgexfer.cli import print_headline

    rep = _report(True, 0.10)  # the guard passed INT8; on the test split it loses 10 points
    r = recommend(rep, 0.01)
    assert r["file"] == "model.int8.onnx" and "disagrees" in r["test_disagrees"]
    rep.update(recommendation=r, checks=checks(rep, 0.01))
    assert "**WARNING — the test split disagrees with the accuracy guard" in report_md(rep)
    print_headline(tmp_path, rep)
    out = capsys.readouterr().out  # no "Recommended" beside the warning about the file it would recommend
    assert "the test split disagrees" in out and "Recommended here: model.int8.onnx" not in out
    guard_row = next(c for c in rep["checks"] if c["name"].startswith("INT8 accuracy guard"))
    test_row = next(c for c in rep["checks"] if c["name"] == TEST_DROP_CHECK)
    assert guard_row["ok"] is True and test_row["ok"] is False and "reported" in test_row["name"]
    model, why, warning = choose_model(_run_folder(tmp_path / "run", rep))
    assert model.name == "model.int8.onnx" and "disagrees" in warning
    # the other way round: the guard rejected INT8, the test split finds it fine; FP32 stays
    rep = _report(False, 0.0)
    r = recommend(rep, 0.01)
    assert r["file"] == "model.onnx" and "rejected it" in r["test_disagrees"]
    # agreement: no warning
    assert "test_disagrees" not in recommend(_report(True, 0.0), 0.01)


def test_recommendation_of_the_session_run_ignores_test_numbers(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    r = recommend(rep, rep["quantize"]["guard"]["max_accuracy_drop"])
    for acc in (0.0, 1.0):
        r2 = recommend(_perturb_test(rep, acc), rep["quantize"]["guard"]["max_accuracy_drop"])
        assert (r2["file"], r2["why"]) == (r["file"], r["why"])


def test_bundle_says_what_it_chose_without_a_guard(run_copy, tmp_path):
    rep = json.loads((run_copy / "report.json").read_text())
    rep["quantize"].pop("guard", None)
    (run_copy / "report.json").write_text(json.dumps(rep))
    res = bundle(run_copy, tmp_path / "b")
    assert res["model"] == "model.onnx" and "no accuracy-guard record" in res["why"]
    assert "no accuracy-guard record" in (tmp_path / "b" / "README.md").read_text()
