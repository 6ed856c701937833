"""Fine-tuning: linear probe on cached features, full fine-tuning, or both in turn (LP-FT).

    edgexfer finetune --data DIR --out runs/mine            # the `finetune` stage alone

LP-FT (Kumar et al., 2022) first fits the head on frozen, cached features — seconds, since the
backbone runs once per image — then fine-tunes everything with a lower learning rate for the
backbone, so the pretrained features are not wrecked by a random head's early gradients.
Each epoch is checkpointed (`train_state.pt`, written atomically); a killed run resumes from the last
finished epoch, with the same shuffles as an uninterrupted one.

`train` reads like torchvision's references/classification/train.py: the strategy, the probe
(`edgexfer.probe.fit_probe`), then per epoch `train_one_epoch` and `evaluate`, with `TrainState` keeping
the best weights and early stopping and saving itself; then `fit_temperatures` (temperature scaling,
`edgexfer.temperature`). Augmentation is `edgexfer.augment`'s; the learning rate warms up linearly and
follows a cosine (`warmup_cosine`).
"""
from __future__ import annotations

import functools
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

from edgexfer.runtime.progress import bars_off

from edgexfer.augment import TrainAugment
from edgexfer.config import STRATEGIES, TrainConfig  # noqa: F401  (TrainConfig: config.json's training section)
from edgexfer.data import Dataset, Split
from edgexfer.model import EdgeNet
from edgexfer.probe import SMALL_VAL_IMAGES, SMALL_VAL_PER_CLASS, Probe, fit_probe, label_columns, small_validation
from edgexfer.runtime import atomic
from edgexfer.runtime.metadata import Preprocessing
from edgexfer.runtime.preprocess import preprocess

log = logging.getLogger(__name__)

# --strategy auto: labelled training images per class (median over classes) -> strategy. The bounds
# come from benchmarks/bench_transfer.py (Fashion-MNIST, EfficientNet-Lite0; benchmarks/RESULTS.md,
# "Strategies by labels per class"): at 8 training images per class the probe and partial fine-tuning tie
# and full LP-FT is behind; from 16, LP-FT leads.
AUTO_LINEAR_BELOW = 10
AUTO_PARTIAL_BELOW = 16


