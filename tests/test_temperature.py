"""Scores a user can threshold (issue 12 item 6): the expected calibration error, temperature scaling fitted on
held-out logits and folded into each head, recorded once, and carried by every exported file."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgexfer.probe import out_of_fold_logits
from edgexfer.temperature import (coverage_table, ece, fit_temperature, fold_temperature, nll, softmax,
                                  summary_on_test_split, temperature_scale_heads, threshold_for)


def test_ece_on_hand_made_cases():
    y = np.array([0, 0, 0, 0])
    assert ece(np.eye(2)[y], y) == 0.0                                    # certain and right
    assert ece(np.eye(2)[1 - y], y) == pytest.approx(1.0)                 # certain and wrong
    p = np.array([[0.8, 0.2]] * 4)                                        # 0.8 sure, 3 of 4 right
    assert ece(p, np.array([0, 0, 0, 1])) == pytest.approx(0.05)
    # two bins: 0.9 sure and right (gap 0.1), 0.6 sure and wrong (gap 0.6), half the images each
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    assert ece(p, np.array([0, 0, 0, 0])) == pytest.approx(0.35)
    # equal-width bins, not one pool: 0.55 (right) and 0.95 (wrong) do not average out
    p = np.array([[0.55, 0.45], [0.95, 0.05]])
    assert ece(p, np.array([0, 1])) == pytest.approx(0.5 * 0.45 + 0.5 * 0.95)
    assert ece(np.zeros((0, 3)), np.zeros(0, int)) is None


def test_coverage_table_and_threshold_for_target():
    p = np.array([[0.95, 0.05], [0.85, 0.15], [0.7, 0.3], [0.55, 0.45]])
    y = np.array([0, 0, 1, 0])                                            # the 0.7 answer is wrong
    rows = {r["threshold"]: r for r in coverage_table(p, y, thresholds=(0.5, 0.8, 0.99))}
    assert rows[0.5]["coverage"] == 1.0 and rows[0.5]["accuracy"] == 0.75
    assert rows[0.8]["coverage"] == 0.5 and rows[0.8]["accuracy"] == 1.0
    assert rows[0.99]["images"] == 0 and rows[0.99]["accuracy"] is None
    t = threshold_for(p, y, target=0.95, min_images=2)
    assert t["threshold"] == 0.85 and t["coverage"] == 0.5 and t["accepted"] == 2 and t["accuracy"] == 1.0
    assert threshold_for(p, y, target=0.95, min_images=3) is None         # too few images kept to say
    assert threshold_for(p, 1 - y, target=0.95, min_images=1) is None


def _overconfident(n=4000, k=5, t_true=2.5, seed=0):
    """Labels drawn from softmax(z); the model reports z * t_true: over-confident by exactly t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    z[np.arange(n), rng.integers(0, k, n)] += 2.0
    p = softmax(z)
    y = np.array([rng.choice(k, p=row) for row in p])
    return z * t_true, y


def test_temperature_fit_recovers_a_known_temperature():
    z, y = _overconfident(t_true=2.5)
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.08)
    assert nll(z, y, t) < nll(z, y)
    assert ece(softmax(z / t), y) < 0.5 * ece(softmax(z), y)
    # under-confident (as label smoothing leaves a model): T < 1 sharpens
    z, y = _overconfident(t_true=0.5, seed=1)
    assert fit_temperature(z, y) == pytest.approx(0.5, rel=0.08)


def test_folding_into_a_linear_layer_is_softmax_of_z_over_t():
    import torch

    torch.manual_seed(0)
    lin, x = torch.nn.Linear(16, 6), torch.randn(64, 16)
    with torch.no_grad():
        z = lin(x).double().numpy()
    fold_temperature(lin, 1.7)
    with torch.no_grad():
        zf = lin(x).double().numpy()
    assert (zf.argmax(1) == z.argmax(1)).all()
    np.testing.assert_allclose(softmax(zf), softmax(z / 1.7), atol=1e-6)


