"""Quantization-aware fine-tuning when post-training INT8 misses (issue 17 item 3): the QAT file exports, runs
in ONNX Runtime with INT8 kernels, has Q/DQ on every Conv and agrees with FP32; the quantize stage tries it
only when the trigger says so (forced here: the tiny run's plain INT8 meets the bound) and records guard.qat;
with --qat off it is never tried."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import run_cli
from edgexfer.runtime import EdgeModel

FAST = {"EDGEXFER_QAT_EPOCHS": "1", "EDGEXFER_QAT_VIEWS": "32", "EDGEXFER_GUARD_IMAGES": "200"}


@pytest.fixture
def fast():
    import edgexfer.qat as qat

    return qat


def test_qat_file_is_int8_in_ort_and_agrees(tiny_run, tmp_path, fast):
    import torch

    from edgexfer.evaluate import onnx_logits
    from edgexfer.exporters.quantize import recipe_for
    from edgexfer.runfolder import RunFolder, Workspace

    torch.set_num_threads(2)
    run = RunFolder(tiny_run)
    cfg = run.config()
    ws = Workspace(run, cfg)
    recipe, _ = recipe_for(cfg.quantize.target, cfg.quantize.recipe)
    xt, yt = ws.tensors("train")
    xv, _ = ws.tensors("val")
    out = tmp_path / "model.qat.int8.onnx"
    info = fast.make_qat_int8(tiny_run / "checkpoint.pt", tiny_run / "model.onnx", out, recipe, x_lab=xt, y_lab=yt,
                              x_unlab=xv[:0], calib=xt[:32], epochs=1)
    assert info["verify"]["ok"] and info["steps"] >= 1 and info["folded_batchnorms"] > 0
    # every Conv/Gemm reads DequantizeLinear on its input and its weight; weights are int8 per channel
    g = onnx.load(str(out)).graph
    prod = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type in ("Conv", "Gemm")]
    assert len(convs) == info["verify"]["weighted_layers"] > 40
    for n in convs:
        assert prod[n.input[0]].op_type == "DequantizeLinear" and prod[n.input[1]].op_type == "DequantizeLinear", n.name
    assert info["verify"]["ort_int8_kernels"] == len(convs) and info["verify"]["ort_float_weighted"] == 0
    # the artifact carries its contract: the FP32 file's labels and preprocessing, its own quantization record
    m, fp = EdgeModel(out), EdgeModel(tiny_run / "model.onnx")
    assert m.meta.labels == fp.meta.labels and m.meta.preprocessing == fp.meta.preprocessing and not m.meta.metrics
    q = m.meta.quantization
    assert q["method"] == "qat" and q["source_file"] == "model.onnx" and q["per_channel"] and q["qat"]["epochs"] == 1
    # it agrees with FP32's top-1 on most of the tiny run's images
    x = np.concatenate([xt, xv])
    agree = np.mean(onnx_logits(out, x)[0].argmax(1) == onnx_logits(tiny_run / "model.onnx", x)[0].argmax(1))
    assert agree >= 0.9, agree


def _quantize(run, *args, force):
    env = {**FAST, **({"EDGEXFER_QAT_FORCE": "1"} if force else {})}
    return run_cli("quantize", run, "--tuner", "builtin", "--calibration-samples", "32", *args, env=env, check=True)


def test_stage_tries_qat_when_forced_and_records_it(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _quantize(run, force=True)
    rep = json.loads((run / "report.json").read_text())
    qat = rep["quantize"]["guard"]["qat"]
    assert qat["tried"] and "forced" in qat["reason"]
    assert qat["verify"]["ok"] and qat["epochs"] == 1 and qat["seconds"] > 0
    assert 0.0 <= qat["agreement"] <= 1.0 and set(qat["speedup"]) == {"ptq", "qat"}
    assert isinstance(qat["chosen"], bool) and qat["why"]
    shipped = EdgeModel(run / "model.int8.onnx").meta.quantization
    assert (shipped.get("method") == "qat") == qat["chosen"]  # the file says what it is
    assert not list(run.glob(".qat-*"))  # its temporaries are gone


def test_qat_off_is_never_tried_and_plain_int8_skips_it(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _quantize(run, "--qat", "off", force=True)
    qat = json.loads((run / "report.json").read_text())["quantize"]["guard"]["qat"]
    assert qat == {"tried": False, "reason": "--qat off"}
    assert json.loads((run / "config.json").read_text())["quantize"]["qat"] == "off"
    _quantize(run, force=False)  # auto: the tiny run's plain INT8 meets the bound, so QAT cannot be faster
    g = json.loads((run / "report.json").read_text())["quantize"]["guard"]
    if g["within_bound"] and g["chosen_fp32_layers"] == 0:
        assert not g["qat"]["tried"] and "plain INT8" in g["qat"]["reason"]
    else:  # tried, or the PTQ choice is fast enough, or no file could be proven on the tiny run's few images
        assert g["qat"]["tried"] or "at least" in g["qat"]["reason"] or g["qat"].get("unprovable")


def test_unprovable_says_when_no_file_could_be_proven():
    from edgexfer.guard import unprovable, wilson_upper

    assert unprovable(1000, 0.01) is None  # 0 of 1000: the 95% upper bound is 0.38%
    u = unprovable(105, 0.01)  # aerial-dev's certify half: 0 of 105 is at most 3.5%
    assert u["upper95_at_zero"] == pytest.approx(wilson_upper(0.0, 105)) and u["upper95_at_zero"] > 0.03
    need = u["images_needed"]
    assert wilson_upper(0.0, need) <= 0.01 < wilson_upper(0.0, need - 1)
    assert u["why"] == (f"even a file that never disagreed with FP32 on those 105 images would have a 95% upper bound "
                        f"of 3.5%, over the 1.0% bound (a certificate needs at least {need} images)")
    assert unprovable(5000, 0.01, fitted=True)["why"].startswith("the guard's images are ones the model was fitted")


class _Run:
    def __init__(self, path):
        self.path = path

    def file(self, name):
        return self.path / name


class _Ws:
    def tensors(self, split):
        return np.zeros((4, 3, 8, 8), np.float32), np.zeros(4, np.int64)


@pytest.mark.parametrize("within", [True, False])
def test_qat_is_not_trained_where_no_file_could_be_proven(tmp_path, monkeypatch, within):
    """QAT trains for minutes; where the images that would certify its file cannot prove any file (even one that
    never disagreed with FP32 there would be over the bound at 95%), it sits out and says why, after the speed
    rules; EDGEXFER_QAT_FORCE=1 still forces it."""
    import dataclasses

    import edgexfer.qat as qat
    from edgexfer.config import RunConfig
    from edgexfer.guard import unprovable

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    monkeypatch.setattr(qat, "_latency", lambda paths, threads: {"fp32": 1.0, "ptq": 1.0})  # the PTQ choice: 1.0x
    trained = []
    monkeypatch.setattr(qat, "training_images", lambda *a, **k: trained.append(1) or (_ for _ in ()).throw(RuntimeError("trains")))
    cfg = RunConfig()
    guard = {"within_bound": within, "chosen_fp32_layers": 6}
    no = unprovable(21, cfg.max_accuracy_drop)
    entry, shipped = qat.compete(_Run(tmp_path), cfg, _Ws(), tmp_path / "model.onnx", None, None, guard, None,
                                 no_proof=no)
    assert shipped is None and not entry["tried"] and entry["unprovable"] == no and entry["ptq_speedup"] == 1.0
    assert entry["reason"].startswith("no QAT file could be proven within the bound on the 21 images that would "
                                      "certify it: even a file that never disagreed with FP32 on those 21 images")
    assert not trained
    with pytest.raises(RuntimeError, match="trains"):  # without it, or forced, it goes on to train
        qat.compete(_Run(tmp_path), cfg, _Ws(), tmp_path / "model.onnx", None, None, guard, None)
    forced = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, qat_force=True))
    with pytest.raises(RuntimeError, match="trains"):
        qat.compete(_Run(tmp_path), forced, _Ws(), tmp_path / "model.onnx", None, None, guard, None, no_proof=no)
    assert len(trained) == 2


def test_the_search_is_skipped_where_no_file_could_be_proven():
    """The post-training search's reason not to run: `unprovable` on the images that would certify its choice
    (half the unseen ones), with about how many more unseen images (--guard-data) would let plain INT8, certified
    on all of them where there is no search, be proven; and whether the guard's limits hold that many."""
    from edgexfer.config import RunConfig
    from edgexfer.guard import unprovable, wilson_upper
    from edgexfer.quantize_stage import search_skipped

    cfg = RunConfig()
    info = {"labelled": 210, "images": 1000, "bytes": 1000 * 4 * 3 * 224 * 224, "max_bytes": 768 * 2**20}
    assert search_skipped(500, 1000, cfg, info) is None
    s = search_skipped(105, 210, cfg, info)
    need = unprovable(105, cfg.max_accuracy_drop)["images_needed"]
    assert s["images"] == 105 and s["images_needed"] == need and s["unseen"] == 210
    assert s["more_images_needed"] == need - 210 and wilson_upper(0.0, 210 + s["more_images_needed"]) <= 0.01
    assert f"about {s['more_images_needed']} more unlabelled photos of the domain (--guard-data DIR)" in s["why"]
    assert "EDGEXFER_SEARCH_UNPROVABLE=1" in s["why"] and "guard holds at most" not in s["why"]
    assert s["short"].startswith("not searched: no INT8 file can be proven on the 105 images that would certify")
    assert "in the --adapt-bn folder" in search_skipped(105, 210, cfg, info, adapted=True)["why"]
    # a stricter bound needs more images than the guard holds at its default limits: it says so
    strict = __import__("dataclasses").replace(cfg, max_accuracy_drop=0.002)
    assert "the guard holds at most 1210 unseen images" in search_skipped(105, 210, strict, info)["why"]
    # once plain INT8's rate on them is known: within the bound, the certificate that rate needs; over it, about
    # twice the certificate a file with no disagreement needs, since a search's choice is certified on half
    from edgexfer.guard import CERTIFY_SHARE, images_needed

    at = search_skipped(105, 210, cfg, info, rate=0.005)
    assert at["more_images_needed"] == images_needed(0.005, 0.01, 210) - 210 and "at the rate it measured (0.5%)" in at["why"]
    over = search_skipped(105, 210, cfg, info, rate=0.025)
    assert over["more_images_needed"] == int(np.ceil(need / CERTIFY_SHARE)) + 2 - 210
    assert "plain INT8 disagrees with FP32 on 2.5% of them, over the bound" in over["why"]
    assert search_skipped(105, 800, cfg, info, rate=0.0)["short"].endswith("they prove plain INT8")
    fitted = search_skipped(5000, 5000, cfg, {**info, "fitted": True})
    assert fitted["more_images_needed"] is None and "(--guard-data DIR) would let a file be proven" in fitted["why"]