def choose_strategy(train_labels: np.ndarray, n_classes: int, weights: str,
                    val_labels: np.ndarray | None = None, *, tasks: int = 1, lr_decay: float = 1.0,
                    backbone_lr_mult: float = 1.0) -> tuple[str, str]:
    """What `--strategy auto` picks for this data, and why (the report quotes the reason, which says only what
    the settings make true: `tasks` heads, the learning rates' `lr_decay` and `backbone_lr_mult`).

    A small validation split (under SMALL_VAL_IMAGES images or SMALL_VAL_PER_CLASS per class) cannot
    choose fine-tuning's epoch, nor tell whether fine-tuning beat the probe: one image moves its accuracy
    by 100/N points. Then the probe is the strategy, its strength chosen by cross-validation over every
    labelled image (cv_probe), and refitted on all of them: one task only; with several, each head's probe
    stops at its best step on the validation split."""
    counts = np.bincount(train_labels, minlength=n_classes)
    per_class = float(np.median(counts[counts > 0])) if counts.any() else 0.0
    if weights == "none":
        return "finetune", "random-init weights: nothing to probe or to keep frozen, so every layer trains"
    if val_labels is not None and len(val_labels):
        vc = np.bincount(val_labels[val_labels >= 0], minlength=n_classes)
        if vc.sum() < SMALL_VAL_IMAGES or vc.min() < SMALL_VAL_PER_CLASS:
            how = ("a linear probe whose strength is chosen by cross-validation over all labelled images, "
                   "refitted on them" if tasks == 1 else
                   f"a linear probe per task ({tasks} heads; cross-validation chooses a single task's probe only), "
                   "each head stopped at its best step on these few validation images")
            return "linear", (f"the validation split has {int(vc.sum())} images ({int(vc.min())} in its smallest "
                              f"class; one image is {100 / max(int(vc.sum()), 1):.1f} points): too few to choose "
                              f"fine-tuning's epochs or to tell fine-tuning from the probe, so {how}")
    if per_class < AUTO_LINEAR_BELOW:
        return "linear", (f"{per_class:g} labelled training images per class (median) < {AUTO_LINEAR_BELOW}: "
                          "fine-tuning the backbone would over-fit; a linear probe on cached features is as "
                          "accurate and trains in seconds")
    if per_class < AUTO_PARTIAL_BELOW:
        return "partial", (f"{per_class:g} labelled training images per class (median) < {AUTO_PARTIAL_BELOW}: "
                           "probe, then fine-tune only the last blocks (fewer weights to fit to few images)")
    rates = ("earlier layers at lower rates" if lr_decay < 1 else
             "the backbone at a lower rate than the head" if backbone_lr_mult < 1 else
             "one learning rate for every layer")
    return "lpft", (f"{per_class:g} labelled training images per class (median) >= {AUTO_PARTIAL_BELOW}: "
                    f"linear probe, then fine-tune every layer (LP-FT), {rates}")


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
    strategy_reason: str | None = None
    trainable_parameters: int | None = None
    val_accuracy_per_task: dict | None = None
    device: str = "cpu"
    probe_selection: dict | None = None  # how the probe's strength was chosen when validation was too small
    calibration: dict | None = None  # temperature scaling (report.json's name): T per head (already folded into the weights), ECE before/after
    augmentation: dict | None = None  # what fine-tuning's augmentation did to the training images, and why
    # the cross-validated probe's fold heads (`probe.fold_heads`, temperature folded in): saved in the
    # checkpoint for the INT8 guard, never in the report
    probe_folds: dict | None = field(default=None, repr=False)


