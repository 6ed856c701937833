"""The whole path on a tiny ImageFolder: run folder, report.json, metadata inside both ONNX files."""
import json

import numpy as np
import onnx
import pytest

from edgexfer.runtime import EdgeModel
from edgexfer.runtime.metadata import META_KEY
from tests.conftest import CLASSES, make_image, run_cli


def test_run_folder_is_complete(tiny_run):
    for f in ("checkpoint.pt", "model.onnx", "model.int8.onnx", "report.json", "report.md", "model_card.md",
              "config.json", "confusion_matrix.png"):
        assert (tiny_run / f).is_file(), f
    leftovers = [p.name for p in tiny_run.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert not (tiny_run / "train_state.pt").exists()


def test_report_json(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["schema"] == "edgexfer.report/2"
    from edgexfer.report_schema import errors

    assert errors(rep) == []  # the shipped JSON Schema (edgexfer/schemas/report.schema.json)
    assert rep["data"]["classes"] == sorted(CLASSES)
    assert rep["data"]["train"] + rep["data"]["val"] <= 20 * len(CLASSES)
    assert rep["backbone"]["name"] == "efficientnet_lite0" and rep["backbone"]["weights"] == "imagenet"
    for k, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        m = rep["models"][k]
        assert m["file"] == f and m["size_bytes"] == (tiny_run / f).stat().st_size
        cm = np.array(m["confusion_matrix"])  # the fraction of the test split it got right, of every test image
        assert m["n"] == cm.sum() == rep["data"]["test"] and m["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
        assert set(m["per_class"]) == set(CLASSES)
        assert m["latency_ms"]["p50"] > 0 and m["latency_ms"]["p99"] >= m["latency_ms"]["p50"]
        assert m["threads"] == 2 and m["batch"] == 1
    # the shapes are easy: a pretrained backbone must learn them
    assert rep["models"]["fp32"]["accuracy"] >= 0.8
    assert rep["reference"]["pytorch_eager"]["latency_ms"]["p50"] > 0
    assert rep["machine"]["cores"] >= 1 and "onnxruntime" in rep["machine"]
    assert rep["export"]["max_abs_diff"] <= rep["export"]["atol"]
    assert rep["models"]["int8"]["size_bytes"] < 0.35 * rep["models"]["fp32"]["size_bytes"]
    from edgexfer.report import TEST_DROP_CHECK

    assert {c["name"] for c in rep["checks"]} >= {TEST_DROP_CHECK, "INT8 file size / FP32"}
    cfg = json.loads((tiny_run / "config.json").read_text())
    assert cfg["model"]["image_size"] == 64 and cfg["train"]["epochs"] == 2


def test_metadata_inside_onnx(tiny_run):
    rep = json.loads((tiny_run / "report.json").read_text())
    for k, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        props = {p.key: p.value for p in onnx.load(str(tiny_run / f)).metadata_props}
        meta = json.loads(props[META_KEY])
        assert meta["labels"] == sorted(CLASSES)
        assert meta["input"] == {"name": "input", "height": 64, "width": 64, "channels": 3, "layout": "NCHW",
                                 "dtype": "float32"}
        assert meta["preprocessing"]["resize"] == 64 and meta["preprocessing"]["interpolation"] == "bilinear"
        assert len(meta["provenance"]["checkpoint_sha256"]) == 64
        assert meta["provenance"]["backbone"] == "efficientnet_lite0"
        # each file carries its own test accuracy (the INT8 file's is not copied from its FP32 source)
        assert meta["metrics"]["accuracy"] == pytest.approx(rep["models"][k]["accuracy"]) and meta["metrics"]["split"] == "test"
    q = json.loads({p.key: p.value for p in onnx.load(str(tiny_run / "model.int8.onnx")).metadata_props}[META_KEY])
    # the host's recipe: reduce_range on AVX2/AVX-512 without VNNI, the full 8-bit range on VNNI and arm64
    from edgexfer.exporters.quantize import recipe_for

    assert q["quantization"]["format"] == "QDQ"
    assert q["quantization"]["reduce_range"] is recipe_for("host")[0].reduce_range
    graph_ops = {n.op_type for n in onnx.load(str(tiny_run / "model.int8.onnx")).graph.node}
    assert "QuantizeLinear" in graph_ops and "DequantizeLinear" in graph_ops


def test_dynamic_batch_and_runtime_predict(tiny_run, tmp_path):
    m = EdgeModel(tiny_run / "model.onnx", threads=1)
    rng = np.random.default_rng(7)
    imgs = [make_image(k, rng) for k in range(3)]
    x = m.preprocess(imgs)
    assert x.shape == (3, 3, 64, 64)
    for n in (1, 3):
        assert m.run(x[:n])["label"].shape == (n, 3)
    preds = m.predict(imgs, top_k=2)
    assert len(preds) == 3 and all(len(p) == 2 for p in preds)
    assert all(abs(sum(p["score"] for p in m.predict(im, top_k=3)) - 1) < 1e-4 for im in imgs)
    correct = sum(p[0]["label"] == CLASSES[k] for k, p in enumerate(preds))
    assert correct >= 2, preds

def test_run_resumes_instead_of_redoing(run_copy, image_folder):
    before = (run_copy / "checkpoint.pt").stat().st_mtime_ns
    from tests.conftest import TINY_RUN_ARGS
    p = run_cli("run", "--data", image_folder, "--runs", run_copy.parent, "--name", run_copy.name, *TINY_RUN_ARGS,
                check=True)
    assert "done already" in p.stderr
    assert (run_copy / "checkpoint.pt").stat().st_mtime_ns == before


def test_other_config_refuses_without_force(run_copy, image_folder):
    p = run_cli("run", "--data", image_folder, "--runs", run_copy.parent, "--name", run_copy.name, "--epochs", "1")
    assert p.returncode != 0
    assert "another configuration" in p.stderr and "Traceback" not in p.stderr


def test_stage_commands(tiny_run, tmp_path):
    """predict and bench run alone on the run folder's artifacts."""
    img = tmp_path / "x.png"
    make_image(2, np.random.default_rng(3)).save(img)
    p = run_cli("predict", tiny_run / "model.int8.onnx", img, "--top-k", "2", check=True)
    out = json.loads(p.stdout.strip().splitlines()[0])
    assert len(out["predictions"]) == 2 and out["predictions"][0]["label"] in CLASSES
    p = run_cli("bench", tiny_run / "model.onnx", tiny_run / "model.int8.onnx", "--iters", "5", "--no-cold-start",
                "--no-reference", "--batches", "1", "--json-out", tmp_path / "b.json", check=True)
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res["models"]) == {"tiny/model.onnx", "tiny/model.int8.onnx"} and "cpu" in res["machine"]  # RUN/FILE


def test_scratch_baseline_is_measured(image_folder, tmp_path):
    p = run_cli("finetune", "--data", image_folder, "--out", tmp_path / "r", "--image-size", "64", "--epochs", "1",
                "--batch-size", "16", "--shots", "20", "--compare-scratch", "--backbone", "efficientnet_lite0", check=True)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    t = rep["transfer"]
    n = rep["data"]["test"]  # both are fractions of the same test images: k / n
    for acc in (t["scratch_test_accuracy"], t["pretrained_test_accuracy"]):
        assert acc * n == pytest.approx(round(acc * n), abs=1e-6), (acc, n)
    assert t["gain_points"] == round(100 * (t["pretrained_test_accuracy"] - t["scratch_test_accuracy"]), 2)
    assert t["negative_transfer"] == (t["gain_points"] <= 0)
    assert ("NEGATIVE TRANSFER" in p.stderr) == t["negative_transfer"]
    assert not (tmp_path / "r" / "scratch").exists()
