"""Quantization recipes and targets, the accuracy guard, FP16/dynamic files, inspect and the Triton repo."""
import json

import numpy as np
import onnx
import pytest

from edgexfer.exporters.quantize import Int8Recipe, convert_fp16, host_target, quantize_dynamic_int8, recipe_for
from edgexfer.guard import Judge, Scorer, guarded_quantize
from edgexfer.runtime import EdgeModel
from tests.conftest import run_cli


def test_targets_follow_optimum_presets():
    assert recipe_for("avx2")[0].reduce_range is True
    assert recipe_for("avx512_vnni")[0].reduce_range is False
    r, note = recipe_for("arm64")
    assert (r.activation_type, r.weight_type, r.per_channel, r.reduce_range) == ("uint8", "int8", True, False)
    assert note["target"] == "arm64" and note["why"]
    with pytest.raises(ValueError):
        recipe_for("riscv")


def test_host_detection():
    assert host_target({"avx2", "fma"}, "x86_64") == "avx2"
    assert host_target({"avx2", "avx512f"}, "x86_64") == "avx512"
    assert host_target({"avx512f", "avx512_vnni"}, "x86_64") == "avx512_vnni"
    assert host_target(set(), "aarch64") == "arm64"


def test_unfaithful_target_is_said(monkeypatch):
    import edgexfer.exporters.quantize as q

    monkeypatch.setattr(q, "host_target", lambda *a, **k: "avx2")
    _, note = recipe_for("avx512_vnni")
    assert note["host_measures_faithfully"] is False and "VNNI" in note["warning"]
    from edgexfer.report import checks

    rep = {"models": {"fp32": {"accuracy": 0.9, "size_bytes": 10}, "int8": {"accuracy": 0.8, "size_bytes": 3}},
           "quantize": {"target": note}}
    c = next(c for c in checks(rep, 0.01) if c["name"].startswith("INT8 accuracy"))
    assert c["ok"] is None and "not the target" in c["value"]


def test_guard_keeps_layers_in_fp32_until_the_bound_holds(tiny_run, tmp_path):
    """A real, strict metric — the share of 64 inputs whose logits stay within `tol` of FP32 — with `tol`
    set between the error of plain INT8 and that of INT8 with every weighted layer in FP32: plain INT8
    breaks the bound, so the guard must keep layers in FP32, say which, and meet the bound."""
    from edgexfer.exporters.quantize import quantizable_nodes, quantize_int8

    fp32 = tiny_run / "model.onnx"
    x = np.random.default_rng(0).standard_normal((64, 3, 64, 64)).astype(np.float32)
    ref = EdgeModel(fp32).run(x)["label"]
    calib = np.random.default_rng(1).standard_normal((16, 3, 64, 64)).astype(np.float32)
    recipe = Int8Recipe(calibration_samples=16)

    def err(path):
        return float(np.abs(EdgeModel(path).run(x)["label"] - ref).max())

    quantize_int8(fp32, tmp_path / "plain.onnx", calib, recipe)
    quantize_int8(fp32, tmp_path / "all.onnx", calib,
                  Int8Recipe(calibration_samples=16, nodes_to_exclude=tuple(quantizable_nodes(fp32))))
    e_plain, e_all = err(tmp_path / "plain.onnx"), err(tmp_path / "all.onnx")
    assert e_all < e_plain
    tol = (e_plain * e_all) ** 0.5 if e_all > 0 else e_plain / 2

    def within_tol(path):
        return float(np.mean(np.abs(EdgeModel(path).run(x)["label"] - ref).max(1) <= tol))

    out = tmp_path / "g.int8.onnx"
    rec = guarded_quantize(fp32, out, calib, recipe, Judge([Scorer("within_tol", within_tol, "decides")], max_drop=0.0),
                           fallback="prefix")  # the ranked fallback: tests/test_quantize_ranked.py
    g = rec["guard"]
    assert g["candidates"][0]["fp32_layers"] == 0 and g["candidates"][0]["within_bound"] is False
    assert g["within_bound"] is True and g["chosen_fp32_layers"] > 0
    assert len(g["layers_kept_fp32"]) == g["chosen_fp32_layers"]
    assert EdgeModel(out).meta.quantization["nodes_to_exclude"] == g["layers_kept_fp32"]
    assert within_tol(out) == 1.0