def test_temperature_scale_heads_folds_once_and_records(tmp_path):
    import torch

    z, y = _overconfident(n=600, k=3, t_true=3.0, seed=2)
    head = torch.nn.Linear(3, 3)
    with torch.no_grad():                                                 # the identity: logits in, logits out
        head.weight.copy_(torch.eye(3))
        head.bias.zero_()
    rec = temperature_scale_heads({"label": head}, {"label": (z, y)}, {"split": "validation", "uncertain": False})
    r = rec["tasks"]["label"]
    assert r["folded"] and r["temperature"] == pytest.approx(3.0, rel=0.15)
    lo, hi = r["temperature_interval_90"]
    assert lo <= r["temperature"] <= hi
    assert r["fitted_on"]["ece_after"] < r["fitted_on"]["ece_before"] and r["fitted_on"]["images"] == 600
    np.testing.assert_allclose(head.weight.detach().numpy(), np.eye(3) / r["temperature"], rtol=1e-6)
    json.dumps(rec)  # goes into report.json as it is
    # every held-out image right: NLL falls all the way to T -> 0, so nothing is folded (scores would all be 1.0)
    right = z.copy()
    right[np.arange(len(y)), y] += 50.0
    head2 = torch.nn.Linear(3, 3)
    w = head2.weight.detach().clone()
    r2 = temperature_scale_heads({"label": head2}, {"label": (right, y)}, {"split": "validation"})["tasks"]["label"]
    assert not r2["folded"] and r2["temperature"] == 1.0 and "0 of 600" in r2["not_folded"]
    assert r2["fitted_temperature"] < 0.06 and torch.equal(head2.weight, w)
    off = temperature_scale_heads({"label": torch.nn.Linear(3, 3)}, {"label": (z, y)}, {"split": "validation"}, enabled=False)
    assert off["tasks"]["label"]["temperature"] == 1.0 and not off["tasks"]["label"]["folded"]
    assert off["tasks"]["label"]["fitted_on"]["ece_before"] == off["tasks"]["label"]["fitted_on"]["ece_after"]
    # the test split only reports: logits as shipped (already divided by T) and multiplied back
    s = summary_on_test_split({"fp32": [z / r["temperature"]]}, y, {"label": r["temperature"]})["label"]["test"]
    assert s["files"]["fp32"]["ece_before"] == pytest.approx(ece(softmax(z), y))
    assert s["files"]["fp32"]["ece_after"] < s["files"]["fp32"]["ece_before"] and s["file"] == "fp32"


def test_out_of_fold_logits_two_and_more_classes():
    rng = np.random.default_rng(0)
    for k in (2, 3):
        y = np.repeat(np.arange(k), 12)
        f = rng.normal(0, 1, (len(y), 8)) + y[:, None]
        z = out_of_fold_logits(f, y, C=1.0, balanced=False, folds=4, seed=0)
        assert z.shape == (len(y), k) and (z.argmax(1) == y).mean() > 0.6


def noisy_folder(root, per_class: int, every: int = 3):
    """The shapes of conftest with every `every`-th image of each class filed under the next class: held-out
    images the model gets wrong, so a temperature can be fitted (with none wrong, none is)."""
    from tests.conftest import CLASSES, make_image_folder

    make_image_folder(root, per_class=per_class)
    for k, c in enumerate(CLASSES):
        for p in sorted((root / c).glob("*.png"))[::every]:
            p.rename(root / CLASSES[(k + 1) % len(CLASSES)] / f"moved_{c}_{p.name}")
    return root


def _tiny(tmp_path, per_class=16):
    from edgexfer.data import load_image_folder
    from edgexfer.model import model_config, preprocessing_of

    ds = load_image_folder(noisy_folder(tmp_path / "d", per_class), shots=None)
    mcfg = model_config(backbone="efficientnet_lite0", weights="imagenet", image_size=32, tasks=ds.tasks)
    return ds, mcfg, preprocessing_of(mcfg)


@pytest.mark.slow
def test_resumed_training_folds_the_temperature_once(tmp_path, monkeypatch):
    """The temperature is folded after the epoch loop, into the final weights, never into train_state.pt: a call
    that resumes from the finished state with calibrate=False gets heads exactly T times the calibrated ones
    (folded once, not zero times or twice), and records nothing folded."""
    import torch

    from edgexfer import temperature
    from edgexfer.finetune import TrainConfig, train
    from edgexfer.model import build_model

    monkeypatch.setattr(temperature, "_inside", lambda t: True)  # fold whatever T these few images give
    ds, mcfg, pp = _tiny(tmp_path, per_class=12)
    heads, results = [], []
    for calibrate in (True, False):
        torch.manual_seed(0)
        model = build_model(mcfg)
        cfg = TrainConfig(strategy="partial", unfreeze_blocks=1, epochs=1, batch_size=16, probe_steps=30,
                          calibrate=calibrate)
        results.append(train(model, ds, pp, cfg, tmp_path / "w"))
        heads.append(model.heads["label"].weight.detach().clone())
    on, off = results
    t = on.calibration["tasks"]["label"]["temperature"]
    assert on.calibration["tasks"]["label"]["folded"] and t != pytest.approx(1.0)
    assert on.calibration["tasks"]["label"]["fitted_on"]["split"] == "validation"
    assert off.resumed_after_epoch == 1                                   # the per-epoch state ignores `calibrate`
    assert off.calibration["enabled"] is False and not off.calibration["tasks"]["label"]["folded"]
    assert torch.allclose(heads[0] * t, heads[1], rtol=1e-4, atol=1e-6)


