"""Issue 13, the runtime's inputs: images bounded before decoding (pixels, aspect ratio) with the
runtime's own error types; 16-bit and float images scaled, not clipped; metadata checked against the
graph when a model loads, refused in one line."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from edgexfer.runtime import EdgeModel, ImageError, MetadataError
from edgexfer.runtime.errors import ImageTooLarge
from edgexfer.runtime.metadata import Preprocessing
from edgexfer.runtime.preprocess import ImageLimits, load_image, preprocess
from tests._onnx_model import good_meta, onnx_bytes

pytest.importorskip("onnx")


def png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def model():
    return EdgeModel(onnx_bytes(good_meta()))


# -- item 3: the image budget -------------------------------------------------------------------

def test_decompression_bomb_is_an_image_error(model):
    """20000x20000 1-bit PNG: 48 kB, 400 M pixels. Pillow's DecompressionBombError was not an ImageError."""
    bomb = png(Image.new("1", (20000, 20000)))
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge, match="too large"):
        model.predict(bomb)
    with pytest.raises(ImageTooLarge):  # even without edgexfer limits (training on one's own images)
        load_image(bomb)


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    """Over the budget: refused from the header's size; the pixels are never decoded."""
    data = png(Image.new("L", (3000, 2000)))
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self))
    with pytest.raises(ImageTooLarge, match="3000x2000 = 6000000 pixels is over the limit of 5000000"):
        load_image(data, ImageLimits(max_pixels=5_000_000))
    assert not loads
    assert load_image(data, ImageLimits(max_pixels=6_000_000)).size == (3000, 2000)


def test_aspect_ratio_is_bounded(model):
    """1x4000: a few hundred bytes that resize to 8x32000 (1x40000 to a model's 64: 1.6 GB)."""
    thin = png(Image.new("L", (1, 4000)))
    assert len(thin) < 1000
    with pytest.raises(ImageError, match="aspect ratio"):
        model.predict(thin)
    assert len(model.predict(png(Image.new("RGB", (20, 400))))) == 5  # 20:1 is within the default


def test_resized_image_is_bounded():
    """The resize target counts too: a small 1:20 image upscaled to a large shorter side."""
    pp = Preprocessing(resize=2000, crop=2000)
    with pytest.raises(ImageTooLarge, match="resizes to"):
        preprocess(Image.new("RGB", (10, 200)), pp, ImageLimits())


def test_limits_are_the_models_own():
    m = EdgeModel(onnx_bytes(good_meta()), max_image_pixels=100, max_aspect_ratio=2)
    assert m.image_limits == ImageLimits(100, 2.0)
    with pytest.raises(ImageTooLarge):
        m.predict(np.zeros((11, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="aspect"):
        m.predict(Image.new("RGB", (3, 9)))
    assert m.predict(np.zeros((10, 10, 3), np.uint8))


def test_predict_refuses_a_bomb_in_one_line(tmp_path):
    """`edgexfer predict` on a decompression bomb: one line, exit 1, no traceback."""
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_bytes(good_meta()))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png(Image.new("1", (20000, 20000))))
    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "predict", str(model), str(bomb)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.startswith("error: ") and len(p.stderr.splitlines()) == 1
    assert "too large" in p.stderr


# -- item 10: 16-bit and float images -------------------------------------------------------------

def test_16_bit_png_is_scaled_not_clipped():
    pp = Preprocessing(resize=16, crop=16)
    a8 = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint8)
    a16 = a8.astype(np.uint16) * 257  # the same picture at 16 bits
    img16 = Image.open(io.BytesIO(png(Image.fromarray(a16))))
    assert img16.mode == "I;16"
    want = preprocess(Image.fromarray(a8), pp)
    np.testing.assert_array_equal(preprocess(img16, pp), want)  # was: every pixel over 255 white
    np.testing.assert_array_equal(preprocess(Image.fromarray(a16.astype(np.int32)), pp), want)  # mode I
    np.testing.assert_array_equal(preprocess(Image.fromarray(a8.astype(np.int32)), pp), want)  # I within 0..255
    np.testing.assert_array_equal(preprocess(Image.fromarray(a8 / np.float32(255)), pp), want)  # F in 0..1
    np.testing.assert_array_equal(preprocess(Image.fromarray(a8.astype(np.float32)), pp), want)  # F in 0..255


