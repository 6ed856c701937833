"""Issue 28: the cross-validated probe chooses which blocks' pooled outputs its head reads (Head2Toe, Evci et al.
2022): the last layer, the stage ends at the final resolution, or every stage's end, with its strength, by the
same stratified folds; ties go to the candidate with fewer features. Per-tap standardisation is folded into the
head (and into each fold head), so the exported file and the INT8 guard's head input are the raw pooled features."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# EfficientNet-Lite0's blocks at 224 px (stem, 16 MBConv blocks, head conv): (C, H, W)
LITE0_224 = [(32, 112, 112), (16, 112, 112), (24, 56, 56), (24, 56, 56), (40, 28, 28), (40, 28, 28), (80, 14, 14),
             (80, 14, 14), (80, 14, 14), (112, 14, 14), (112, 14, 14), (112, 14, 14), (192, 7, 7), (192, 7, 7),
             (192, 7, 7), (192, 7, 7), (320, 7, 7), (1280, 7, 7)]


@pytest.fixture
def coarse_grid(monkeypatch):
    """Five strengths instead of PROBE_CS's 25: the choice among candidates is the point here, not the grid's step."""
    from edgexfer import probe

    monkeypatch.setattr(probe, "PROBE_CS", np.logspace(-2, 2, 5))


def _tiny():
    from edgexfer.backbones import build_backbone, register_test_backbone

    register_test_backbone()
    return build_backbone("tiny_test", weights="imagenet", image_size=32).eval()


def test_pooled_taps_equal_a_hand_computation():
    from edgexfer.backbones import pooled_taps
    from edgexfer.model import EdgeNet

    bb = _tiny()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        s = bb.stem(x)
        b1 = bb.b1(s)
        b2 = bb.b2(b1)
        hand = torch.cat([s.mean((2, 3)), b1.mean((2, 3)), b2.mean((2, 3))], 1)
        assert torch.allclose(pooled_taps(bb, x, [0, 1, 2]), hand, atol=1e-6)
        assert torch.allclose(pooled_taps(bb, x, [2]), bb(x), atol=1e-6)  # the last block pooled = the features
        net = EdgeNet(bb, 40, {"t": 3}, taps=[0, 1, 2]).eval()
        assert torch.allclose(net.features(x), hand, atol=1e-6)
        assert net(x)[0].shape == (3, 3)


def test_hooks_tap_a_backbone_without_its_own_block_outputs():
    from edgexfer.backbones import block_outputs

    bb = _tiny()
    x = torch.randn(2, 3, 32, 32)

    class Plain(torch.nn.Module):  # the same network, tapped through forward hooks on its blocks
        def __init__(self):
            super().__init__()
            self.inner = bb

        @property
        def blocks(self):
            return [bb.stem, bb.b1, bb.b2]

        def forward(self, x):
            return bb(x)

    with torch.no_grad():
        for a, b in zip(block_outputs(Plain(), x), bb.block_outputs(x)):
            assert torch.equal(a, b)


def test_a_multi_layer_model_traces_with_torch_fx_as_qat_does():
    from edgexfer.model import EdgeNet
    from edgexfer.qat import fold_batchnorm

    net = EdgeNet(_tiny(), 40, {"t": 3}, taps=[0, 1, 2]).eval()
    gm = fold_batchnorm(net)  # torch.fx.symbolic_trace inside
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gm(x)[0], net(x)[0], atol=1e-5)


def test_candidates_follow_the_networks_shape():
    from edgexfer.backbones import stage_ends
    from edgexfer.probe import tap_candidates

    ends = stage_ends(LITE0_224)
    assert ends == [1, 3, 5, 8, 11, 15, 16, 17]  # where width or resolution changes; the stem is no stage
    # tiny_test: stem (8, 16, 16), b1 (16, 8, 8), b2 (16, 8, 8): one stage end, the last block: only today's probe
    assert [c["name"] for c in tap_candidates(_tiny(), 32)] == ["head"]


def test_standardisation_folds_into_the_linear_layer_exactly():
    from edgexfer.probe import fold_standardiser, tap_standardiser

    rng = np.random.default_rng(0)
    f = rng.normal(3.0, 5.0, (40, 7))
    f[:, 2] = 1.5  # a constant feature
    mu, sd = tap_standardiser(f, [3, 4])
    z = (f - mu) / sd
    assert np.allclose(z[:, :3].std(0)[[0, 1]], 1 / np.sqrt(3)) and np.allclose(z[:, 3:].std(0), 1 / np.sqrt(4))
    w, b = rng.normal(size=(4, 7)), rng.normal(size=4)
    w2, b2 = fold_standardiser(w, b, mu, sd)
    assert np.allclose(z @ w.T + b, f @ w2.T + b2, atol=1e-10)


def _blocks(rng, y, signal_in: int, n_blocks: int = 3, widths=(6, 8, 10)) -> list[np.ndarray]:
    """Pooled features per block: noise, the class added to block `signal_in` only (strongly, in few features)."""
    out = []
    for j in range(n_blocks):
        b = rng.normal(size=(len(y), widths[j]))
        if j == signal_in:
            b[:, :3] += 3.0 * np.eye(3)[y]
        out.append(b)
    return out


def test_cv_picks_mid_level_features_when_only_they_separate_the_classes(coarse_grid):
    from edgexfer.probe import choose_candidate, cv_candidate

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 20)
    blocks = _blocks(rng, y, signal_in=1)
    head = cv_candidate(blocks, [2], y, False, 5, 0, standardise=False)
    multi = cv_candidate(blocks, [1, 2], y, False, 5, 0)
    assert head["cv_accuracy"] < 0.6 < 0.9 < multi["cv_accuracy"]
    chosen, leads = choose_candidate([head, multi])
    assert chosen == 1 and leads[0]["lead_of_best"] > leads[0]["lead_stderr"] > 0
    # the fold heads, standardisation folded in, answer the raw features as the folds scored them
    f = np.concatenate([blocks[1], blocks[2]], 1)
    folds = multi["folds"]
    from edgexfer.probe import fold_logits

    assert np.array_equal(fold_logits(folds, f).argmax(1) == y, multi["correct"])


def test_a_tie_goes_to_the_candidate_with_fewer_features(coarse_grid):
    from edgexfer.probe import choose_candidate, cv_candidate

    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 20)
    blocks = _blocks(rng, y, signal_in=2)  # the last layer separates the classes; the mid block adds noise
    head = cv_candidate(blocks, [2], y, False, 5, 0, standardise=False)
    multi = cv_candidate(blocks, [0, 1, 2], y, False, 5, 0)
    chosen, leads = choose_candidate([head, multi])
    assert chosen == 0
    # a lead within one paired standard error is a tie too, whichever is ahead
    a = {"cv_accuracy": 0.80, "correct": np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 0], bool)}
    b = {"cv_accuracy": 0.81, "correct": np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 0], bool)}
    assert choose_candidate([a, b])[0] == 0


def test_cv_taps_refits_the_chosen_set_into_the_model(coarse_grid):
    from edgexfer.model import EdgeNet
    from edgexfer.probe import cv_taps, extract_block_features

    torch.manual_seed(0)
    bb = _tiny()
    net = EdgeNet(bb, 16, {"t": 3}).eval()
    x = torch.randn(30, 3, 32, 32)
    y = torch.arange(3).repeat(10)
    blocks = extract_block_features(net, x)
    blocks[1] = blocks[1] + 2.0 * torch.nn.functional.pad(torch.eye(3)[y], (0, 13))  # only block 1 knows the class
    cands = [{"name": "head", "taps": None, "rule": "last", "features": 16},
             {"name": "mid", "taps": [1, 2], "rule": "mid", "features": 32}]
    sel, folds, f = cv_taps(net, blocks, y, False, 0, None, cands)
    assert sel["features"]["name"] == "mid" and net.taps == [1, 2] and net.heads["t"].in_features == 32
    assert [c["name"] for c in sel["candidates"]] == ["head", "mid"] and f.shape == (30, 32)
    assert folds["weight"].shape == (5, 3, 32) and folds["fold"].shape == (30,)
    with torch.no_grad():  # the refitted head reads the raw concatenated features (standardisation folded in)
        acc = (net.heads["t"](torch.as_tensor(f, dtype=torch.float32)).argmax(1) == y).float().mean()
    assert acc > 0.9


@pytest.fixture(scope="module")
def taps_run(tmp_path_factory, image_folder):
    """The fast tier's whole run on tiny_test, its probe offered a multi-layer candidate and made to take it:
    export parity, the INT8 guard's out-of-fold answers and the report, end to end."""
    from edgexfer import probe
    from tests.conftest import FAST_RUN_ARGS, invoke

    real = probe.choose_candidate
    cands = [{"name": "head", "taps": None, "rule": "the last layer", "features": 16},
             {"name": "stages", "taps": [0, 1, 2], "rule": "every block", "features": 40}]
    mp = pytest.MonkeyPatch()
    mp.setattr(probe, "tap_candidates", lambda backbone, size: cands)
    mp.setattr(probe, "PROBE_CS", np.logspace(-2, 2, 5))
    mp.setattr(probe, "choose_candidate", lambda results: (len(results) - 1, real(results)[1]))
    try:
        runs = tmp_path_factory.mktemp("taps-runs")
        r = invoke("run", "--data", image_folder, "--runs", runs, "--name", "taps", *FAST_RUN_ARGS)
    finally:
        mp.undo()
    assert r.exit_code == 0, r.stderr[-3000:]
    return runs / "taps"