def tensorize(split: Split, pp: Preprocessing, desc: str = "preprocess") -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> (N, C, H, W) float32 through the runtime's preprocessing; labels -> (N,) int64 for one
    task, (N, tasks) int64 for several (-1 where an image is unlabelled for a task)."""
    if not len(split):  # an empty split (no validation images): (0, C, H, W), not a crash in np.stack
        x = np.zeros((0, 1 if pp.color == "L" else 3, pp.crop, pp.crop), np.float32)
        y = split.targets() if split.extra else split.labels
        return torch.from_numpy(x), torch.as_tensor(y, dtype=torch.int64)
    x = np.stack([preprocess(im, pp) for im in tqdm(split.images, desc=desc, leave=False, disable=True if len(split) < 200 else bars_off())])
    y = split.targets() if split.extra else split.labels
    return torch.from_numpy(x), torch.as_tensor(y, dtype=torch.int64)


def _bn_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def set_train_mode(model: EdgeNet, freeze_bn: bool) -> None:
    """Training mode, except BatchNorm layers when `freeze_bn`: with a few hundred images, batch
    statistics are noisy and drift from the pretrained ones the probe was fitted on (measured on
    Fashion-MNIST, 100 labels/class: 0.858 test accuracy with frozen BN, 0.815 without)."""
    model.train()
    if freeze_bn:
        for m in _bn_layers(model):
            m.eval()


@torch.no_grad()
def predict_logits(model: EdgeNet, x: torch.Tensor, batch_size: int = 128, task: int | None = 0):
    """Logits of task `task` (default the first), or of every task (a list) when `task` is None."""
    model.eval()
    outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    per_task = [torch.cat([o[t] for o in outs]) for t in range(len(outs[0]))] if outs else []
    return per_task if task is None else per_task[task]


def task_accuracies(logits: list[torch.Tensor], y: torch.Tensor) -> list[float]:
    """Top-1 accuracy per task over the images labelled for it."""
    y = label_columns(y)
    out = []
    for t, lg in enumerate(logits):
        m = y[:, t] >= 0
        out.append(float((lg[m].argmax(1) == y[m, t]).float().mean()) if m.any() else float("nan"))
    return out


def class_weights(y: torch.Tensor, n: int) -> torch.Tensor | None:
    """Inverse-frequency weights when classes are imbalanced (max/min count > 1.5), else None."""
    y = y[y >= 0]
    counts = torch.bincount(y, minlength=n).float()
    present = counts[counts > 0]
    if not len(present) or present.max() / present.min() <= 1.5:
        return None
    return torch.where(counts > 0, counts.sum() / (len(present) * counts.clamp(min=1)), torch.zeros_like(counts))


def multitask_loss(logits, y: torch.Tensor, weights: list, label_smoothing: float) -> torch.Tensor:
    """The sum over tasks of cross-entropy on the images labelled for each task (-1: unlabelled)."""
    y = label_columns(y)
    total = 0.0
    for t, lg in enumerate(logits):
        m = y[:, t] >= 0
        if m.any():
            w = None if weights[t] is None else weights[t].to(lg.device)
            total = total + F.cross_entropy(lg[m], y[m, t], weight=w, label_smoothing=label_smoothing)
    return total


def block_groups(model: EdgeNet) -> list[list[torch.nn.Parameter]]:
    """The backbone's parameters by block, input side first (the registry lists each backbone's blocks)."""
    blocks = list(getattr(model.backbone, "blocks", []) or [model.backbone])
    return [list(b.parameters()) for b in blocks]


def freeze_for(model: EdgeNet, strategy: str, unfreeze_blocks: int) -> int:
    """Freeze what `strategy` leaves untrained (partial: all but the last `unfreeze_blocks` blocks);
    returns the number of trainable parameters. Parameters outside the backbone's blocks (such as
    EfficientNet-Lite's ImageNet classifier, which the features never use) stay frozen."""
    groups = block_groups(model)
    keep = len(groups) if strategy != "partial" else min(unfreeze_blocks, len(groups))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    for i, g in enumerate(groups):
        for p in g:
            p.requires_grad_(i >= len(groups) - keep)
    for p in model.heads.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _param_groups(model: EdgeNet, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: the head at `lr`; backbone block i of n (input side first) at
    lr * backbone_lr_mult * lr_decay ** (n - 1 - i) (layer-wise learning-rate decay); no weight decay
    on biases and norms; frozen parameters left out."""
    groups = block_groups(model)
    out = []
    n = len(groups)
    for i, params in enumerate(groups):
        lr = cfg.lr * cfg.backbone_lr_mult * cfg.lr_decay ** (n - 1 - i)
        decay = [p for p in params if p.requires_grad and p.ndim > 1]
        no_decay = [p for p in params if p.requires_grad and p.ndim <= 1]
        out += [g for g in ({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "lr": lr, "weight_decay": 0.0}) if g["params"]]
    out.append({"params": list(model.heads.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    return out


@torch.no_grad()
def adapt_batchnorm(model: EdgeNet, x: torch.Tensor, batch_size: int = 64) -> int:
    """AdaBN (Li et al., 2016): replace every BatchNorm layer's running mean and variance with the
    statistics of `x`, unlabelled images of the target domain; nothing else changes. Returns the
    number of BatchNorm layers adapted."""
    bns = _bn_layers(model)
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches, not an exponential one
        m.train()
    for i in range(0, len(x), batch_size):
        model.features(x[i:i + batch_size])
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()
    return len(bns)


def warmup_cosine(total: int, warmup: int):
    """The learning rate's factor at optimizer step `step` (0-based) of `total`: a linear warm-up over the
    first `warmup` steps ((step + 1) / warmup, reaching 1 at the last of them), then a cosine from 1 down to
    0 at `total` (torchvision's references: SequentialLR(LinearLR, CosineAnnealingLR)).

    For torch.optim.lr_scheduler.LambdaLR: that composition gives the same rates within ~1e-13 (relative), but
    its schedulers step the rate recursively (each step multiplies the last rate), so its rates differ from
    this closed form in the last bits, and so would the trained weights; tests/test_lr_schedule.py compares
    the two. A plain function (not a callable object): LambdaLR's state_dict, in train_state.pt, stays as it
    was."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return factor


def lr_scheduler(opt: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    """LambdaLR over `warmup_cosine`, warming up for `warmup_fraction` of `total_steps` (at least one step)."""
    warmup = max(1, int(warmup_fraction * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, warmup))


@dataclass
class TrainState:
    """What fine-tuning carries from epoch to epoch, and `train_state.pt` keeps for a resumed run.

    best_* pick the weights to keep (the probe's included: `best_acc` starts at its accuracy); `ft_best` and
    `bad` drive early stopping, which compares fine-tuning epochs with each other only (the first epochs often
    dip below the probe)."""

    epoch: int = 0                       # the last finished epoch (0: none)
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    ft_best: float = -float("inf")
    bad: int = 0
    history: list = field(default_factory=list)

    @classmethod
    def start(cls, model: EdgeNet, probe_accuracy: float | None, history: list) -> "TrainState":
        """Before the first epoch: the probe's weights (when there was a probe) are the best so far."""
        if probe_accuracy is None:
            return cls(history=history)
        return cls(best_acc=probe_accuracy, history=history,
                   best_state={k: v.detach().clone() for k, v in model.state_dict().items()})

    def end_epoch(self, epoch: int, losses: list[float], val_acc: float | None, seconds: float, model: EdgeNet,
                  cfg: TrainConfig) -> None:
        """Record epoch `epoch` in the history and the log, and `update` by its validation accuracy (without a
        validation split, by minus its training loss)."""
        rec = {"epoch": epoch, "phase": "finetune", "train_loss": float(np.mean(losses)), "val_accuracy": val_acc,
               "seconds": seconds}
        self.history.append(rec)
        log.info("epoch %d/%d: loss %.4f, val accuracy %s (%.0f s)", epoch, cfg.epochs, rec["train_loss"],
                 "n/a" if val_acc is None else f"{val_acc:.4f}", seconds)
        self.update(epoch, -float(np.mean(losses)) if val_acc is None else val_acc, model, cfg.patience)

    def update(self, epoch: int, score: float, model: EdgeNet, patience: int) -> None:
        """After epoch `epoch` scored `score` (validation accuracy, or minus the training loss)."""
        self.epoch = epoch
        if score >= self.best_acc:  # ties go to the later, fine-tuned weights
            self.best_acc, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if score > self.ft_best:
            self.ft_best, self.bad = score, 0
        else:
            self.bad += 1
            if self.bad >= patience:
                log.info("early stop: no better validation accuracy in %d epochs", self.bad)

    def save(self, path: Path, cfg_key: str, model: EdgeNet, opt, sched) -> None:
        """Written atomically after each epoch."""
        with atomic.atomic_path(path) as tmp:
            torch.save({"cfg_key": cfg_key, "epoch": self.epoch, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "best_acc": self.best_acc,
                        "best_epoch": self.best_epoch, "bad": self.bad, "ft_best": self.ft_best,
                        "best_state": self.best_state, "history": json.dumps(self.history)}, tmp)

    @classmethod
    def restore(cls, saved: dict, model: EdgeNet, opt, sched) -> "TrainState":
        """Load a `save`d state (on the training device) into `model`, `opt` and `sched`."""
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        log.info("resuming fine-tuning after epoch %d (best val %.4f at epoch %d)", saved["epoch"], saved["best_acc"],
                 saved["best_epoch"])
        return cls(saved["epoch"], saved["best_acc"], saved["best_epoch"], saved["best_state"],
                   saved.get("ft_best", -float("inf")), saved["bad"], json.loads(saved["history"]))


def load_state(path: Path, cfg_key: str) -> dict | None:
    """`train_state.pt` when it was made with this training config, else None."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("cfg_key") != cfg_key:
        log.info("ignoring %s: made with another training config", path)
        return None
    return saved


def train_one_epoch(model: EdgeNet, x_tr: torch.Tensor, y_tr: torch.Tensor, class_weights: list, opt, sched, scaler,
                    epoch: int, cfg: TrainConfig, aug=None, device: str = "cpu") -> list[float]:
    """One pass over the training images in the epoch's own shuffle (seeded by the seed and the epoch, so a
    resumed run draws what an uninterrupted one would), `aug` drawing each batch's augmentation from the same
    generator; one optimizer and scheduler step per batch. Returns the batches' losses."""
    set_train_mode(model, cfg.freeze_bn)
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    perm = torch.randperm(len(x_tr), generator=g)
    steps = math.ceil(len(x_tr) / cfg.batch_size)
    use_amp = device.startswith("cuda")
    losses = []
    bar = tqdm(range(steps), desc=f"fine-tune epoch {epoch}/{cfg.epochs}", leave=False, disable=bars_off())
    for s in bar:
        idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
        xb, yb = (x_tr[idx] if aug is None else aug.batch(idx, x_tr, g)), y_tr[idx]
        xb, yb = xb.to(device), yb.to(device)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            loss = multitask_loss(model(xb), yb, class_weights, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    if not cfg.freeze_bn:
        # BatchNorm trained: its running averages lag behind weights that moved every step (with a
        # few dozen steps they are far off, and a from-scratch net then predicts one class in eval
        # mode). Re-estimate them on the training images before validating ("precise BN").
        adapt_batchnorm(model, x_tr[:1024].to(device))
    return losses


def evaluate(model: EdgeNet, x: torch.Tensor, y: torch.Tensor, device: str = "cpu") -> float:
    """Top-1 accuracy on (x, y), the mean over tasks."""
    return float(np.nanmean(task_accuracies(predict_logits(model, x.to(device), task=None), y.to(device))))


def train(model: EdgeNet, data: Dataset, pp: Preprocessing, cfg: TrainConfig, work_dir: Path,
          device: str | None = None, weights: str = "imagenet") -> TrainResult:
    """Train `model` in place on `data`; leaves the best (by validation accuracy) weights loaded.

    `cfg.strategy` "auto" is resolved here from the data (`choose_strategy`; `weights` is what the
    backbone started from). `work_dir/train_state.pt` is written after every epoch; if it exists and
    was made with the same config, training resumes from it.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    strategy, reason = resolve_strategy(cfg, data, weights)
    x_tr, y_tr = tensorize(data.train, pp, "preprocess train")
    x_va, y_va = tensorize(data.val, pp, "preprocess val") if len(data.val) else (x_tr[:0], y_tr[:0])
    cw = [class_weights(label_columns(y_tr)[:, t], len(c)) for t, c in enumerate(data.tasks.values())]
    t_start = time.perf_counter()
    trainable = freeze_for(model, strategy, cfg.unfreeze_blocks) if strategy != "linear" else \
        sum(p.numel() for p in model.heads.parameters())
    if cfg.source_bn and _bn_layers(model):
        # AdaBN swaps source-domain statistics for target-domain ones, so the source model must be built on
        # source statistics: re-estimate them on the training images before anything is fitted on top.
        # (Kept frozen at the pretraining data's statistics, the fine-tuned layers co-adapt to those, and
        # swapping in any data set's statistics breaks them: measured in benchmarks/RESULTS.md.)
        adapt_batchnorm(model, x_tr)
    state_path, cfg_key = work_dir / "train_state.pt", state_key(cfg, strategy)
    saved = load_state(state_path, cfg_key) if strategy != "linear" else None
    probe = _probe_before(saved)
    if probe is None and strategy in ("linear", "lpft", "partial"):
        probe = fit_probe(model, data, pp, x_tr, y_tr, x_va, y_va, cw, cfg, strategy)
    history = [] if probe is None else [probe.record(bool(len(x_va)))]
    finish = functools.partial(_finish, model, data, x_va, y_va, cfg, strategy, probe, t_start, reason, trainable,
                               device)
    if strategy == "linear":
        return finish(TrainState(best_acc=probe.accuracy, history=history))

    aug = None
    if cfg.augment:  # photos: decoded once here, cropped anew each epoch; small images: flip and shift
        aug = TrainAugment.build(data.train.images, pp, cfg.photo_augment, (cfg.crop_scale, 1.0))
        log.info("augmentation: %s (%s)", ", ".join(aug.ops), aug.reason)
    model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg))
    sched = lr_scheduler(opt, math.ceil(len(x_tr) / cfg.batch_size) * cfg.epochs, cfg.warmup_fraction)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda"))
    state = TrainState.start(model, None if probe is None else probe.accuracy, history)
    if saved is not None:
        state = TrainState.restore(torch.load(state_path, map_location=device, weights_only=True), model, opt, sched)

    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        if state.bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        losses = train_one_epoch(model, x_tr, y_tr, cw, opt, sched, scaler, epoch, cfg, aug, device)
        val_acc = evaluate(model, x_va, y_va, device) if len(x_va) else None
        state.end_epoch(epoch, losses, val_acc, time.perf_counter() - t0, model, cfg)
        state.save(state_path, cfg_key, model, opt, sched)

    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    model.to("cpu").eval()
    return finish(state, None if saved is None else saved["epoch"], aug)


def resolve_strategy(cfg: TrainConfig, data: Dataset, weights: str) -> tuple[str, str | None]:
    """`cfg.strategy`, or what `auto` chooses for `data` (`choose_strategy`) and why."""
    if cfg.strategy != "auto":
        return cfg.strategy, None
    n_cls = [len(c) for c in data.tasks.values()]
    strategy, reason = choose_strategy(data.train.labels, n_cls[0], weights, data.val.labels, tasks=len(n_cls),
                                       lr_decay=cfg.lr_decay, backbone_lr_mult=cfg.backbone_lr_mult)
    log.info("--strategy auto chose %s: %s", strategy, reason)
    return strategy, reason


def state_key(cfg: TrainConfig, strategy: str) -> str:
    """What train_state.pt must have been made with to be resumed: the config and the resolved strategy.
    `calibrate` (the temperature) acts after the last epoch (on the final weights, never on this per-epoch
    state), so it is left out: the state resumes under either setting, and T is folded exactly once, at the end."""
    epoch_cfg = {k: v for k, v in asdict(cfg).items() if k != "calibrate"}
    return json.dumps({**epoch_cfg, "resolved_strategy": strategy}, sort_keys=True)


def _probe_before(saved: dict | None) -> Probe | None:
    """Resuming: the probe as the saved history records it (the state holds the weights it started fine-tuning
    from, so it is not fitted again); None when there is no such record."""
    done = next((h for h in json.loads(saved["history"]) if h.get("phase") == "probe"), None) if saved else None
    if done is None:
        return None
    log.info("linear probe: done before the interruption (val accuracy %s), not fitted again",
             "n/a" if done["val_accuracy"] is None else f"{done['val_accuracy']:.4f}")
    return Probe(done["val_accuracy"], done["seconds"])


def _finish(model: EdgeNet, data: Dataset, x_va: torch.Tensor, y_va: torch.Tensor, cfg: TrainConfig, strategy: str,
            probe: Probe | None, t_start: float, reason: str | None, trainable: int, device: str, state: TrainState,
            resumed: int | None = None, aug: TrainAugment | None = None) -> TrainResult:
    """The result of training: every parameter trainable again, the validation figures of the weights kept, and
    a temperature fitted per head and folded in (`fit_temperatures`; the probe's fold heads scaled alike)."""
    for p in model.parameters():
        p.requires_grad_(True)
    f_va = None if probe is None else probe.f_va
    val_logits = per_task = None
    if len(x_va):
        model.eval()
        with torch.no_grad():  # the linear strategy's backbone is frozen: its cached features give the logits
            val_logits = ([h(f_va) for h in model.heads.values()] if strategy == "linear" and f_va is not None
                          else predict_logits(model, x_va, task=None))
        if len(data.tasks) > 1:
            per_task = dict(zip(data.tasks, task_accuracies(val_logits, y_va)))
    best_acc, probe_acc = state.best_acc, None if probe is None else probe.accuracy
    if not len(x_va):  # the weights were chosen on the training loss: there is no accuracy to report
        best_acc = probe_acc = None
    temperature = fit_temperatures(model, data, val_logits, y_va, None if probe is None else probe.oof, cfg)
    folds = None if probe is None else probe.folds
    if folds is not None:  # the fold heads give the same scores as the head they stand in for
        t = temperature["tasks"][next(iter(data.tasks))]
        scale = t["temperature"] if t.get("folded") else 1.0
        folds.update(weight=folds["weight"] / scale, bias=folds["bias"] / scale)
    return TrainResult(strategy, state.best_epoch, best_acc, probe_acc, time.perf_counter() - t_start,
                       None if probe is None else probe.seconds, state.history, resumed, reason, trainable, per_task,
                       device, None if probe is None else probe.selection, temperature,
                       None if aug is None else aug.describe(), folds)


def fit_temperatures(model: EdgeNet, data: Dataset, val_logits: list | None, y_va: torch.Tensor, oof: tuple | None,
                     cfg: TrainConfig) -> dict:
    """Temperature scaling of every head, folded into its weights (edgexfer/temperature.py): report.json's
    `calibration` section. Held out: the out-of-fold logits of the probe's cross-validation when the probe was
    refitted on train + val (`oof`: logits, labels, folds), else the validation split, reported as uncertain when
    it is small (a fine-tuned model is not cross-validated: that would train it k times); nothing when there is
    neither."""
    from edgexfer.temperature import temperature_scale_heads

    names, n_cls = list(data.tasks), [len(c) for c in data.tasks.values()]
    held, fitted_on = {}, {}
    if oof is not None:
        z, y, k = oof
        held[names[0]] = (z, y)
        fitted_on = {"split": f"out-of-fold logits, stratified {k}-fold cross-validation on train + val",
                     "uncertain": bool(len(y) < SMALL_VAL_IMAGES),
                     "reason": "the linear probe was refitted on train + val, so validation is not held out; the "
                               "probe's own cross-validation folds (its first partition, at its chosen "
                               "strength) give every image a held-out logit"}
    elif val_logits is not None:
        y2 = label_columns(y_va)
        for t, name in enumerate(names):
            m = y2[:, t] >= 0
            held[name] = (val_logits[t][m].numpy(), y2[m, t].numpy())
        small = small_validation(y_va, n_cls[0])
        fitted_on = {"split": "validation", "uncertain": small,
                     "reason": (f"{int((y2[:, 0] >= 0).sum())} validation images (< {SMALL_VAL_IMAGES}, or < "
                                f"{SMALL_VAL_PER_CLASS} in some class): T rests on few images (see its 90% "
                                "bootstrap interval); cross-validating a fine-tuned model would train it k times"
                                if small else "the validation split, which chose the weights, holds these images out "
                                "of training")}
    rec = temperature_scale_heads(dict(model.heads.items()), held, fitted_on, enabled=cfg.calibrate, seed=cfg.seed)
    if not cfg.calibrate:
        rec["reason"] = "--no-calibrate: the heads' logits are as trained"
    for name, r in rec["tasks"].items():
        f = r["fitted_on"]
        if r["folded"]:
            log.info("temperature scaling (%s): T=%.3f on %d %s images%s; ECE %.4f -> %.4f", name, r["temperature"],
                     f["images"], f["split"], " (uncertain: few images)" if f["uncertain"] else "",
                     f["ece_before"], f["ece_after"])
        elif r.get("not_folded"):
            log.warning("temperature scaling (%s): not applied: %s", name, r["not_folded"])
    return rec
