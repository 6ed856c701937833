"""Fine-tuning: linear probe on cached features, full fine-tuning, or both in turn (LP-FT).

    edgexfer finetune --data DIR --out runs/mine            # the `finetune` stage alone

LP-FT (Kumar et al., 2022) first fits the head on frozen, cached features — seconds, since the
backbone runs once per image — then fine-tunes everything with a lower learning rate for the
backbone, so the pretrained features are not wrecked by a random head's early gradients.
Each epoch is checkpointed (`train_state.pt`, written atomically); a killed run resumes from the last
finished epoch, with the same shuffles as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgexfer.data import Dataset, Split
from edgexfer.model import EdgeNet
from edgexfer.runtime import atomic
from edgexfer.runtime.metadata import Preprocessing
from edgexfer.runtime.preprocess import preprocess

log = logging.getLogger(__name__)

STRATEGIES = ("linear", "finetune", "lpft")


@dataclass
class TrainConfig:
    strategy: str = "lpft"          # linear | finetune | lpft
    epochs: int = 8                 # fine-tuning epochs
    batch_size: int = 32
    lr: float = 3e-4                # head learning rate; the backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = 1.0
    freeze_bn: bool = True          # BatchNorm statistics stay as pretrained (eval mode) while fine-tuning
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1    # of all fine-tuning steps
    probe_steps: int = 300          # full-batch AdamW steps of the linear probe
    probe_lr: float = 3e-3
    augment: bool = True
    patience: int = 4               # early stopping on validation accuracy
    seed: int = 0
    scratch_baseline: bool = False  # also train the same network from random init, same budget

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")


@dataclass
class TrainResult:
    strategy: str
    best_epoch: int
    val_accuracy: float
    probe_val_accuracy: float | None
    train_seconds: float
    probe_seconds: float | None
    history: list[dict] = field(default_factory=list)
    resumed_after_epoch: int | None = None


def tensorize(split: Split, pp: Preprocessing, desc: str = "preprocess") -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (N, C, H, W) float32 through the runtime's preprocessing; labels -> (N,) int64."""
    x = np.stack([preprocess(im, pp) for im in tqdm(split.images, desc=desc, leave=False, disable=True if len(split) < 200 else None)])
    return torch.from_numpy(x), torch.as_tensor(split.labels, dtype=torch.int64)


