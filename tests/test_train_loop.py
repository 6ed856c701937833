"""Fine-tuning's loop (edgexfer/finetune.py), on a tiny random network in this process: `train` runs
`train_one_epoch` and `evaluate` once per epoch, `TrainState` keeps the best weights and early stopping and
saves itself after every epoch in train_state.pt's format, and a run killed after an epoch resumes to the
weights an uninterrupted run ends with."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgexfer import finetune
from edgexfer.data import Dataset, Split
from edgexfer.finetune import TrainConfig, TrainState, train
from edgexfer.model import EdgeNet
from edgexfer.runtime.metadata import Preprocessing

PP = Preprocessing(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
STATE_KEYS = {"cfg_key", "epoch", "model", "optimizer", "scheduler", "best_acc", "best_epoch", "bad", "ft_best",
              "best_state", "history"}  # train_state.pt as written before TrainState


class Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                                     nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())])
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.pool(x).flatten(1)


def tiny_model(seed: int = 0, dropout: float = 0.2) -> EdgeNet:
    torch.manual_seed(seed)
    return EdgeNet(Blocks(), 8, {"label": 2}, dropout)


def dataset(n_train: int = 24, n_val: int = 8) -> Dataset:
    """Two classes told apart by brightness: 16 px images."""
    rng = np.random.default_rng(0)

    def images(n):
        labels = np.arange(n) % 2
        return Split([rng.integers(40 + 120 * y, 100 + 120 * y, (16, 16, 3), dtype=np.uint8) for y in labels],
                     labels)

    return Dataset("synthetic", ["dark", "light"], images(n_train), images(n_val), images(n_val))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"strategy": "finetune", "epochs": 3, "batch_size": 8, "patience": 9, "calibrate": False,
                          "lr": 1e-2, **kw})


def test_train_runs_train_one_epoch_and_evaluate_once_an_epoch(tmp_path, monkeypatch):
    calls = []
    real_epoch, real_eval = finetune.train_one_epoch, finetune.evaluate

    def one_epoch(model, x, y, *a, **k):
        calls.append(("train", a[4]))
        return real_epoch(model, x, y, *a, **k)

    def evaluate(model, x, y, device="cpu"):
        calls.append(("evaluate", len(x)))
        return real_eval(model, x, y, device)

    monkeypatch.setattr(finetune, "train_one_epoch", one_epoch)
    monkeypatch.setattr(finetune, "evaluate", evaluate)
    res = train(tiny_model(), dataset(), PP, cfg(), tmp_path)
    assert calls == [("train", 1), ("evaluate", 8), ("train", 2), ("evaluate", 8), ("train", 3), ("evaluate", 8)]
    assert [h["epoch"] for h in res.history] == [1, 2, 3] and res.resumed_after_epoch is None
    assert res.val_accuracy == max(h["val_accuracy"] for h in res.history)
    assert res.history[res.best_epoch - 1]["val_accuracy"] == res.val_accuracy
    saved = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert set(saved) == STATE_KEYS and saved["epoch"] == 3


def test_state_keeps_the_best_weights_and_counts_epochs_without_progress():
    model = nn.Linear(2, 2)
    st = TrainState(best_acc=0.5)  # the probe's accuracy
    st.update(1, 0.4, model, patience=2)  # below the probe: the probe's weights stay, but fine-tuning's best is 0.4
    assert (st.best_epoch, st.best_acc, st.bad, st.ft_best) == (0, 0.5, 0, 0.4) and st.best_state is None
    st.update(2, 0.5, model, patience=2)  # a tie goes to the later, fine-tuned weights
    assert (st.best_epoch, st.best_acc, st.bad) == (2, 0.5, 0) and st.best_state is not None
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not torch.equal(st.best_state["weight"], model.weight)  # a copy, not the live weights
    st.update(3, 0.5, model, patience=2)
    assert (st.best_epoch, st.bad) == (3, 1)  # a tie is kept, but is no progress for early stopping
    st.update(4, 0.3, model, patience=2)
    assert st.bad == 2 and st.best_epoch == 3 and st.epoch == 4


def test_early_stopping_stops_after_patience_epochs(tmp_path, monkeypatch):
    scores = iter([0.6, 0.5, 0.5, 0.9])
    monkeypatch.setattr(finetune, "evaluate", lambda *a, **k: next(scores))
    res = train(tiny_model(), dataset(), PP, cfg(epochs=4, patience=2), tmp_path)
    assert [h["val_accuracy"] for h in res.history] == [0.6, 0.5, 0.5] and res.best_epoch == 1


def test_no_validation_split_chooses_on_the_training_loss(tmp_path):
    res = train(tiny_model(), dataset(n_val=0), PP, cfg(epochs=2), tmp_path)
    assert res.val_accuracy is None and all(h["val_accuracy"] is None for h in res.history)
    assert res.best_epoch in (1, 2)


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """Weights, optimizer, scheduler and the epoch's shuffle and augmentation come back from train_state.pt. Without
    dropout: its masks come from torch's global generator, which the state does not hold (a resumed run draws
    other masks than an uninterrupted one, as it always has)."""
    whole = tiny_model(dropout=0.0)
    ref = train(whole, dataset(), PP, cfg(strategy="lpft", probe_steps=20), tmp_path / "a")

    real = finetune.train_one_epoch

    def killed_in_epoch_2(*a, **k):
        if a[7] == 2:  # epoch
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(finetune, "train_one_epoch", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(dropout=0.0), dataset(), PP, cfg(strategy="lpft", probe_steps=20), tmp_path / "b")
    monkeypatch.setattr(finetune, "train_one_epoch", real)
    resumed_model = tiny_model(dropout=0.0)
    res = train(resumed_model, dataset(), PP, cfg(strategy="lpft", probe_steps=20), tmp_path / "b")
    assert res.resumed_after_epoch == 1 and [h["phase"] for h in res.history] == ["probe", "finetune", "finetune",
                                                                                   "finetune"]
    assert res.probe_val_accuracy == ref.probe_val_accuracy and res.best_epoch == ref.best_epoch
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


def test_linear_strategy_is_the_probe_alone(tmp_path):
    """A small validation split: the probe's strength by cross-validation, refitted on train + val; no epoch."""
    res = train(tiny_model(), dataset(12, 4), PP, cfg(strategy="linear", probe_views=1), tmp_path)
    assert [h["phase"] for h in res.history] == ["probe"] and res.best_epoch == 0
    assert res.probe_selection["refit_on"] == "train + val" and res.probe_selection["views"] == 1
    assert res.val_accuracy == res.probe_val_accuracy == res.probe_selection["cv_accuracy"]
    assert res.probe_folds["weight"].shape[0] == res.probe_selection["folds"]
    assert not (tmp_path / "train_state.pt").exists()
