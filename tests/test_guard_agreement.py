"""The INT8 guard decides on label-free INT8/FP32 top-1 agreement over many images (issue 12 item 3): a
one-image flip on a tiny validation split does not reject INT8, many disagreements do even when validation
accuracy is unchanged, and report.json / report.md say how sure the guard is."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from edgexfer.exporters.quantize import Int8Recipe
from edgexfer.guard import Judge, Scorer, agreement_judge, guard_decision, guarded_quantize, paired_drop, wilson_upper
from edgexfer.runtime import EdgeModel


def _one_hot(idx, classes=3):
    return np.eye(classes, dtype=np.float32)[idx]


def _kept(path) -> int:
    return len(EdgeModel(path).meta.quantization["nodes_to_exclude"])


def test_statistics():
    y = np.array([0, 1, 2, 0])
    ref = [_one_hot(y)]
    flip = [_one_hot([0, 1, 2, 1])]  # INT8 wrong on one image of 4
    drop, se = paired_drop(ref, flip, y)
    assert drop == pytest.approx(0.25) and se == pytest.approx(np.sqrt((0.25 - 0.0625) / 4))
    assert paired_drop(ref, ref, y) == (0.0, 0.0)
    gain = [_one_hot([0, 1, 2, 0])]
    assert paired_drop([_one_hot([1, 1, 2, 0])], gain, y)[0] == pytest.approx(-0.25)
    # several tasks: each over its labelled images (-1: unlabelled), averaged
    y2 = np.array([[0, -1], [1, 1], [2, 0], [0, 1]])
    d, s = paired_drop([_one_hot(y2[:, 0]), _one_hot([0, 1, 0, 1])], [_one_hot(y2[:, 0]), _one_hot([0, 0, 0, 1])], y2)
    assert d == pytest.approx((0 + 1 / 3) / 2) and s > 0
    # Wilson 95%: 50 of 100 -> (0.404, 0.596); 0 of 1000 is not 0
    assert wilson_upper(0.5, 100) == pytest.approx(0.5962, abs=1e-4)
    assert 0.0035 < wilson_upper(0.0, 1000) < 0.0040 and wilson_upper(0.0, 0) == 1.0


def test_decision_one_flip_is_noise_many_losses_are_evidence():
    # agreement within the bound, one flip of 4 labelled images: ships
    drop, se = paired_drop([_one_hot([0, 1, 2, 0])], [_one_hot([0, 1, 2, 1])], np.array([0, 1, 2, 0]))
    assert guard_decision(0.004, 0.01, drop, se)[0] is True
    # agreement over the bound: rejected, whatever validation says
    assert guard_decision(0.05, 0.01, 0.0, 0.0)[0] is False
    assert guard_decision(0.05, 0.01)[0] is False
    # 10 losses and no gains on 30 labelled images: a significant drop rejects even with agreement in bound
    y = np.zeros(30, np.int64)
    drop, se = paired_drop([_one_hot(y)], [_one_hot(np.r_[np.ones(10, int), np.zeros(20, int)])], y)
    ok, why = guard_decision(0.009, 0.01, drop, se)
    assert not ok and "standard errors" in why


def test_guard_ships_plain_int8_on_agreement_despite_one_flip(tiny_run, tmp_path):
    """The search on injected scores: plain INT8 agrees with FP32 on 99.9% of the agreement set, and flips
    one of 4 validation images (a 25-point 'drop'). It ships with 0 layers kept; the old rule (labelled
    validation accuracy against FP32's, within 1 point) would have kept layers in FP32."""
    calib = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    drop, se = paired_drop([_one_hot([0, 1, 2, 0])], [_one_hot([0, 1, 2, 1])], np.array([0, 1, 2, 0]))

    def evidence(path):  # every candidate flips the same validation image
        return {"val_accuracy": 0.75, "val_drop": drop, "val_drop_se": se}

    rec = guarded_quantize(tiny_run / "model.onnx", tmp_path / "q.onnx", calib, Int8Recipe(calibration_samples=8),
                           agreement_judge(lambda p: 0.999, 0.01, evidence=evidence))
    g = rec["guard"]
    assert g["within_bound"] and g["chosen_fp32_layers"] == 0 and len(g["candidates"]) == 1
    c = g["candidates"][0]
    assert c["val_drop"] == pytest.approx(0.25) and c["drop"] == pytest.approx(0.001) and c["within_bound"]
    # the old rule, for contrast: validation accuracy decides, and one flip is over the bound
    old = guarded_quantize(tiny_run / "model.onnx", tmp_path / "old.onnx", calib, Int8Recipe(calibration_samples=8),
                           Judge([Scorer("accuracy", lambda p: 0.75, "decides", 1.0)], 0.01), steps=(0, 1))
    assert not old["guard"]["candidates"][0]["within_bound"]


def test_guard_rejects_many_disagreements_with_unchanged_validation(tiny_run, tmp_path):
    """Plain INT8 disagrees with FP32 on 5% of the agreement set while validation accuracy is unchanged:
    rejected; keeping one layer in FP32 brings agreement within the bound, and that ships."""
    calib = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    rec = guarded_quantize(tiny_run / "model.onnx", tmp_path / "q.onnx", calib, Int8Recipe(calibration_samples=8),
                           agreement_judge(lambda p: 0.95 if _kept(p) == 0 else 0.999, 0.01,
                                           evidence=lambda p: {"val_accuracy": 1.0, "val_drop": 0.0, "val_drop_se": 0.0}))
    g = rec["guard"]
    assert [c["within_bound"] for c in g["candidates"]] == [False, True]
    assert "over" in g["candidates"][0]["decision"] and g["chosen_fp32_layers"] == 1 and _kept(tmp_path / "q.onnx") == 1


class _FakeWorkspace:
    """What `agreement_set` reads of a Workspace: cached tensors and the data set's images."""

    def __init__(self, n_train=6, n_val=2, size=16, seed=0):
        from edgexfer.runtime.metadata import Preprocessing
        from edgexfer.runtime.preprocess import preprocess

        rng = np.random.default_rng(seed)
        self.preprocessing = Preprocessing(resize=size, crop=size)
        imgs = [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(n_train + n_val)]
        self.dataset = SimpleNamespace(train=SimpleNamespace(images=imgs[:n_train]),
                                       val=SimpleNamespace(images=imgs[n_train:]))
        x = np.stack([preprocess(im, self.preprocessing) for im in imgs])
        self._t = {"train": (x[:n_train], np.zeros(n_train)), "val": (x[n_train:], np.zeros(n_val))}

    def tensors(self, split):
        return self._t[split]


def test_agreement_set_holds_only_images_the_model_was_not_fitted_on():
    """Issue 23: the guard scores no image the model was fitted on. Out of fold (the cross-validated probe,
    refitted on every labelled image): all labelled images; else the validation split only; unlabelled images
    of the domain always; then seeded views of the labelled ones, each row naming the image it shows."""
    from edgexfer.guard import agreement_set, describe

    ws = _FakeWorkspace()
    x, rows, info = agreement_set(ws, seed=3, out_of_fold=True, min_images=40)
    assert x.shape == (40, 3, 16, 16) and x.dtype == np.float32 and rows.shape == (40,)
    assert (info["labelled"], info["unlabelled"], info["augmented"]) == (8, 0, 32) and info["bytes"] == x.nbytes
    assert info["labelled_from"] == "out-of-fold" and not info["fitted"] and info["unseen"] == 8
    np.testing.assert_array_equal(x[:6], ws.tensors("train")[0])
    np.testing.assert_array_equal(x[6:8], ws.tensors("val")[0])
    np.testing.assert_array_equal(rows[:8], np.arange(8))
    assert sorted(np.bincount(rows[8:])) == [4] * 8  # 32 views, 4 of each labelled image, named by their image
    assert not any(np.array_equal(x[j], x[i]) for j in range(8, 40) for i in range(8))  # views, not copies
    again, again_rows, _ = agreement_set(ws, seed=3, out_of_fold=True, min_images=40)
    np.testing.assert_array_equal(x, again)  # seeded
    np.testing.assert_array_equal(rows, again_rows)
    assert "8 labelled, out-of-fold" in describe(info) and "32 augmented" in describe(info)
    # no fold heads: the training images were fitted on, so only the validation split (and views of it)
    x, rows, info = agreement_set(ws, seed=3, min_images=40)
    assert (info["labelled"], info["augmented"], info["labelled_from"]) == (2, 38, "validation")
    np.testing.assert_array_equal(x[:2], ws.tensors("val")[0])
    assert set(rows) == {6, 7}
    # the unlabelled images come before any augmentation, all of them (a minimum, not a cap), each its own image
    u = np.ones((5, 3, 16, 16), np.float32)
    x, rows, info = agreement_set(ws, u, out_of_fold=True, min_images=10)
    assert (info["labelled"], info["unlabelled"], info["augmented"]) == (8, 5, 0) and len(x) == 13
    np.testing.assert_array_equal(rows[8:], 8 + np.arange(5))
    x, rows, info = agreement_set(ws, u, out_of_fold=True, min_images=20)
    assert (info["labelled"], info["unlabelled"], info["augmented"]) == (8, 5, 7) and (x[8:13] == 1).all()
    # the memory bound wins: a seeded sample of the labelled images, nothing added
    x, rows, info = agreement_set(ws, u, out_of_fold=True, min_images=40, max_bytes=5 * 3 * 16 * 16 * 4)
    assert len(x) == 5 and (info["labelled"], info["unlabelled"], info["augmented"]) == (5, 0, 0)
    assert info["labelled_available"] == 8 and "a sample of 8" in describe(info)
    # nothing held out at all: the training images, and the record says they were fitted on
    ws = _FakeWorkspace(n_val=0)
    x, rows, info = agreement_set(ws, min_images=10)
    assert info["fitted"] and info["unseen"] == 0 and info["labelled_from"] == "train" and len(x) == 10
    assert "fitted on" in describe(info)


def test_quantize_stage_decides_on_agreement_and_reports_it(tiny_run, tmp_path, monkeypatch):
    """The quantize stage with the built-in search on a copy of the tiny run, agreement measured for real
    on 200 images and the labelled evidence injected (one flip of 4 validation images, for every
    candidate): INT8 ships with 0 layers kept, and report.json / report.md say how sure the guard is."""
    import dataclasses

    import edgexfer.guard as guard
    from edgexfer.pipeline import quantize
    from edgexfer.report import report_md

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    drop, se = paired_drop([_one_hot([0, 1, 2, 0])], [_one_hot([0, 1, 2, 1])], np.array([0, 1, 2, 0]))
    monkeypatch.setattr(guard.Agreement, "evidence",
                        lambda self, path: {"val_accuracy": 0.75, "val_drop": drop, "val_drop_se": se})
    from edgexfer.pipeline import RunFolder

    cfg = RunFolder(run).config()
    cfg.quantize = dataclasses.replace(cfg.quantize, tuner="builtin", guard_images=200)
    quantize(run, cfg)
    rep = json.loads((run / "report.json").read_text())
    g = rep["quantize"]["guard"]
    val = rep["data"]["val"]  # the tiny run fine-tunes (lpft): its validation split is what it was not fitted on
    info = g["agreement_set"]
    u = info["unlabelled"]  # the labelled images --shots left out, never fitted
    assert info["images"] == 200 and info["augmented"] == 200 - val - u and info["labelled"] == val
    assert info["labelled_from"] == "validation" and g["guard_set"].startswith("200 images")
    d = g["disagreement"]
    first = g["candidates"][0]  # plain INT8: agreement alone decides, the 25-point validation flip does not
    assert first["fp32_layers"] == 0 and first["within_bound"] == (first["drop"] <= 0.01)
    if d["rate"] <= 0.01:  # the tiny model's INT8 agrees (it does on the shapes): ships plain INT8
        assert g["within_bound"] and g["chosen_fp32_layers"] == 0
    if info["certified"]:  # half the images chose among the candidates, the other half certify the choice
        assert abs(d["images"] - (val + u) / 2) <= 1 and d["rows"] < 200
        assert "held out of the search that chose the file" in g["confidence"]
    else:  # too few to split: the record says the figures are the search's own
        assert d["images"] == val + u and d["rows"] == 200 and "biased low" in info["certified_on"]
    assert d["rate"] <= d["upper95"] <= 1
    assert g["proven"] is False  # a dozen unseen images cannot prove a 1% bound, whatever they show
    assert g["validation"]["drop"] == pytest.approx(0.25) and g["validation"]["drop_se"] == pytest.approx(se)
    assert f"of {d['images']} images the model was not fitted on" in g["confidence"] and "95% confidence" in g["confidence"]
    md = report_md(rep)
    assert "How sure: INT8 gives FP32's top-1" in md and "agreement with FP32 (decides)" in md


def test_tiny_run_reports_how_sure_the_guard_is(tiny_run):
    """The whole `edgexfer run` (INC when .venv-inc is there, else the built-in search) records it too."""
    rep = json.loads((tiny_run / "report.json").read_text())
    g = rep["quantize"]["guard"]
    info = g["agreement_set"]
    assert info["images"] == info["labelled"] + info["unlabelled"] + info["augmented"] >= 1000
    assert info["labelled"] == rep["data"]["val"] and info["labelled_from"] == "validation"  # lpft: train is fitted
    unseen = rep["data"]["val"] + info["unlabelled"]
    assert g["disagreement"]["images"] == (round(rep["data"]["val"] / 2) + round(info["unlabelled"] / 2)
                                           if info["certified"] else unseen)
    assert info["unlabelled"] == min(rep["data"]["labelled_left_out"], 1000)  # --shots left them out: unseen
    assert 0 <= g["disagreement"]["rate"] <= g["disagreement"]["upper95"] <= 1
    v = g["validation"]
    assert v["images"] == rep["data"]["val"] and v["held_out_as"] == "validation" and v["drop_se"] >= 0
    assert g["confidence"] and g["decides_on"].startswith("top-1 agreement")
    assert "How sure:" in (tiny_run / "report.md").read_text()


def test_target_set_is_the_target_images_then_views_of_them():
    """After --adapt-bn is kept the agreement set is the target domain's: its images first, all of them, then
    seeded augmented views of the target images (never the source's labelled images)."""
    from edgexfer.guard import describe, target_set
    from edgexfer.runtime.metadata import Preprocessing
    from edgexfer.runtime.preprocess import preprocess

    pp = Preprocessing(resize=16, crop=16)
    rng = np.random.default_rng(1)
    files = [rng.integers(0, 255, (20, 24, 3), dtype=np.uint8) for _ in range(5)]
    xt = np.stack([preprocess(f, pp) for f in files])
    x, rows, info = target_set(xt, files, pp, seed=2, min_images=12)
    assert x.shape == (12, 3, 16, 16) and info["domain"] == "target"
    assert sorted(np.bincount(rows)) == [2, 2, 2, 3, 3]  # each file once, and its views, named by file
    assert (info["labelled"], info["unlabelled"], info["augmented"]) == (0, 5, 7)
    np.testing.assert_array_equal(x[:5], xt)
    assert not any(np.array_equal(x[j], x[i]) for j in range(5, 12) for i in range(5))  # views, not copies
    np.testing.assert_array_equal(x, target_set(xt, files, pp, seed=2, min_images=12)[0])  # seeded
    assert describe(info) == "12 images of the target domain (--adapt-bn kept): 5 unlabelled, 7 augmented views of them"
    x, _, info = target_set(xt, files, pp, min_images=3)  # a minimum, not a cap
    assert len(x) == 5 and info["augmented"] == 0
    x, _, info = target_set(xt, files, pp, min_images=40, max_bytes=4 * 3 * 16 * 16 * 4)  # the memory bound wins
    assert len(x) == 4 and info["augmented"] == 0


def _sign_model(path, gain: float) -> None:
    """An ONNX classifier of two classes: logits (g*m, -g*m), m the input's mean over channels and pixels."""
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["m4"], axes=[1, 2, 3], keepdims=1),
         helper.make_node("Flatten", ["m4"], ["m"], axis=1), helper.make_node("Mul", ["m", "gain"], ["pos"]), helper.make_node("Neg", ["pos"], ["neg"]),
         helper.make_node("Concat", ["pos", "neg"], ["logits"], axis=1)], "sign",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("gain", TensorProto.FLOAT, [], [gain])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_fp32_stability_finds_a_model_that_half_a_pixel_level_flips(tmp_path):
    """FP32 against itself under +-half-a-level pixel noise: a model deciding on the sign of the mean pixel
    repeats itself on images far from its boundary and not on images a fraction of a level from it."""
    from edgexfer.guard import fp32_stability
    from edgexfer.runtime.metadata import Preprocessing

    pp = Preprocessing(resize=8, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    _sign_model(tmp_path / "m.onnx", 1.0)
    rng = np.random.default_rng(0)
    offset = rng.choice([-1.0, 1.0], 200)[:, None, None, None]
    far = np.broadcast_to(offset * 0.5, (200, 3, 8, 8)).astype(np.float32)  # a mean 32 levels from the boundary
    near = (far * 1e-4).astype(np.float32)  # 0.003 levels from it: the noise's mean flips it often
    s = fp32_stability(tmp_path / "m.onnx", far, pp)
    assert s["agreement"] == 1.0 and s["images"] == 200 and s["grey_images"] == 200
    s = fp32_stability(tmp_path / "m.onnx", near, pp)
    assert 0.2 < s["agreement"] < 0.8
    # grey images get the same noise on every channel: a model of the channel difference sees none
    colour = near.copy()
    colour[:, 0] += 0.4
    assert fp32_stability(tmp_path / "m.onnx", colour, pp)["grey_images"] == 0
