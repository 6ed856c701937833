"""Transfer-learning features: strategies, layer-wise rates, AdaBN, LogME, Kendall's tau, the curve,
CSV data with several tasks, and timm names."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgexfer.finetune import (TrainConfig, _param_groups, adapt_batchnorm, block_groups, choose_strategy,
                               freeze_for)
from edgexfer.model import EdgeNet
from edgexfer.transfer import kendall_tau, logme
from tests.conftest import CLASSES, make_image, run_cli


# -- LogME ------------------------------------------------------------------------------------------

def _evidence_direct(f: np.ndarray, y: np.ndarray) -> float:
    """LogME written out with explicit matrices (no SVD tricks): MacKay's updates, then the evidence."""
    n, d = f.shape
    evs = []
    for c in np.unique(y):
        t = (y == c).astype(float)
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            a = alpha * np.eye(d) + beta * f.T @ f
            m = beta * np.linalg.solve(a, f.T @ t)
            gamma = d - alpha * np.trace(np.linalg.inv(a))
            new_a, new_b = gamma / (m @ m), (n - gamma) / np.sum((t - f @ m) ** 2)
            done = abs(new_a / new_b - alpha / beta) / (alpha / beta) <= 1e-3
            alpha, beta = new_a, new_b
            if done:
                break
        a = alpha * np.eye(d) + beta * f.T @ f
        m = beta * np.linalg.solve(a, f.T @ t)
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - beta / 2 * np.sum((t - f @ m) ** 2)
              - alpha / 2 * m @ m - 0.5 * np.linalg.slogdet(a)[1] - n / 2 * np.log(2 * np.pi))
        evs.append(ev / n)
    return float(np.mean(evs))


@pytest.mark.parametrize("n,d", [(60, 12), (15, 40)])  # more images than features, and fewer
def test_logme_matches_the_direct_evidence(n, d):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    f = rng.normal(size=(n, d)) + 2.0 * np.eye(3)[y] @ rng.normal(size=(3, d))
    assert logme(f, y) == pytest.approx(_evidence_direct(f, y), rel=1e-4, abs=1e-4)


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    centers = rng.normal(size=(4, 32))
    good = centers[y] + 0.5 * rng.normal(size=(200, 32))
    noise = rng.normal(size=(200, 32))
    assert logme(good, y) > logme(noise, y) + 0.1


def test_kendall_tau_against_scipy():
    from scipy.stats import kendalltau

    a, b = [0.3, 0.1, 0.5, 0.2, 0.9], [0.7, 0.2, 0.6, 0.1, 0.95]
    assert kendall_tau(a, b) == pytest.approx(kendalltau(a, b).statistic)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


# -- strategies and learning rates -------------------------------------------------------------------