def test_guard_second_bound_must_hold_too(tiny_run, tmp_path):
    """`at_least` (the target-domain agreement after --adapt-bn) is a bound of its own: a candidate that
    meets the accuracy bound but not it is passed over, and the record says what it scored."""
    from edgexfer.exporters.quantize import quantizable_nodes
    from edgexfer.pipeline import agreement_with

    fp32 = tiny_run / "model.onnx"
    x = np.random.default_rng(2).standard_normal((32, 3, 64, 64)).astype(np.float32)
    calib = np.random.default_rng(1).standard_normal((16, 3, 64, 64)).astype(np.float32)
    agree = agreement_with(fp32, x)
    assert agree(fp32) == 1.0
    nodes = quantizable_nodes(fp32)
    need = {}  # a fake second score: only candidates keeping 2+ layers in FP32 pass it

    def second(path):
        k = len(EdgeModel(path).meta.quantization["nodes_to_exclude"])
        need[k] = agree(path)  # the real agreement, computed for the record
        return 1.0 if k >= 2 else 0.0

    rec = guarded_quantize(fp32, tmp_path / "g.onnx", calib, Int8Recipe(calibration_samples=16),
                           Judge([Scorer("agreement", lambda p: 1.0, "decides"),
                                  Scorer("target_agreement", second, "at_least", limit=0.5)], max_drop=0.0),
                           fallback="prefix")
    g = rec["guard"]
    assert [c["within_bound"] for c in g["candidates"]] == [False, False, True]
    assert g["chosen_fp32_layers"] == 2 and g["layers_kept_fp32"] == nodes[:2]
    assert g["at_least"] == {"target_agreement": 0.5} and all(0 <= v <= 1 for v in need.values())


def test_fp16_and_dynamic_files(tiny_run, tmp_path):
    fp32 = tiny_run / "model.onnx"
    x = np.random.default_rng(2).standard_normal((4, 3, 64, 64)).astype(np.float32)
    ref = EdgeModel(fp32).run(x)["label"]
    convert_fp16(fp32, tmp_path / "m.fp16.onnx")
    quantize_dynamic_int8(fp32, tmp_path / "m.dyn.onnx")
    h, d = EdgeModel(tmp_path / "m.fp16.onnx"), EdgeModel(tmp_path / "m.dyn.onnx")
    assert h.meta.quantization["format"] == "fp16" and d.meta.quantization["format"] == "dynamic"
    assert (tmp_path / "m.fp16.onnx").stat().st_size < 0.55 * fp32.stat().st_size
    np.testing.assert_allclose(h.run(x)["label"], ref, atol=0.05)
    assert d.run(x)["label"].shape == ref.shape