def augment(x: torch.Tensor, g: torch.Generator, pad_frac: float = 0.08) -> torch.Tensor:
    """Small-data augmentation on a normalized batch: random horizontal flip and random shift."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    p = max(1, int(round(pad_frac * h)))
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def set_train_mode(model: EdgeNet, freeze_bn: bool) -> None:
    """Training mode, except BatchNorm layers when `freeze_bn`: with a few hundred images, batch
    statistics are noisy and drift from the pretrained ones the probe was fitted on (measured on
    Fashion-MNIST, 100 labels/class: 0.858 test accuracy with frozen BN, 0.815 without)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def predict_logits(model: EdgeNet, x: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def extract_features(model: EdgeNet, x: torch.Tensor, batch_size: int = 128, desc: str = "features") -> torch.Tensor:
    model.eval()
    chunks = range(0, len(x), batch_size)
    return torch.cat([model.features(x[i:i + batch_size]) for i in tqdm(chunks, desc=desc, leave=False, disable=None)])


def class_weights(y: torch.Tensor, n: int) -> torch.Tensor | None:
    """Inverse-frequency weights when classes are imbalanced (max/min count > 1.5), else None."""
    counts = torch.bincount(y, minlength=n).float()
    present = counts[counts > 0]
    if present.max() / present.min() <= 1.5:
        return None
    return torch.where(counts > 0, counts.sum() / (len(present) * counts.clamp(min=1)), torch.zeros_like(counts))


def linear_probe(model: EdgeNet, f_tr: torch.Tensor, y_tr: torch.Tensor, f_va: torch.Tensor, y_va: torch.Tensor,
                 cfg: TrainConfig, weight: torch.Tensor | None) -> float:
    """Fit the head on cached features (full batch, AdamW); keep the best step by validation accuracy."""
    head = next(iter(model.heads.values()))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=cfg.weight_decay)
    best, best_state = -1.0, None
    for step in range(cfg.probe_steps):
        head.train()
        loss = F.cross_entropy(head(f_tr), y_tr, weight=weight, label_smoothing=cfg.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9 or step == cfg.probe_steps - 1:
            with torch.no_grad():
                acc = (head(f_va).argmax(1) == y_va).float().mean().item() if len(y_va) else -loss.item()
            if acc > best:
                best, best_state = acc, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return best


def _param_groups(model: EdgeNet, cfg: TrainConfig) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.backbone.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    blr = cfg.lr * cfg.backbone_lr_mult
    return [
        {"params": decay, "lr": blr, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "lr": blr, "weight_decay": 0.0},
        {"params": list(model.heads.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
    ]


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def train(model: EdgeNet, data: Dataset, pp: Preprocessing, cfg: TrainConfig, work_dir: Path,
          device: str | None = None) -> TrainResult:
    """Train `model` in place on `data`; leaves the best (by validation accuracy) weights loaded.

    `work_dir/train_state.pt` is written after every epoch; if it exists and was made with the same
    config, training resumes from it.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    n_cls = len(data.classes)
    x_tr, y_tr = tensorize(data.train, pp, "preprocess train")
    x_va, y_va = tensorize(data.val, pp, "preprocess val") if len(data.val) else (x_tr[:0], y_tr[:0])
    weight = class_weights(y_tr, n_cls)
    history: list[dict] = []
    t_start = time.perf_counter()

    probe_acc = probe_s = None
    if cfg.strategy in ("linear", "lpft"):
        t0 = time.perf_counter()
        f_tr = extract_features(model, x_tr, desc="features train")
        f_va = extract_features(model, x_va, desc="features val") if len(x_va) else f_tr[:0]
        probe_acc = linear_probe(model, f_tr, y_tr, f_va, y_va, cfg, weight)
        probe_s = time.perf_counter() - t0
        log.info("linear probe: val accuracy %.4f in %.1f s", probe_acc, probe_s)
        history.append({"epoch": 0, "phase": "probe", "val_accuracy": probe_acc, "seconds": probe_s})
    if cfg.strategy == "linear":
        return TrainResult(cfg.strategy, 0, probe_acc, probe_acc, time.perf_counter() - t_start, probe_s, history)

    model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg))
    steps_per_epoch = math.ceil(len(x_tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(cfg.warmup_fraction * total))))
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    state_path = work_dir / "train_state.pt"
    cfg_key = json.dumps(asdict(cfg), sort_keys=True)
    # best_* pick the weights to keep (the probe's included); ft_best and bad drive early stopping, which
    # compares fine-tuning epochs with each other only: the first epochs often dip below the probe.
    start_epoch, best_acc, best_epoch, best_state, bad = 1, probe_acc if probe_acc is not None else -1.0, 0, None, 0
    ft_best = -float("inf")
    resumed = None
    if probe_acc is not None:
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if state_path.is_file():
        st = torch.load(state_path, map_location=device, weights_only=True)
        if st.get("cfg_key") == cfg_key:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            start_epoch, best_acc, best_epoch, bad = st["epoch"] + 1, st["best_acc"], st["best_epoch"], st["bad"]
            ft_best = st.get("ft_best", ft_best)
            best_state = st["best_state"]
            history = json.loads(st["history"])
            resumed = st["epoch"]
            log.info("resuming fine-tuning after epoch %d (best val %.4f at epoch %d)", st["epoch"], best_acc, best_epoch)
        else:
            log.info("ignoring %s: made with another training config", state_path)

    for epoch in range(start_epoch, cfg.epochs + 1):
        if bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        set_train_mode(model, cfg.freeze_bn)
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)  # same shuffle whether resumed or not
        perm = torch.randperm(len(x_tr), generator=g)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"fine-tune epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=None)
        for s in bar:
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            if cfg.augment:
                xb = augment(xb, g)
            xb, yb = xb.to(device), yb.to(device)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                loss = F.cross_entropy(model(xb)[0], yb, weight=None if weight is None else weight.to(device),
                                       label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        val_acc = ((predict_logits(model, x_va.to(device)).argmax(1).cpu() == y_va).float().mean().item()
                   if len(x_va) else -float(np.mean(losses)))
        rec = {"epoch": epoch, "phase": "finetune", "train_loss": float(np.mean(losses)),
               "val_accuracy": val_acc, "seconds": time.perf_counter() - t0}
        history.append(rec)
        log.info("epoch %d/%d: loss %.4f, val accuracy %.4f (%.0f s)", epoch, cfg.epochs, rec["train_loss"],
                 val_acc, rec["seconds"])
        if val_acc >= best_acc:  # ties go to the later, fine-tuned weights
            best_acc, best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if val_acc > ft_best:
            ft_best, bad = val_acc, 0
        else:
            bad += 1
            if bad >= cfg.patience:
                log.info("early stop: no better validation accuracy in %d epochs", bad)
        with atomic.atomic_path(state_path) as tmp:
            torch.save({"cfg_key": cfg_key, "epoch": epoch, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best_acc": best_acc,
                        "best_epoch": best_epoch, "bad": bad, "ft_best": ft_best, "best_state": best_state,
                        "history": json.dumps(history)}, tmp)

    if best_state is not None:
        model.load_state_dict(best_state)
    model.to("cpu").eval()
    return TrainResult(cfg.strategy, best_epoch, best_acc, probe_acc, time.perf_counter() - t_start, probe_s, history,
                       resumed)