def test_16_bit_tiff_from_a_file(tmp_path):
    a16 = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    p = tmp_path / "x.tif"
    Image.fromarray(a16).save(p)
    x = preprocess(p, Preprocessing(resize=64, crop=64, mean=(0.0,) * 3, std=(1.0,) * 3))
    assert 0.0 <= x.min() < 0.01 and 0.99 < x.max() <= 1.0
    assert 0.45 < x.mean() < 0.55  # a gradient, not a white image


# -- item 6: metadata checked at load -------------------------------------------------------------

def _set(path, value):
    def mutate(d):
        *keys, last = path
        for k in keys:
            d = d[k]
        d[last] = value
    return mutate


@pytest.mark.parametrize("mutate, match", [
    (_set(("tasks", 0, "labels"), ["a", "b", "c"]), "10 scores per image for 3 labels"),
    (_set(("tasks", 0, "output"), "probs"), "names output 'probs'"),
    (lambda d: d["preprocessing"].update(resize=0, crop=0), "resize must be an integer in 1..4096, got 0"),
    (lambda d: d["preprocessing"].update(resize=-3, crop=-3), "resize must be an integer in 1..4096, got -3"),
    (lambda d: d["preprocessing"].update(resize=8000, crop=8000), "resize must be an integer in 1..4096, got 8000"),
    (lambda d: (d["preprocessing"].update(resize=8000, crop=8000), d["input"].update(height=8000, width=8000)),
     "must be an integer in 1..4096, got 8000"),
    (_set(("preprocessing", "std"), [0.0, 0.25, 0.25]), "std"),
    (_set(("tasks",), []), "tasks"),
    (_set(("input", "height"), 16), "input is 3x16x8"),
    (_set(("preprocessing", "mean"), ["x", 0, 0]), "mean"),
    (_set(("preprocessing", "scale"), float("nan")), "scale"),
    (_set(("tasks", 0, "labels"), "abcdefghij"), "labels"),
    (_set(("provenance",), "text"), "provenance"),
    (lambda d: d["tasks"].append(dict(d["tasks"][0])), "same name"),
])
def test_metadata_is_checked_against_the_graph(mutate, match):
    d = good_meta()
    mutate(d)
    with pytest.raises(MetadataError, match=match) as e:
        EdgeModel(onnx_bytes(d))
    assert "\n" not in str(e.value)


def test_metadata_root_must_be_an_object():
    for raw in ("[]", "3", '"x"', "null"):
        with pytest.raises(MetadataError):
            EdgeModel(onnx_bytes(raw))


def test_symbolic_output_size_is_checked_by_running_once():
    assert EdgeModel(onnx_bytes(good_meta(), symbolic_classes=True)).labels[-1] == "c9"
    with pytest.raises(MetadataError, match="10 scores per image for 4 labels"):
        EdgeModel(onnx_bytes(good_meta(classes=4), classes=10, symbolic_classes=True))


def test_nan_in_free_form_metadata_stays_json():
    d = good_meta()
    d["metrics"] = {"test_accuracy": float("nan"), "per_class": [1.0, float("inf")]}
    m = EdgeModel(onnx_bytes(json.dumps(d)))
    json.dumps(m.meta.to_dict(), allow_nan=False)
    assert m.meta.metrics == {"test_accuracy": None, "per_class": [1.0, None]}


@pytest.mark.parametrize("server", ["stdlib", "uvicorn"])
def test_serve_refuses_bad_metadata_in_one_line(tmp_path, server):
    if server == "uvicorn":
        pytest.importorskip("uvicorn")
        pytest.importorskip("prometheus_client")
    d = good_meta()
    d["tasks"][0]["labels"] = ["a", "b", "c"]
    model = tmp_path / "bad.onnx"
    model.write_bytes(onnx_bytes(d))
    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "serve", str(model), "--port", "0",
                        "--server", server], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: ") and "3 labels" in p.stderr and len(p.stderr.splitlines()) == 1


def test_embedding_app_refuses_bad_metadata_in_one_line(tmp_path):
    """The example application a bundle carries (runtime/app.py): one line, exit 1."""
    from pathlib import Path

    d = good_meta()
    d["tasks"][0]["output"] = "probs"
    model = tmp_path / "bad.onnx"
    model.write_bytes(onnx_bytes(d))
    app = Path(__file__).resolve().parents[1] / "runtime" / "app.py"
    p = subprocess.run([sys.executable, str(app), str(model), str(tmp_path / "x.png")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("error: ") and "'probs'" in p.stderr and len(p.stderr.splitlines()) == 1