def test_inspect(tiny_run):
    p = run_cli("inspect", tiny_run / "model.onnx", tiny_run / "model.int8.onnx", check=True)
    assert "opset {'ai.onnx': 17" in p.stdout and "labels: blue_ring, green_bar, red_disc" in p.stdout
    p = run_cli("inspect", "--json", tiny_run / "model.int8.onnx", check=True)
    info = json.loads(p.stdout)
    assert info["weighted_ops"]["quantized"] > 0 and info["quant_nodes"] > 0
    assert info["metadata"]["quantization"]["format"] == "QDQ"
    assert info["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    f = json.loads(run_cli("inspect", "--json", tiny_run / "model.onnx", check=True).stdout)
    assert f["weighted_ops"]["quantized"] == 0 and f["weighted_ops"]["float"] > 0


def test_export_cleanup_recorded(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    c = rep["export"]["cleanup"]
    assert c["tool"].startswith("onnxslim") and c["reason"]
    pytest.importorskip("onnxslim")  # a train dependency: with it, the clean-up ran and measured both graphs
    if "nodes_before" not in c:  # onnxslim raised or changed the outputs: the export shipped unslimmed
        assert not c["kept"] and c["reason"].startswith(("onnxslim failed", "outputs changed")), c
        return
    # kept exactly when smaller or faster; either way the shipped graph is the one the record names
    assert c["kept"] == (c["size_after"] < c["size_before"] or c["p50_ms_after"] < c["p50_ms_before"])
    assert c["max_abs_diff"] <= rep["export"]["atol"]
    shipped = len(onnx.load(str(tiny_run / "model.onnx")).graph.node)
    assert shipped == (c["nodes_after"] if c["kept"] else c["nodes_before"])


def test_triton_repository_parses_back(run_copy, tmp_path):
    model_config_pb2 = _model_config_pb2()
    from google.protobuf import text_format

    tiny_run = run_copy  # `export` writes into the run folder: a copy, not the session's run
    run_cli("export", tiny_run, "--triton-repo", tmp_path / "repo", "--triton-model", "int8", "--max-batch-size", "16",
            check=True)
    entry = tmp_path / "repo" / tiny_run.name
    cfg = text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == tiny_run.name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 16
    assert list(cfg.input[0].dims) == [3, 64, 64] and cfg.input[0].name == "input"
    assert list(cfg.output[0].dims) == [3] and cfg.output[0].name == "logits"
    assert cfg.HasField("dynamic_batching")
    assert (entry / "1" / "model.onnx").read_bytes() == (tiny_run / "model.int8.onnx").read_bytes()
    assert (entry / cfg.output[0].label_filename).read_text().split() == list(EdgeModel(tiny_run / "model.onnx").labels)


def _model_config_pb2():
    """Triton's own ModelConfig schema, shipped in tritonclient (loaded by file: its grpc package wants grpcio)."""
    import importlib.util

    tc = pytest.importorskip("tritonclient")
    from pathlib import Path

    path = Path(tc.__path__[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        pytest.skip("tritonclient without model_config_pb2")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_inc_tuning_or_fallback(tiny_run, tmp_path):
    """With onnx-neural-compressor available (`make inc`), INC's autotune searches first; the file that
    ships is re-measured with ONNX Runtime and must be within the bound, whoever found it."""
    import shutil

    from edgexfer.exporters.inc import inc_python

    if inc_python() is None:
        pytest.skip("onnx-neural-compressor not available (make inc)")
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    run_cli("quantize", run, "--tuner", "inc", "--calibration-samples", "16", check=True)
    rep = json.loads((run / "report.json").read_text())
    g = rep["quantize"]["guard"]
    assert g["inc"]["tuner"].startswith("onnx-neural-compressor") and g["inc"]["returncode"] == 0
    assert len(g["inc"]["trial_accuracies"]) >= 2  # INC's FP32 baseline and at least one candidate
    assert g["within_bound"] and g["fp32_accuracy"] - g["shipped_accuracy"] <= g["max_accuracy_drop"] + 1e-9
    if g["inc"]["tuned"]:
        assert "Neural Compressor" in g["tuner"]
    q = EdgeModel(run / "model.int8.onnx").meta.quantization
    assert q["format"] == "QDQ"
    info = json.loads(run_cli("inspect", "--json", run / "model.int8.onnx", check=True).stdout)
    assert info["weighted_ops"]["quantized"] > 0


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_methods(tiny_run, tmp_path, method):
    from edgexfer.exporters.quantize import quantize_int8

    calib = np.random.default_rng(4).standard_normal((8, 3, 64, 64)).astype(np.float32)
    rec = quantize_int8(tiny_run / "model.onnx", tmp_path / "q.onnx", calib,
                        Int8Recipe(calibration_method=method, calibration_samples=8))
    assert rec["calibration_method"] == method and rec["calibration_samples"] == 8
    assert EdgeModel(tmp_path / "q.onnx").run(calib[:2])["label"].shape == (2, 3)