def test_a_multi_layer_head_exports_and_is_guarded_out_of_fold(taps_run):
    rep = json.loads((taps_run / "report.json").read_text())
    sel = rep["training"]["probe_selection"]
    assert sel["features"]["taps"] == [0, 1, 2] and sel["features"]["count"] == 40
    assert [c["name"] for c in sel["candidates"]] == ["head", "stages"]
    payload = torch.load(taps_run / "checkpoint.pt", weights_only=True)
    assert payload["model_config"]["taps"] == [0, 1, 2] and payload["model_config"]["feature_dim"] == 40
    assert payload["probe_folds"]["weight"].shape[-1] == 40  # fold heads in the exported head's input space
    ex = rep["export"]
    assert ex["max_abs_diff"] <= ex["atol"] and ex["top1_agreement"] == 1.0
    import onnxruntime as ort

    from edgexfer.guard import with_head_inputs

    sess = ort.InferenceSession(with_head_inputs(taps_run / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 32, 32), np.float32)})
    assert out[-1].shape == (1, 40)  # the head's input: the 40 raw pooled features
    g = rep["quantize"]["guard"]
    assert g["agreement_set"]["labelled_from"] == "out-of-fold"
    md = (taps_run / "report.md").read_text()
    assert "The head reads 40 features" in md and "| stages (chosen) |" in md
    assert "pooled outputs of blocks 0, 1, 2" in (taps_run / "model_card.md").read_text()


