"""The runtime alone: no torch/onnx/optimum on import or predict, clear errors, bytes loading."""
import json
import subprocess
import sys

import numpy as np
import pytest

from edgexfer.runtime import EdgeModel, MetadataError, RuntimeInputError

HEAVY = ("torch", "torchvision", "onnx", "optimum", "neural_compressor", "onnx_neural_compressor", "click",
         "sklearn", "matplotlib")

ISOLATION = r"""
import json, sys
from edgexfer.runtime import EdgeModel
m = EdgeModel(sys.argv[1])
pred = m.predict(sys.argv[2], top_k=1)
heavy = [h for h in json.loads(sys.argv[3]) if h in sys.modules]
print(json.dumps({"pred": pred, "heavy": heavy}))
"""


def test_runtime_never_imports_heavy_packages(tiny_run, image_folder):
    img = next(image_folder.rglob("*.png"))
    p = subprocess.run([sys.executable, "-c", ISOLATION, str(tiny_run / "model.int8.onnx"), str(img), json.dumps(HEAVY)],
                       capture_output=True, text=True, check=True)
    out = json.loads(p.stdout)
    assert out["heavy"] == []
    assert len(out["pred"]) == 1


def test_load_from_bytes(tiny_run):
    a = EdgeModel(tiny_run / "model.onnx")
    b = EdgeModel((tiny_run / "model.onnx").read_bytes())
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(a.run(x)["label"], b.run(x)["label"])
    assert b.labels == a.labels


def test_wrong_inputs(tiny_run):
    m = EdgeModel(tiny_run / "model.onnx")
    with pytest.raises(RuntimeInputError, match="shape"):
        m.run(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(RuntimeInputError, match="float32"):
        m.run(np.zeros((1, 3, 64, 64), np.float64))
    with pytest.raises(RuntimeInputError):
        m.predict(np.zeros((8, 8), np.float32))
    with pytest.raises(MetadataError):
        EdgeModel(b"not an onnx file")
    with pytest.raises(FileNotFoundError):
        EdgeModel("does/not/exist.onnx")


def test_uint8_array_and_batch(tiny_run):
    m = EdgeModel(tiny_run / "model.int8.onnx")
    imgs = np.random.default_rng(1).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)
    out = m.predict(imgs, top_k=1)
    assert len(out) == 4 and all(o[0]["label"] in m.labels for o in out)


def test_provider_fallback_is_logged(tiny_run, caplog):
    with caplog.at_level("WARNING", logger="edgexfer.runtime.model"):
        m = EdgeModel(tiny_run / "model.onnx", providers=["NoSuchExecutionProvider"])
    assert m.providers == ["CPUExecutionProvider"]
    assert "NoSuchExecutionProvider" in caplog.text


def test_threads_and_graph_optimisation(tiny_run):
    x = np.random.default_rng(3).standard_normal((1, 3, 64, 64)).astype(np.float32)
    a = EdgeModel(tiny_run / "model.onnx", threads=1, graph_optimization="disable").run(x)["label"]
    b = EdgeModel(tiny_run / "model.onnx", threads=2, graph_optimization="all").run(x)["label"]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_embedding_example_runs(tiny_run, image_folder):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "embed.py"
    img = next(image_folder.rglob("*.png"))
    p = subprocess.run([sys.executable, str(example), str(tiny_run / "model.int8.onnx"), str(img)],
                       capture_output=True, text=True, check=True)
    assert "classes: blue_ring, green_bar, red_disc" in p.stdout and "{'label': (4, 3)}" in p.stdout
