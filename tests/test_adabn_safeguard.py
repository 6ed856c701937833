"""--adapt-bn cannot hurt silently: label-free checks on the target images decide whether AdaBN's
statistics are kept, a harmful adaptation is reverted (warning, report.json, report.md), a benign one
kept, --adapt-bn-force keeps either; report.md gives INT8/FP32 agreement on the target images."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from edgexfer.adaptation import (collapsed, compare_target, decide, entropy, paired_accuracy_change,
                                 restore_batchnorm, save_batchnorm, softmax)
from tests.conftest import make_image, run_cli

LABELS = ["a", "b", "c"]


def _logits(top: np.ndarray, margin: float, k: int = 3) -> np.ndarray:
    """Logits whose top-1 is `top`, `margin` above the other classes (larger: surer)."""
    lg = np.zeros((len(top), k))
    lg[np.arange(len(top)), top] = margin
    return lg


# -- the measures and the rule ----------------------------------------------------------------------

def test_paired_change_counts_only_the_images_that_flipped():
    before = np.array([1] * 20 + [0] * 10, bool)
    after = before.copy()
    after[0] = False  # one image broken
    c = paired_accuracy_change(before, after)
    assert (c["fixed"], c["broken"], c["images"]) == (0, 1, 30)
    assert c["change"] == pytest.approx(-1 / 30)
    assert c["stderr"] == pytest.approx(np.sqrt((1 / 30 - (1 / 30) ** 2) / 30))
    same = paired_accuracy_change(before, before)
    assert same["change"] == 0 and same["stderr"] == 0


def test_measures_on_the_target():
    p = softmax(np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]]))
    assert entropy(p) == pytest.approx([np.log(3), 0.0], abs=1e-3)
    top = np.arange(60) % 3
    t = compare_target(_logits(top, 6.0), _logits(np.zeros(60, int), 1.0), LABELS)
    assert t["before"]["histogram"] == {"a": 20, "b": 20, "c": 20}
    assert t["after"]["largest_class"] == "a" and t["after"]["largest_class_share"] == 1.0
    assert t["top1_agreement"] == pytest.approx(1 / 3)
    assert t["entropy_change"] > 0 and t["after"]["mean_max_probability"] < t["before"]["mean_max_probability"]
    assert collapsed(t)


def _target(before_margin, after_margin, n=60, after_top=None):
    top = np.arange(n) % 3
    return compare_target(_logits(top, before_margin), _logits(top if after_top is None else after_top, after_margin),
                          LABELS)


def _source(n, broken, fixed=0):
    before = np.array([True] * (n - fixed) + [False] * fixed)
    after = before.copy()
    after[:broken] = False
    after[n - fixed:] = True
    return paired_accuracy_change(before, after)


def test_entropy_rise_reverts_and_force_keeps():
    t = {"label": _target(6.0, 1.0)}  # the same top-1, far less sure on the target
    d = decide(_source(30, 0), t)
    assert not d["kept"] and not d["forced"] and any("less sure" in r for r in d["reasons"])
    assert d["checks_passed"]  # what did not object is still said
    f = decide(_source(30, 0), t, force=True)
    assert f["kept"] and f["forced"] and f["reasons"] == d["reasons"]


def test_a_small_entropy_rise_is_within_the_floor():
    top = np.arange(60) % 3
    before = _logits(top, 6.0)
    after = before.copy()
    after[np.arange(60), (top + 1) % 3] += 0.6  # each image a little less sure: clear in s.e., under the floor
    d = decide(_source(30, 0), {"label": compare_target(before, after, LABELS)})
    assert d["kept"] and any("under the" in r for r in d["reasons"])


def test_collapse_reverts():
    d = decide(None, {"label": _target(3.0, 6.0, after_top=np.where(np.arange(60) < 50, 0, np.arange(60) % 3))})
    assert not d["kept"] and any("collapsed" in r for r in d["reasons"])
    # a few images more in one class on a small target folder is noise, not a collapse
    few = _target(3.0, 3.0, n=12, after_top=np.array([0] * 6 + [1, 2] * 3))
    assert not collapsed(few)


def test_source_drop_reverts_only_beyond_noise_and_without_a_target_gain():
    flat = {"label": _target(3.0, 3.0)}
    assert decide(_source(30, 1), flat)["kept"]            # one image of 30: noise
    assert not decide(_source(30, 12), flat)["kept"]       # 12 broken, none fixed: beyond 2 s.e.
    gain = {"label": _target(1.0, 6.0)}                    # the target got surer: the drop is AdaBN's price
    d = decide(_source(30, 12), gain)
    assert d["kept"] and any("paid for" in r for r in d["reasons"])
    # 16 of 2000 images: beyond 2 s.e. (0.4 points) but under the 1-point floor; 60 of 2000: beyond both
    assert decide(_source(2000, 16), flat)["kept"]
    assert not decide(_source(2000, 60), flat)["kept"]


def test_restore_puts_back_the_unadapted_statistics_bit_for_bit():
    from edgexfer.finetune import adapt_batchnorm
    from tests.test_transfer import _Blocks
    from edgexfer.model import EdgeNet

    torch.manual_seed(0)
    model = EdgeNet(_Blocks(), 4, {"a": 3})
    adapt_batchnorm(model, torch.randn(32, 3, 8, 8))
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    saved = save_batchnorm(model)
    adapt_batchnorm(model, torch.randn(32, 3, 8, 8) * 3 + 5)
    assert not all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())
    restore_batchnorm(model, saved)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ref.items())


def test_fragility_warns_only_on_a_real_loss_of_stability():
    from edgexfer.adaptation import fragility

    def st(a, n=256):
        return {"agreement": a, "images": n}

    assert fragility(st(0.99), st(0.53)) and "47.0% of 256 images" in fragility(st(0.99), st(0.53))
    assert "unadapted: 1.0%" in fragility(st(0.99), st(0.53))
    assert fragility(st(0.99), st(0.96)) is None  # steady enough
    assert fragility(st(0.90), st(0.89)) is None  # no steadier before: not AdaBN's doing
    assert fragility(st(0.95), st(0.93, n=20)) is None  # within noise on 20 images


# -- end to end: a harmful shift is reverted, a benign one kept -------------------------------------

def _target_folder(path, fn, n=60, seed=7):
    path.mkdir()
    rng, g = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    for i in range(n):
        a = np.asarray(make_image(i % 3, rng)).astype(np.float64)
        Image.fromarray(np.clip(fn(a, g), 0, 255).astype(np.uint8)).save(path / f"{i:03d}.png")
    return path


def _target_entropy(run, folder) -> float:
    """The mean prediction entropy of the saved checkpoint on the target images."""
    from edgexfer.data import list_images
    from edgexfer.finetune import predict_logits
    from edgexfer.model import load_checkpoint, preprocessing_of
    from edgexfer.runtime.preprocess import preprocess

    model, mcfg, _ = load_checkpoint(run / "checkpoint.pt")
    x = torch.from_numpy(np.stack([preprocess(p, preprocessing_of(mcfg)) for p in list_images(folder)]))
    return float(entropy(softmax(predict_logits(model, x).numpy().astype(np.float64))).mean())


ARGS = ("--image-size", "64", "--strategy", "linear", "--backbone", "efficientnet_lite0")


def test_harmful_adaptation_is_reverted_loudly_and_force_keeps_it(image_folder, tmp_path):
    # half the target folder is blank white frames: statistics that fit no real target image
    target = _target_folder(tmp_path / "target", lambda a, g: np.full_like(a, 255) if g.random() < 0.5 else a)
    p = run_cli("finetune", "--data", image_folder, "--out", tmp_path / "r", *ARGS, "--adapt-bn", target, check=True)
    assert "ADAPTATION REVERTED" in p.stderr  # a warning (the default log level shows warnings only)
    ad = json.loads((tmp_path / "r" / "report.json").read_text())["adaptation"]
    assert ad["kept"] is False and ad["forced"] is False
    assert any("less sure on the target" in r for r in ad["reasons"])
    t = ad["target"]["label"]
    assert t["images"] == 60 and t["after"]["mean_entropy"] > t["before"]["mean_entropy"]
    # the checkpoint carries the unadapted statistics: its entropy on the target is the "before" one
    assert _target_entropy(tmp_path / "r", target) == pytest.approx(t["before"]["mean_entropy"], abs=1e-4)
    from edgexfer.report import checks, report_md

    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "**AdaBN REVERTED:" in report_md(rep)
    assert any(c["name"].startswith("AdaBN") and c["value"] == "reverted" and not c["ok"] for c in checks(rep, 0.01))

    p = run_cli("finetune", "--data", image_folder, "--out", tmp_path / "f", *ARGS, "--adapt-bn", target,
                "--adapt-bn-force", check=True)
    assert "KEPT BY --adapt-bn-force" in p.stderr
    ad = json.loads((tmp_path / "f" / "report.json").read_text())["adaptation"]
    assert ad["kept"] is True and ad["forced"] is True
    assert _target_entropy(tmp_path / "f", target) == pytest.approx(ad["target"]["label"]["after"]["mean_entropy"],
                                                                    abs=1e-4)
    # --adapt-bn-force changes the weights: a run folder made without it is not resumed with it
    cfg = json.loads((tmp_path / "f" / "config.json").read_text())
    assert cfg["train"]["adapt_bn_force"] is True


def test_benign_adaptation_is_kept_and_int8_judged_on_the_target(image_folder, tmp_path, monkeypatch):
    """A benign shift keeps AdaBN; then the quantize stage's agreement set is the target folder's images and
    views of them (not the source's labelled images, which the adapted model is no longer for), the source
    validation split does not vote, QAT distils on the target only (the search half's images: the certify half
    judges it), and FP32's own stability under
    half-a-level pixel noise is recorded beside the agreement."""
    target = _target_folder(tmp_path / "target", lambda a, g: a * 1.05 + 2)  # slightly brighter
    p = run_cli("finetune", "--data", image_folder, "--out", tmp_path / "r", *ARGS, "--adapt-bn", target, check=True)
    assert "REVERTED" not in p.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    ad = rep["adaptation"]
    assert ad["kept"] is True and ad["forced"] is False and ad["reasons"]
    assert "refit on train + val" in ad["source_validation"]["note"]  # the small split was also fitted: said
    assert _target_entropy(tmp_path / "r", target) == pytest.approx(ad["target"]["label"]["after"]["mean_entropy"],
                                                                    abs=1e-4)
    from edgexfer.report import report_md

    md = report_md(rep)
    assert "Domain adaptation: AdaBN" in md and "kept:" in md and "REVERTED" not in md
    assert "| label | 60 |" in md  # the label-free measures, before -> after
    st = ad["stability"]  # the model's own top-1 under half-a-level pixel noise, before and after
    assert st["images"] == 60 and 0 <= st["before"] <= 1 and 0 <= st["after"] <= 1 and "pixel level" in st["noise"]
    assert (st["warning"] is None) == ("Warning:** The adapted model" not in md)

    run = tmp_path / "r"
    run_cli("export", run, check=True)
    monkeypatch.setenv("EDGEXFER_GUARD_IMAGES", "90")
    monkeypatch.setenv("EDGEXFER_QAT_FORCE", "1")
    monkeypatch.setenv("EDGEXFER_QAT_EPOCHS", "1")
    monkeypatch.setenv("EDGEXFER_QAT_VIEWS", "8")
    run_cli("quantize", run, "--tuner", "builtin", check=True)
    rep = json.loads((run / "report.json").read_text())
    g = rep["quantize"]["guard"]
    info = g["agreement_set"]
    assert info["domain"] == "target" and info["labelled"] == 0
    assert (info["unlabelled"], info["augmented"], info["images"]) == (60, 30, 90)
    assert g["guard_set"].startswith("90 images of the target domain (--adapt-bn kept): 60 unlabelled")
    assert g["validation"] is None and "source domain" in g["confidence"]
    st = g["fp32_stability"]
    assert st["images"] == 90 and 0 <= st["agreement"] <= 1 and "0.5 of a pixel level" in st["noise"]
    q = g["qat"]
    # QAT distils on the search half's 30 target images and 8 views of them; the other 30 judge and certify it
    assert q["tried"] and q["images"] == {"labelled": 0, "unlabelled_views": 38}
    assert q["row"]["guard_accuracy"] is not None and g["disagreement"]["images"] == 30


def test_force_without_adapt_bn_is_a_user_error(image_folder, tmp_path):
    p = run_cli("finetune", "--data", image_folder, "--out", tmp_path / "r", *ARGS, "--adapt-bn-force")
    assert p.returncode != 0 and "--adapt-bn-force goes with --adapt-bn" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r").exists()


def test_report_md_gives_int8_agreement_on_the_target():
    from edgexfer.report import report_md

    rep = {"schema": "edgexfer.report/1", "data": {"classes": LABELS}, "backbone": {"name": "efficientnet_lite0"},
           "models": {},
           "adaptation": {"method": "AdaBN", "folder": "/t", "images": 60, "batchnorm_layers": 49, "kept": True,
                          "forced": False, "reasons": ["fine"]},
           "quantize": {"target_agreement": {"images": 60, "top1_agreement": 0.85, "warn_below": 0.9}}}
    md = report_md(rep)
    assert "**Warning:** INT8 gives FP32's top-1 on 85.0% of 60 unlabelled target-domain images" in md
