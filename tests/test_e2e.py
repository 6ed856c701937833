"""The self-contained end-to-end file (edgexfer.exporters.e2e): its in-graph preprocessing against the
Python reference pixel by pixel, and a real ImageNet classifier (EfficientNet-Lite0, 1,000 classes, FP32
and INT8) against `EdgeModel.predict` on real photos (scikit-image's)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from edgexfer.exporters import e2e  # noqa: E402
from edgexfer.runtime.metadata import ModelMeta  # noqa: E402
from edgexfer.runtime.preprocess import load_image, normalize, preprocess, resize_crop  # noqa: E402
from tests._onnx_model import good_meta, onnx_bytes  # noqa: E402

# Probabilities of the end-to-end file against EdgeModel.predict (Pillow + numpy preprocessing): the
# graph resizes in float and rounds after each pass as Pillow does, so now and then a pixel lands one
# grey level apart; INT8 amplifies that more than FP32. The bounds are the largest absolute difference
# of any class probability on any photo.
PROB_ATOL = {"fp32": 0.02, "int8": 0.08}
MIN_TOP1_AGREEMENT = 0.99


def _pp_session(pp: dict) -> ort.InferenceSession:
    """The end-to-end preprocessing alone: uint8 image -> the model's float32 NCHW input."""
    meta = ModelMeta.from_dict({**good_meta(side=pp["crop"]), "preprocessing": pp,
                                "input": {"name": "input", "height": pp["crop"], "width": pp["crop"],
                                          "channels": 1 if pp.get("color") == "L" else 3}})
    nodes, inits = e2e.preprocessing_nodes(meta, "x")
    g = helper.make_graph(nodes, "pp", [helper.make_tensor_value_info("image", TensorProto.UINT8, None)],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", e2e.OPSET)])
    m.ir_version = 8
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]), meta.preprocessing


def _image(h, w, c, seed=0):
    """A smooth image with edges (noise alone makes resizing differences look larger than on photos)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), ((xx + yy) % 64) * 4], -1)
    a = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    if c == 1:
        return a[:, :, :1]
    if c == 4:
        return np.concatenate([a, np.full((h, w, 1), 128, np.uint8)], -1)
    return a


@pytest.mark.parametrize("h,w,c,color", [
    (64, 48, 3, "RGB"),    # portrait, odd margins after the resize
    (37, 101, 3, "RGB"),   # landscape, odd sizes
    (40, 40, 3, "RGB"),    # shorter side already the resize: no resize
    (90, 70, 1, "RGB"),    # grey image into an RGB model
    (70, 90, 4, "RGB"),    # RGBA: alpha dropped
    (61, 83, 3, "L"),      # RGB image into a grey model: Pillow's integer weights
])
def test_in_graph_preprocessing_matches_python(h, w, c, color):
    channels = 1 if color == "L" else 3
    pp = {"resize": 40, "crop": 32, "interpolation": "bilinear", "color": color, "scale": 1 / 255,
          "mean": [0.5] * channels, "std": [0.25] * channels}
    sess, ppo = _pp_session(pp)
    img = _image(h, w, c)
    ref = preprocess(img, ppo)
    got = sess.run(None, {"image": img})[0]
    assert got.shape == (1, *ref.shape)
    # in grey levels: a tie rounded apart now and then
    diff = np.abs(got[0] - ref) * np.asarray(pp["std"], np.float32).reshape(-1, 1, 1) * 255
    assert diff.mean() < 0.05 and diff.max() <= 1.0 + 1e-3, (diff.mean(), diff.max())
    if (h, w) == (40, 40):  # no resize: exact
        assert diff.max() < 1e-3
    # the same image with a batch dimension
    got4 = sess.run(None, {"image": np.stack([img, img])})[0]
    assert got4.shape == (2, *ref.shape) and np.array_equal(got4[0], got[0]) and np.array_equal(got4[1], got[0])


def test_no_resize_and_grey_conversion_are_exact():
    """No resize (shorter side = resize) and Pillow's RGB -> L: bit-exact."""
    pp = {"resize": 32, "crop": 32, "color": "L", "scale": 1 / 255, "mean": [0.5], "std": [0.25]}
    sess, ppo = _pp_session(pp)
    img = _image(32, 45, 3, seed=3)
    ref = preprocess(img, ppo)
    assert np.array_equal(sess.run(None, {"image": img})[0][0], ref)