@pytest.mark.parametrize("proven", [False, True])
def test_a_proven_ptq_file_is_not_replaced_by_an_unproven_qat_file(tmp_path, monkeypatch, proven):
    """QAT that is within the bound and faster replaces the PTQ choice, unless the PTQ choice is proven and the QAT
    file's own certificate does not prove it (`proves`): a user who had a proven file keeps one."""
    import edgexfer.exporters.metadata_io as mio
    import edgexfer.qat as qat
    from edgexfer.config import RunConfig

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "model.int8.onnx").write_bytes(b"ptq")
    monkeypatch.setattr(qat, "_latency", lambda paths, threads: {"fp32": 1.0, "ptq": 1.0, "qat": 0.5})
    monkeypatch.setattr(qat, "training_images", lambda *a, **k: (np.zeros((4, 3, 8, 8), np.float32), np.zeros(4, np.int64),
                                                            np.zeros((0, 3, 8, 8), np.float32)))
    monkeypatch.setattr(qat, "make_qat_int8", lambda ckpt, fp32, q, *a, **k: Path(q).write_bytes(b"qat") and {})
    monkeypatch.setattr(mio, "read_meta", lambda p: type("M", (), {"quantization": {"method": "qat"}})())
    asked = []
    judge = lambda q: {"guard_accuracy": 1.0, "within_bound": True}  # noqa: E731
    guard = {"within_bound": True, "chosen_fp32_layers": 6}
    entry, shipped = qat.compete(_Run(tmp_path), RunConfig(), _Ws(), tmp_path / "model.onnx", None, None, guard,
                                 judge, proves=lambda q: asked.append(q) or proven)
    assert entry["tried"] and len(asked) == 1 and entry["chosen"] is proven
    assert (tmp_path / "model.int8.onnx").read_bytes() == (b"qat" if proven else b"ptq")
    if not proven:
        assert shipped is None and "a proven file is not replaced by an unproven one" in entry["why"]