def test_repeated_folds_average_partitions_and_keep_the_first_partitions_heads(coarse_grid):
    """probe_cv_repeats: the strength and the candidate are scored over several fold partitions (seed, seed + 1,
    ...); each image's correctness is the share of partitions it was right in; the fold heads (the guard's and the
    temperature's out-of-fold answers) are the first partition's, the folds `fold_heads` draws with the seed."""
    from edgexfer.probe import cv_candidate, fold_logits, view_folds

    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 15)
    blocks = _blocks(rng, y, signal_in=2, widths=(6, 8, 4))
    blocks[2] += rng.normal(0, 1.5, blocks[2].shape)  # hard enough that partitions disagree
    one = cv_candidate(blocks, [2], y, False, 5, 7, standardise=False)
    three = cv_candidate(blocks, [2], y, False, 5, 7, standardise=False, repeats=3)
    assert one["repeats"] == 1 and three["repeats"] == 3
    assert set(np.unique(three["correct"])) <= {0.0, 1 / 3, 2 / 3, 1.0} and three["correct"].shape == (45,)
    first = [te for _, te in view_folds(y, 5, 7, 0)]
    assert all((three["folds"]["fold"][te] == j).all() for j, te in enumerate(first))
    if three["C"] == one["C"]:  # the same strength: the first partition's heads are the single run's
        assert np.allclose(three["folds"]["weight"], one["folds"]["weight"])
    right = fold_logits(three["folds"], blocks[2]).argmax(1) == y
    assert 0 < right.mean() <= 1
    # equal folds (9 images each): the score over 15 folds is each image's share of right answers, averaged
    assert three["cv_accuracy"] == pytest.approx(three["correct"].mean())


def test_a_run_folder_from_before_repeated_folds_keeps_its_single_partition():
    """config.json written before TrainConfig.probe_cv_repeats loads as 1 (what its probe used), so resuming it with
    today's default (3) is another configuration, not a silent mix; a repeat count under 1 is refused."""
    from edgexfer.config import RunConfig, TrainConfig, build_config
    from edgexfer.pipeline import config_changes

    new = build_config(data=None)
    old = new.to_dict()
    del old["train"]["probe_cv_repeats"]
    assert new.train.probe_cv_repeats == 3 and RunConfig.from_dict(old).train.probe_cv_repeats == 1
    assert "train.probe_cv_repeats: 1 -> 3" in config_changes(RunConfig.from_dict(old).training_key(), new.training_key())
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match="probe_cv_repeats"):
            TrainConfig(probe_cv_repeats=bad)