def test_crop_offsets_round_half_to_even():
    """Python's round(): a margin of 1 starts at 0, of 3 at 2 (not 1 and 2 by round-half-up)."""
    pp = {"resize": 10, "crop": 10, "color": "RGB", "scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3}
    sess, ppo = _pp_session(pp)
    for w in (11, 13, 15):
        img = _image(10, w, 3, seed=w)
        ref = normalize(resize_crop(load_image(img), ppo), ppo)
        assert np.array_equal(sess.run(None, {"image": img})[0][0], ref), w


def test_file_contract(tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(onnx_bytes(good_meta(classes=4, side=8), classes=4, side=8))
    out = e2e.write(src)
    assert out == tmp_path / "model.e2e.onnx"
    assert e2e.e2e_path(tmp_path / "model.int8.onnx").name == "model.int8.e2e.onnx"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [("image", "tensor(uint8)")]
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "top_k_indices", "top_k_scores"]
    props = sess.get_modelmeta().custom_metadata_map
    assert props["labels"].split("\n") == ["c0", "c1", "c2", "c3"]
    contract = json.loads(props[e2e.E2E_KEY])
    assert contract["input"]["name"] == "image" and contract["tasks"]["label"]["k"] == 4
    assert ModelMeta.from_props(props).labels == ("c0", "c1", "c2", "c3")  # the source's metadata kept
    p, idx, sc = sess.run(None, {"image": _image(20, 30, 3)})
    assert p.shape == (1, 4) and abs(p.sum() - 1) < 1e-5 and idx[0, 0] == p[0].argmax()
    assert np.allclose(sc[0], p[0][idx[0]])


def test_unsupported_filter_is_skipped_with_a_reason(tmp_path):
    meta = good_meta()
    meta["preprocessing"]["interpolation"] = "lanczos"
    src = tmp_path / "model.onnx"
    src.write_bytes(onnx_bytes(meta))
    rec = e2e.write_beside(src)
    assert rec["file"] is None and "lanczos" in rec["why_not"] and not (tmp_path / "model.e2e.onnx").exists()


# -- a real classifier on real photos -----------------------------------------------------------------

def photos() -> list[np.ndarray]:
    """scikit-image's colour and grey photos, each also flipped and cut to two other aspect ratios."""
    skdata = pytest.importorskip("skimage.data")
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry",
                 "hubble_deep_field", "retina", "camera", "moon", "coins", "page", "grass", "gravel", "brick",
                 "colorwheel", "cat"):
        try:
            a = getattr(skdata, name)()
        except Exception:  # a photo whose file is not bundled (pooch download): skip it
            continue
        if a.dtype != np.uint8:
            continue
        a = a if a.ndim == 3 else a[:, :, None]
        h, w = a.shape[:2]
        out += [a, a[:, ::-1], a[: max(h * 2 // 3, 32)], a[:, : max(w // 2, 32)]]
    return [np.ascontiguousarray(a) for a in out]


@pytest.fixture(scope="module")
def imagenet_files(tmp_path_factory):
    """EfficientNet-Lite0 with its ImageNet head as an edgexfer FP32 and INT8 file (Resize 256, crop 224)."""
    pytest.importorskip("torch")
    from edgexfer.backbones import LITE_MEAN, LITE_STD, imagenet_classifier
    from edgexfer.exporters.onnx_export import export_onnx
    from edgexfer.exporters.quantize import Int8Recipe, quantize_int8
    from edgexfer.runtime.metadata import InputSpec, Preprocessing, Task

    pp = Preprocessing(resize=256, crop=224, mean=LITE_MEAN, std=LITE_STD)
    meta = ModelMeta(tasks=[Task("label", "logits", tuple(f"imagenet_{i}" for i in range(1000)))],
                     input=InputSpec("input", 224, 224, 3), preprocessing=pp, provenance={"backbone": "lite0"})
    d = tmp_path_factory.mktemp("imagenet")
    x = np.stack([preprocess(a, pp) for a in photos()[::4][:8]])
    export_onnx(imagenet_classifier(), meta, d / "model.onnx", x, atol=1e-3)
    quantize_int8(d / "model.onnx", d / "model.int8.onnx", x, Int8Recipe(calibration_samples=8))
    return {"fp32": d / "model.onnx", "int8": d / "model.int8.onnx"}


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_top1_and_probabilities_match_edgemodel_on_photos(imagenet_files, kind):
    from edgexfer.runtime.model import EdgeModel

    src = imagenet_files[kind]
    out = e2e.write(src)
    ref_model = EdgeModel(src, threads=2)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    imgs = photos()
    assert len(imgs) >= 40
    agree, worst = 0, 0.0
    for a in imgs:
        x = ref_model.preprocess(a)
        ref = ref_model.run(x)["label"][0]
        ref_p = np.exp(ref - ref.max())
        ref_p /= ref_p.sum()
        p, idx, _ = sess.run(None, {"image": a})
        agree += int(idx[0, 0] == ref_p.argmax())
        worst = max(worst, float(np.abs(p[0] - ref_p).max()))
    assert agree / len(imgs) >= MIN_TOP1_AGREEMENT, (agree, len(imgs), worst)
    print(f"{kind}: top-1 {agree}/{len(imgs)}, largest probability difference {worst:.4f}")
    assert worst <= PROB_ATOL[kind], worst


def test_edgemodel_predicts_with_the_e2e_file_when_current(tmp_path, imagenet_files, monkeypatch):
    import shutil

    from edgexfer.runtime.errors import MetadataError
    from edgexfer.runtime.model import EdgeModel

    src = tmp_path / "model.onnx"
    shutil.copy(imagenet_files["fp32"], src)
    imgs = photos()[:8]
    plain = EdgeModel(src, threads=2)
    ref = plain.predict(imgs, top_k=3)
    assert plain.e2e_used is False and "no model.e2e.onnx" in plain.e2e_why
    with pytest.raises(MetadataError, match="no model.e2e.onnx"):
        EdgeModel(src, e2e=True)
    e2e.write(src)
    m = EdgeModel(src, threads=2)
    got = m.predict(imgs, top_k=3)
    assert m.e2e_used is True
    assert [g[0]["index"] for g in got] == [r[0]["index"] for r in ref]
    assert all(abs(g[0]["score"] - r[0]["score"]) <= PROB_ATOL["fp32"] for g, r in zip(got, ref))
    assert m.predict(imgs[0], top_k=2)[0]["index"] == got[0][0]["index"]  # one image: one list
    assert EdgeModel(src, e2e=False).predict(imgs, top_k=3) == ref           # the reference on demand
    monkeypatch.setenv("EDGEXFER_E2E", "0")
    forced = EdgeModel(src)
    assert forced.predict(imgs, top_k=3) == ref and forced.e2e_used is False
    monkeypatch.delenv("EDGEXFER_E2E")
    # a re-exported source (other provenance): the stale end-to-end file is not used
    from edgexfer.exporters.metadata_io import read_meta, write_meta

    meta = read_meta(src)
    write_meta(src, type(meta)(**{**meta.__dict__, "provenance": {**meta.provenance, "created": "later"}}))
    stale = EdgeModel(src)
    assert stale.predict(imgs, top_k=3) == ref and stale.e2e_used is False and "another" in stale.e2e_why
    # evaluate writing the source's metrics keeps it current
    e2e.write(src)
    meta = read_meta(src)
    write_meta(src, type(meta)(**{**meta.__dict__, "metrics": {"accuracy": 0.5}}))
    again = EdgeModel(src)
    again.predict(imgs[0])
    assert again.e2e_used is True


def test_bundle_carries_the_e2e_file_and_labels(tmp_path):
    from edgexfer.exporters.e2e import write
    from edgexfer.runtime.bundle import bundle

    src = tmp_path / "m" / "model.onnx"
    src.parent.mkdir()
    src.write_bytes(onnx_bytes(good_meta(classes=3, side=8), classes=3, side=8))
    res = bundle(src, tmp_path / "out", write_e2e=write)  # as `edgexfer bundle` passes it where onnx is installed
    out = tmp_path / "out"
    assert res["e2e"] == "model.e2e.onnx" and (out / "model.e2e.onnx").is_file()
    assert (out / "labels.txt").read_text().split() == ["c0", "c1", "c2"]
    readme = (out / "README.md").read_text()
    for word in ("`image`", "uint8", "[H, W, 3]", "top_k_indices", "C/C++", "C#", "Kotlin", "Swift", "onnxruntime-node"):
        assert word in readme, word
    sess = ort.InferenceSession(str(out / "model.e2e.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(["probabilities"], {"image": _image(9, 12, 3)})[0].shape == (1, 3)


def test_run_writes_both_e2e_files(tiny_run, image_folder):
    """`edgexfer run` (export and quantize) leaves model.e2e.onnx and model.int8.e2e.onnx beside the plain
    files, current with them: EdgeModel predicts with them, the top-1 of the Python path."""
    from edgexfer.runtime.model import EdgeModel

    images = sorted(p for p in image_folder.rglob("*.png"))[::7][:12]
    for name in ("model.onnx", "model.int8.onnx"):
        assert e2e.e2e_path(tiny_run / name).is_file(), name
        m, ref = EdgeModel(tiny_run / name), EdgeModel(tiny_run / name, e2e=False)
        got, want = m.predict(images, top_k=1), ref.predict(images, top_k=1)
        assert m.e2e_used is True
        assert sum(g[0]["index"] == w[0]["index"] for g, w in zip(got, want)) >= 0.9 * len(images)
        # evaluate's figures are in the end-to-end file too (the web page shows them)
        props = ort.InferenceSession(str(e2e.e2e_path(tiny_run / name)),
                                     providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        assert ModelMeta.from_props(props).metrics == m.meta.metrics and m.meta.metrics.get("accuracy") is not None
    rep = json.loads((tiny_run / "report.json").read_text())
    assert rep["export"]["e2e"]["file"] == "model.e2e.onnx" and rep["quantize"]["e2e"]["file"] == "model.int8.e2e.onnx"


def test_bench_times_the_e2e_file_beside_the_plain_one(tmp_path):
    from edgexfer.runtime.bench import BenchConfig, e2e_comparison, run_benchmark, to_markdown

    src = tmp_path / "model.onnx"
    src.write_bytes(onnx_bytes(good_meta(classes=3, side=8), classes=3, side=8))
    cfg = BenchConfig(threads=1, warmup=1, iters=3, batches=(1,), cold_start=False, openvino=False, e2e_image=(30, 40))
    assert e2e_comparison(src, cfg) is None  # no end-to-end file: nothing to time
    e2e.write(src)
    r = e2e_comparison(src, cfg)
    assert set(r["latency_ms"]) == {"model_alone", "plain_plus_python_preprocessing", "e2e"}
    assert r["latency_ms"]["e2e"]["n"] == 3 and r["image_hw"] == [30, 40]
    res = run_benchmark([tmp_path], cfg)
    row = f"{tmp_path.name}/model.onnx"  # rows: the folder and the file
    assert list(res["models"]) == [row] and row in res["e2e"]  # the e2e file is no model row
    assert "model.e2e.onnx" in to_markdown(res)


# -- Node.js (examples/node) -------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "examples" / "node"


def node_missing() -> str | None:
    """Why the Node.js example cannot run here (None: it can)."""
    if shutil.which("node") is None:
        return "node is not installed (Debian: apt-get install nodejs npm; `make test` sets it up)"
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        return "examples/node has no node_modules (run `make node`, which `make test` runs: npm ci there)"
    return None


def write_photos(folder: Path, n_jpeg: int = 16) -> list[Path]:
    """The photos as PNG files and the first `n_jpeg` also as JPEG (Pillow, sharp in Node.js and Chromium all
    decode them with libjpeg-turbo: the same pixels)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, a in enumerate(photos()):
        im = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        paths.append(folder / f"photo{k:03d}.png")
        im.save(paths[-1])
        if k < n_jpeg:
            paths.append(folder / f"photo{k:03d}.jpg")
            im.convert("RGB").save(paths[-1], quality=92)
    return paths


def test_node_example_agrees_with_edgemodel(imagenet_files, tmp_path):
    why = node_missing()
    if why:
        pytest.skip(why)
    from edgexfer.runtime.model import EdgeModel

    src = imagenet_files["int8"]
    e2e.write(src)
    paths = write_photos(tmp_path / "photos")
    p = subprocess.run(["node", str(NODE_DIR / "classify.js"), str(src), *map(str, paths), "--top-k", "3"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["image"] for r in lines] == list(map(str, paths))
    ref = EdgeModel(src, threads=2, e2e=False).predict(paths, top_k=3)
    agree = sum(r["predictions"][0]["index"] == w[0]["index"] for r, w in zip(lines, ref))
    miss = [(r["image"], r["predictions"][:2], w[:2]) for r, w in zip(lines, ref) if r["predictions"][0]["index"] != w[0]["index"]]
    print(f"Node.js INT8: top-1 {agree}/{len(paths)} with EdgeModel's Python path", miss)
    assert agree / len(paths) >= MIN_TOP1_AGREEMENT, (agree, len(paths))
    # the same JSON as `edgexfer predict` on every photo, JPEG included: Python's end-to-end path runs the same
    # graph, and sharp decodes the pixels Pillow decodes
    mine = EdgeModel(src, threads=2).predict(paths, top_k=3)
    for line, m in zip(lines, mine):
        node = line["predictions"]
        assert [r["label"] for r in node] == [r["label"] for r in m], line["image"]
        assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(node, m)), (line["image"], node, m)
    assert set(lines[0]) == {"image", "predictions"} and set(lines[0]["predictions"][0]) == {"label", "index", "score"}
    bad = subprocess.run(["node", str(NODE_DIR / "classify.js"), str(src), str(tmp_path / "none.png")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.startswith("error:") and len(bad.stderr.splitlines()) == 1


# -- a real browser (examples/web, onnxruntime-web WASM, headless Chromium) ------------------------------------

WEB_DIR = ROOT / "examples" / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def web_missing() -> str | None:
    """Why the browser test cannot run here (None: it can)."""
    if CHROMIUM is None:
        return "no chromium binary (Debian: apt-get install chromium; `make test` sets it up)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[dev]')"
    if not (WEB_DIR / "vendor" / "ort.wasm.min.js").is_file():
        return "examples/web/vendor has no onnxruntime-web build (run `make web`, which `make test` runs)"
    return None


def serve_folder(folder: Path):
    """A static HTTP server on 127.0.0.1 for `folder`, in a thread: (base URL, server)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                          ".mjs": "text/javascript", ".js": "text/javascript", ".onnx": "application/octet-stream"}

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{httpd.server_address[1]}/", httpd


def test_browser_page_agrees_with_edgemodel(imagenet_files, tmp_path):
    """The page classifies the photos in headless Chromium (WASM); top-1 as EdgeModel's Python path.
    EDGEXFER_WEB_SCREENSHOT=1 keeps a screenshot at benchmarks/results/web_page.png."""
    why = web_missing()
    if why:
        pytest.skip(why)
    import os

    from playwright.sync_api import sync_playwright

    from edgexfer.runtime.model import EdgeModel

    src = imagenet_files["int8"]
    site = tmp_path / "site"
    shutil.copytree(WEB_DIR, site, ignore=shutil.ignore_patterns("node_modules"))
    e2e.write(src, site / "model.e2e.onnx")
    paths = write_photos(site / "photos")
    base, httpd = serve_folder(site)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 560})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: errors.append(f"off-site request {r.url}")
                    if not r.url.startswith(base) and not r.url.startswith(("blob:", "data:")) else None)
            page.goto(base + "index.html?images=" + ",".join(f"photos/{p.name}" for p in paths))
            page.wait_for_function("document.body.dataset.done === '1'", timeout=120_000)
            results = page.evaluate("window.edgexferResults")
            if os.environ.get("EDGEXFER_WEB_SCREENSHOT"):
                page.screenshot(path=str(ROOT / "benchmarks" / "results" / "web_page.png"))
            card = page.inner_text("#card")
            browser.close()
    finally:
        httpd.shutdown()
    assert not errors, errors
    assert isinstance(results, list) and len(results) == len(paths), results
    assert "1000 classes" in card and "INT8" in card
    ref = EdgeModel(src, threads=2, e2e=False).predict(paths, top_k=3)
    agree = sum(r["predictions"][0]["index"] == w[0]["index"] for r, w in zip(results, ref))
    miss = [(r["image"], r["predictions"][:2], w[:2]) for r, w in zip(results, ref)
            if r["predictions"][0]["index"] != w[0]["index"]]
    print(f"Chromium INT8: top-1 {agree}/{len(paths)} with EdgeModel's Python path", miss)
    assert agree / len(paths) >= MIN_TOP1_AGREEMENT, (agree, len(paths), miss)


def test_webpage_static_files(tmp_path, monkeypatch):
    """What `edgexfer serve` answers at / for the page (runtime.webpage.static_file): the page's own files
    by exact name, the first model's end-to-end file, nothing else."""
    from edgexfer.runtime import webpage

    web = tmp_path / "web"
    (web / "vendor").mkdir(parents=True)
    for name in ("index.html", "app.js", "onnx-meta.js", "vendor/ort.wasm.min.js", "vendor/ort-wasm-simd-threaded.wasm"):
        (web / name).write_text(name)
    monkeypatch.setenv(webpage.WEB_DIR_ENV, str(web))
    src = tmp_path / "model.onnx"
    src.write_bytes(onnx_bytes(good_meta(classes=3, side=8), classes=3, side=8))
    assert webpage.static_file("/", src) == (b"index.html", "text/html; charset=utf-8")
    assert webpage.static_file("/vendor/ort-wasm-simd-threaded.wasm", src)[1] == "application/wasm"
    assert webpage.static_file("/model.e2e.onnx", src) is None  # none beside the model yet
    e2e.write(src)
    assert webpage.static_file("/model.e2e.onnx", src)[0] == (tmp_path / "model.e2e.onnx").read_bytes()
    for path in ("/../model.onnx", "/vendor/../app.js", "/model.onnx", "/etc/passwd", "/vendor/"):
        assert webpage.static_file(path, src) is None, path
    (web / "vendor" / "ort.wasm.min.js").unlink()  # not vendored (`make web` not run): no page
    assert webpage.static_file("/", src) is None


def test_serve_answers_the_page_at_root(tiny_run, tmp_path, monkeypatch):
    """`edgexfer serve` (the stdlib adapter here) answers / with the page and /model.e2e.onnx with the first
    model's end-to-end file; the inference routes are unchanged, and other paths stay 404."""
    import threading
    import urllib.error
    import urllib.request

    from edgexfer.runtime import webpage
    from edgexfer.runtime.server import make_server, resolve_models

    web = tmp_path / "web"
    (web / "vendor").mkdir(parents=True)
    for name in ("index.html", "app.js", "onnx-meta.js", "vendor/ort.wasm.min.js"):
        (web / name).write_text(name)
    monkeypatch.setenv(webpage.WEB_DIR_ENV, str(web))
    httpd = make_server(resolve_models([tiny_run / "model.int8.onnx"]), port=0, threads=1)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with urllib.request.urlopen(base + "/") as r:
            assert r.read() == b"index.html" and r.headers["content-type"].startswith("text/html")
        with urllib.request.urlopen(base + "/model.e2e.onnx") as r:
            assert r.read() == (tiny_run / "model.int8.e2e.onnx").read_bytes()
        with urllib.request.urlopen(base + "/v2/health/ready") as r:
            assert json.loads(r.read()) == {"ready": True}
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/model.int8.onnx")
        assert e.value.code == 404
    finally:
        httpd.shutdown()