def test_refitted_linear_probe_fits_the_temperature_on_out_of_fold_logits(tmp_path):
    import torch

    from edgexfer.finetune import TrainConfig, train
    from edgexfer.model import build_model

    ds, mcfg, pp = _tiny(tmp_path, per_class=12)
    torch.manual_seed(0)
    res = train(build_model(mcfg), ds, pp, TrainConfig(strategy="linear"), tmp_path / "w")
    assert res.probe_selection and res.probe_selection["refit_on"] == "train + val"
    f = res.calibration["tasks"]["label"]["fitted_on"]
    assert "out-of-fold" in f["split"] and f["images"] == len(ds.train) + len(ds.val)
    # the fold heads behind those logits, for the INT8 guard (issue 23): one per fold, each image held out by one,
    # the temperature folded in as in the refitted head
    folds, k = res.probe_folds, res.probe_selection["folds"]
    n = len(ds.train) + len(ds.val)
    assert folds["weight"].shape[:2] == (k, 3) and folds["bias"].shape == (k, 3) and folds["fold"].shape == (n,)
    assert sorted(set(folds["fold"].tolist())) == list(range(k))
    from edgexfer.probe import fold_heads

    t = res.calibration["tasks"]["label"]["temperature"]
    assert res.calibration["tasks"]["label"]["folded"]
    f_all = np.random.default_rng(0).standard_normal((n, folds["weight"].shape[2]))
    again = fold_heads(f_all, np.concatenate([ds.train.labels, ds.val.labels]), res.probe_selection["C"], False, k, 0)
    np.testing.assert_array_equal(again["fold"], folds["fold"])  # the same stratified split as cv_probe's
    assert not np.allclose(folds["weight"] * t, 0)


def test_no_calibrate_changes_the_training_key():
    from edgexfer.config import build_config

    base = dict(data=None, shots=None, all_labels=False, test_size=100, seed=0, strict=False,
                backbone="efficientnet_lite0", weights="imagenet", image_size=64, strategy="lpft", epochs=1,
                batch_size=8, lr=3e-4, threads=1)
    on, off = build_config(**base), build_config(**base, no_calibrate=True)
    assert on.train.calibrate and not off.train.calibrate
    assert on.training_key() != off.training_key()


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    from tests.conftest import TINY_RUN_ARGS, run_cli

    tmp = tmp_path_factory.mktemp("calib")
    run_cli("run", "--data", noisy_folder(tmp / "noisy", per_class=40, every=4), "--runs", tmp / "runs", "--name",
            "noisy", *TINY_RUN_ARGS, "--shots", "40", check=True)
    return tmp / "runs" / "noisy"


@pytest.mark.slow
def test_run_reports_calibration_and_onnx_carries_it(noisy_run):
    """A tiny run: a calibration section (T, where it was fitted, ECE before/after there and on the test split),
    report.md and model card lines, and the exported files' probabilities are softmax(z / T) of the unfolded
    network."""
    import torch

    from edgexfer.model import load_checkpoint
    from edgexfer.runtime import EdgeModel
    from edgexfer.runtime.metadata import META_KEY
    from tests.conftest import make_image

    tiny_run = noisy_run
    rep = json.loads((tiny_run / "report.json").read_text())
    r = rep["calibration"]["tasks"]["label"]
    t = r["temperature"]
    assert r["folded"] and t > 0 and t != 1.0
    f = r["fitted_on"]
    assert f["split"] == "validation" and f["images"] == rep["data"]["val"] and f["uncertain"] is True
    assert 0 <= f["ece_after"] <= 1 and f["nll_after"] <= f["nll_before"] + 1e-9
    for k in ("fp32", "int8"):
        v = r["test"]["files"][k]
        assert v["images"] == rep["data"]["test"] and 0 <= v["ece_before"] <= 1 and 0 <= v["ece_after"] <= 1
    assert len(r["test"]["thresholds"]) == len(f["thresholds"])
    assert "calibration" not in rep["training"]
    _, _, payload = load_checkpoint(tiny_run / "checkpoint.pt")
    assert payload["train_result"]["calibration"]["tasks"]["label"]["temperature"] == t   # recorded with the weights
    md, card = (tiny_run / "report.md").read_text(), (tiny_run / "model_card.md").read_text()
    assert f"T={t:.3f}" in md and "uncertain" in md and "test split, fp32 (report only)" in md
    assert "## Confidence scores and thresholds" in card and "closed-set classifier" in card

    model, _, _ = load_checkpoint(tiny_run / "checkpoint.pt")
    with torch.no_grad():                                                 # undo the fold: the network as trained
        model.heads["label"].weight.mul_(t)
        model.heads["label"].bias.mul_(t)
    rng = np.random.default_rng(11)
    imgs = [make_image(k % 3, rng) for k in range(6)]
    m = EdgeModel(tiny_run / "model.onnx", threads=1, e2e=False)  # the Python path: what the server batches
    x = m.preprocess(imgs)
    with torch.no_grad():
        z = model(torch.from_numpy(x))[0].double().numpy()
    np.testing.assert_allclose(softmax(m.run(x)["label"]), softmax(z / t), atol=1e-4)
    top = [p[0]["score"] for p in m.predict(imgs, top_k=1)]               # what predict and the server return
    np.testing.assert_allclose(top, softmax(z / t).max(1), atol=1e-4)
    import onnx

    for name in ("model.onnx", "model.int8.onnx"):
        meta = json.loads({p.key: p.value for p in onnx.load(str(tiny_run / name)).metadata_props}[META_KEY])
        assert meta["metrics"]["temperature"] == t and 0 <= meta["metrics"]["ece"] <= 1