def test_auto_strategy_follows_labels_per_class():
    few, some, many = np.repeat(np.arange(5), 4), np.repeat(np.arange(5), 12), np.repeat(np.arange(5), 40)
    assert choose_strategy(few, 5, "imagenet")[0] == "linear"
    assert choose_strategy(some, 5, "imagenet")[0] == "partial"
    assert choose_strategy(many, 5, "imagenet")[0] == "lpft"
    assert choose_strategy(few, 5, "none")[0] == "finetune"
    assert "per class" in choose_strategy(many, 5, "imagenet")[1]
    # every sentence true (issue 23): the reason says what the settings make true
    assert "one learning rate for every layer" in choose_strategy(many, 5, "imagenet")[1]
    assert "earlier layers at lower rates" in choose_strategy(many, 5, "imagenet", lr_decay=0.7)[1]
    assert "lower rate than the head" in choose_strategy(many, 5, "imagenet", backbone_lr_mult=0.1)[1]
    # a validation split too small to choose epochs on (6 per class, 30 images): the cross-validated probe
    small_val, big_val = np.repeat(np.arange(5), 6), np.repeat(np.arange(5), 20)
    strategy, why = choose_strategy(many, 5, "imagenet", small_val)
    assert strategy == "linear" and "30 images" in why and "cross-validation" in why
    assert choose_strategy(many, 5, "imagenet", big_val)[0] == "lpft"
    assert choose_strategy(many, 5, "none", small_val)[0] == "finetune"
    strategy, why = choose_strategy(many, 5, "imagenet", small_val, tasks=2)  # CV is the single-task probe's
    assert strategy == "linear" and "cross-validation chooses a single task's probe only" in why


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.ModuleList([nn.Sequential(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
                                for i in range(4)])
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def blocks(self):
        return list(self.b)

    def forward(self, x):
        for blk in self.b:
            x = blk(x)
        return self.pool(x).flatten(1)


def test_partial_trains_only_the_last_blocks_and_rates_decay():
    model = EdgeNet(_Blocks(), 4, {"a": 3, "b": 2})
    n = freeze_for(model, "partial", 2)
    groups = block_groups(model)
    assert [all(p.requires_grad for p in g) for g in groups] == [False, False, True, True]
    assert n == sum(p.numel() for g in groups[2:] for p in g) + sum(p.numel() for p in model.heads.parameters())
    freeze_for(model, "finetune", 2)
    pg = _param_groups(model, TrainConfig(strategy="finetune", lr=1e-3, lr_decay=0.5))
    backbone_lrs = [g["lr"] for g in pg[:-1] if g["weight_decay"] > 0]  # one decayed group per block
    assert backbone_lrs == pytest.approx([1e-3 * 0.5 ** k for k in (3, 2, 1, 0)])
    assert pg[-1]["lr"] == 1e-3  # the heads


def test_adabn_sets_batchnorm_statistics_to_the_target_domain():
    torch.manual_seed(0)
    model = EdgeNet(_Blocks(), 4, {"a": 3})
    x = torch.randn(64, 3, 8, 8) * 3 + 5  # a shifted "domain"
    assert adapt_batchnorm(model, x, batch_size=16) == 4
    conv, bn = model.backbone.b[0][0], model.backbone.b[0][1]
    with torch.no_grad():
        h = conv(x)
    assert torch.allclose(bn.running_mean, h.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(bn.running_var, h.var((0, 2, 3)), rtol=0.05)
    assert not bn.training and bn.momentum == 0.1


# -- the CLI: CSV with two tasks, curve, rank, --adapt-bn, timm -----------------------------------------

@pytest.fixture(scope="module")
def two_task_csv(tmp_path_factory):
    """Shapes (3 classes) and brightness (2 classes; a few images unlabelled for it) in one CSV."""
    root = tmp_path_factory.mktemp("csv")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = ["path,shape,brightness"]
    for k, c in enumerate(CLASSES):
        for i in range(20):
            im = make_image(k, rng)
            if i % 2:
                im = im.point(lambda v: min(255, v + 80))
            im.save(root / "img" / f"{c}_{i}.png")
            rows.append(f"img/{c}_{i}.png,{c},{'' if i % 7 == 3 else ('bright' if i % 2 else 'dark')}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def test_two_task_csv_trains_exports_and_predicts_both(two_task_csv, tmp_path):
    from edgexfer.runtime import EdgeModel

    run_cli("run", "--data", two_task_csv, "--runs", tmp_path, "--name", "mt", "--image-size", "64", "--epochs", "1",
            "--backbone", "efficientnet_lite0",
            "--batch-size", "16", "--strategy", "partial", "--calibration-samples", "16", "--bench-iters", "5",
            check=True)
    run = tmp_path / "mt"
    rep = json.loads((run / "report.json").read_text())
    assert set(rep["models"]["int8"]["tasks"]) == {"shape", "brightness"}
    assert rep["data"]["tasks"]["brightness"]["train_unlabelled"] > 0
    assert rep["models"]["fp32"]["tasks"]["shape"]["accuracy"] >= 0.8
    assert "Per task" in (run / "report.md").read_text()
    m = EdgeModel(run / "model.int8.onnx")
    assert [t.name for t in m.meta.tasks] == ["shape", "brightness"]
    assert [list(t.labels) for t in m.meta.tasks] == [sorted(CLASSES), ["bright", "dark"]]
    img = two_task_csv.parent / "img" / f"{CLASSES[0]}_1.png"  # a bright red disc
    pred = m.predict(img, top_k=1)
    assert set(pred) == {"shape", "brightness"}
    assert pred["shape"][0]["label"] == CLASSES[0]
    assert pred["brightness"][0]["label"] == "bright"


@pytest.mark.parametrize("body,msg", [
    ("file,label\nimg/x.png,a\n", "not found"),
    ("label,path\n", "first column must be the image path"),
    ("path\nimg/a.png\n", "no label column"),
])
def test_bad_csv_is_one_line(tmp_path, body, msg):
    (tmp_path / "img").mkdir()
    (tmp_path / "bad.csv").write_text(body)
    p = run_cli("finetune", "--data", tmp_path / "bad.csv", "--out", tmp_path / "r")
    assert p.returncode == 1
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_curve_measures_pretrained_vs_scratch_and_resumes(image_folder, tmp_path):
    args = ("curve", "--data", image_folder, "--labels", "2,6", "--out", tmp_path / "c", "--image-size", "64",
            "--epochs", "1", "--batch-size", "16")
    p = run_cli(*args, check=True)
    res = json.loads((tmp_path / "c" / "curve.json").read_text())
    assert list(res["points"]) == ["2", "6"]
    pt = res["points"]["2"]
    assert pt["pretrained"]["strategy"] == "linear" and pt["scratch"]["strategy"] == "finetune"
    assert pt["pretrained"]["train_images"] + pt["pretrained"]["val_images"] == 2 * len(CLASSES)
    assert pt["gain_points"] == pytest.approx(100 * (pt["pretrained"]["test_accuracy"] - pt["scratch"]["test_accuracy"]),
                                              abs=0.01)
    assert (tmp_path / "c" / "curve.png").stat().st_size > 1000
    assert "| 6 |" in p.stdout
    again = run_cli(*args, check=True)  # every point is saved: nothing is retrained
    assert "labels/class: pretrained" not in again.stderr
    assert json.loads((tmp_path / "c" / "curve.json").read_text())["points"] == res["points"]


def test_rank_scores_pretrained_above_random_init(image_folder, tmp_path):
    run_cli("rank", "--data", image_folder, "--shots", "10", "--image-size", "64", "--candidates",
            "efficientnet_lite0,efficientnet_lite0@none", "--out", tmp_path / "rank.json", check=True)
    res = json.loads((tmp_path / "rank.json").read_text())
    assert [r["candidate"] for r in res["candidates"]] == ["efficientnet_lite0", "efficientnet_lite0@none"]
    assert all(np.isfinite(r["logme"]) and r["seconds"] > 0 for r in res["candidates"])
    bad = run_cli("rank", "--data", image_folder, "--candidates", "no_such_net")
    assert bad.returncode == 1 and "unknown backbone" in bad.stderr


def test_adapt_bn_records_the_adaptation(image_folder, tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    rng = np.random.default_rng(5)
    for i in range(12):  # the same shapes, inverted: another "domain", no labels
        im = make_image(i % 3, rng)
        im.point(lambda v: 255 - v).save(target / f"{i}.png")
    run_cli("finetune", "--data", image_folder, "--out", tmp_path / "r", "--image-size", "64", "--strategy", "linear",
            "--shots", "10", "--adapt-bn", target, "--backbone", "efficientnet_lite0", check=True)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    ad = rep["adaptation"]
    assert ad["images"] == 12 and ad["batchnorm_layers"] > 10
    payload = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    from edgexfer.backbones import build_backbone

    ref = build_backbone("efficientnet_lite0", weights="imagenet", image_size=64).state_dict()
    key = next(k for k in ref if k.endswith("_bn0.running_mean"))
    assert not torch.allclose(payload["state_dict"]["backbone." + key], ref[key])
    # INT8 ranges come from the target domain the model was adapted to, unless told otherwise
    run_cli("export", tmp_path / "r", check=True)
    for choice, want in (("auto", f"12 unlabelled target-domain images from {target}"), ("train", "8 train images")):
        run_cli("quantize", tmp_path / "r", "--calibration-samples", "8" if choice == "train" else "50",
                "--tuner", "builtin", "--calibration-data", choice, check=True)
        q = json.loads((tmp_path / "r" / "report.json").read_text())["quantize"]
        assert q["calibrated_on"].startswith(want), q["calibrated_on"]
        ag = q["target_agreement"]  # INT8 vs FP32 top-1 on the target images, label-free
        assert ag["images"] == 12 and 0.0 <= ag["top1_agreement"] <= 1.0
        g = q["guard"]  # ... which the guard also had to meet
        assert g["at_least"] == {"target_agreement": 0.9} and "target_agreement" in g["candidates"][0]
        assert g["within_bound"] == (ag["top1_agreement"] >= 0.9 and g["shipped_accuracy"] >= g["fp32_accuracy"] - 0.01 - 1e-9)


def test_timm_names_when_timm_is_installed():
    pytest.importorskip("timm")
    from edgexfer.backbones import build_backbone, get_backbone_info
    from edgexfer.errors import BackboneError

    info = get_backbone_info("timm/mobilenetv3_small_100")
    net = build_backbone("timm/mobilenetv3_small_100", weights="none", image_size=64)
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, info.feature_dim)
    assert len(net.blocks) >= 3
    in_blocks = {id(p) for b in net.blocks for p in b.parameters()}
    assert all(id(p) in in_blocks for p in net.parameters())  # full fine-tuning trains every weight
    with pytest.raises(BackboneError, match="timm has no model"):
        get_backbone_info("timm/definitely_not_a_model")


def test_a_useless_pretrained_start_is_flagged_as_negative_transfer(image_folder, tmp_path):
    """'Pretrained' weights that carry nothing (every convolution zeroed: constant features) against the
    same network trained from scratch: the report must say negative transfer, loudly."""
    from edgexfer.backbones import build_backbone

    net = build_backbone("efficientnet_lite0", weights="imagenet", image_size=64).net
    sd = {k: (torch.zeros_like(v) if k.endswith("weight") and v.ndim == 4 else v) for k, v in net.state_dict().items()}
    torch.save(sd, tmp_path / "useless.pt")
    p = run_cli("finetune", "--data", image_folder, "--out", tmp_path / "r", "--image-size", "64", "--epochs", "3",
                "--batch-size", "16", "--shots", "20", "--strategy", "linear", "--weights", tmp_path / "useless.pt",
                "--compare-scratch", "--backbone", "efficientnet_lite0", check=True)
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    t = rep["transfer"]
    assert t["pretrained_test_accuracy"] == pytest.approx(1 / 3, abs=0.05)  # one class for every image
    assert t["negative_transfer"] and t["gain_points"] <= 0
    assert "NEGATIVE TRANSFER" in p.stderr


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "mobilenet_v3_small", "mobilenet_v2",
                                  "resnet18", "shufflenet_v2_x1_0", "efficientnet_b0"])
def test_every_weight_the_features_use_is_in_a_block(name):
    """Partial unfreezing and layer-wise rates work on blocks: a weight outside them would never train."""
    from edgexfer.backbones import build_backbone

    net = build_backbone(name, weights="none", image_size=64).train()
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    in_blocks = {id(p) for b in net.blocks for p in b.parameters()}
    used = [n for n, p in net.named_parameters() if p.grad is not None and id(p) not in in_blocks]
    assert not used


def test_target_calibration_needs_an_adapt_bn_folder():
    from edgexfer.errors import RunFolderError
    from edgexfer.pipeline import RunConfig, calibration_set

    cfg = RunConfig()
    cfg.quantize.calibration = "adapt-bn"
    with pytest.raises(RunFolderError, match="without --adapt-bn"):
        calibration_set(cfg, ws=None, limit=8)
    assert RunConfig.from_dict(cfg.to_dict()).quantize.calibration == "adapt-bn"
