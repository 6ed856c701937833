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

from edgexfer.runtime.progress import bars_off

from edgexfer.data import Dataset, Split
from edgexfer.model import EdgeNet
from edgexfer.runtime import atomic
from edgexfer.runtime.metadata import Preprocessing
from edgexfer.runtime.preprocess import preprocess

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "linear", "partial", "finetune", "lpft")


@dataclass
class TrainConfig:
    strategy: str = "lpft"          # auto | linear | partial | finetune | lpft
    epochs: int = 8                 # fine-tuning epochs
    batch_size: int = 32
    lr: float = 3e-4                # head learning rate; the backbone's last block gets lr * backbone_lr_mult
    backbone_lr_mult: float = 1.0
    lr_decay: float = 1.0           # layer-wise: each earlier block gets this times the next block's rate
    unfreeze_blocks: int = 3        # partial: how many of the backbone's last blocks train
    freeze_bn: bool = True          # BatchNorm statistics stay as pretrained (eval mode) while fine-tuning
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1    # of all fine-tuning steps
    probe_steps: int = 300          # full-batch AdamW steps of the linear probe
    probe_lr: float = 3e-3
    augment: bool = True            # fine-tuning augmentation, drawn anew every epoch (edgexfer/augment.py)
    photo_augment: str = "trivial"  # photos, besides RandomResizedCrop and flip: trivial (TrivialAugmentWide) | jitter | none
    crop_scale: float = 0.35        # photos: RandomResizedCrop's smallest fraction of the image's area
    patience: int = 4               # early stopping on validation accuracy
    seed: int = 0
    scratch_baseline: bool = False  # also train the same network from random init, same budget
    adapt_bn: str | None = None     # folder of unlabelled target-domain images: AdaBN after training
    adapt_bn_force: bool = False    # keep AdaBN's statistics even when the label-free checks say it hurt
    source_bn: bool = False         # BatchNorm statistics from the training images, not the pretraining data
    calibrate: bool = True          # fit a temperature per head on held-out logits and fold it in (calibration.py)
    probe_views: int = 4            # the cross-validated probe also fits this many augmented views of each image

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1]; got {self.lr_decay}")
        if self.unfreeze_blocks < 1:
            raise ValueError(f"unfreeze_blocks must be at least 1; got {self.unfreeze_blocks}")
        from edgexfer.augment import PHOTO_AUGMENTS

        if self.photo_augment not in PHOTO_AUGMENTS:
            raise ValueError(f"unknown photo_augment {self.photo_augment!r}; choose one of {PHOTO_AUGMENTS}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1]; got {self.crop_scale}")


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
    calibration: dict | None = None  # temperature per head (already folded into the weights), ECE before/after
    augmentation: dict | None = None  # what fine-tuning's augmentation did to the training images, and why
    # the cross-validated probe's fold heads (`calibration.fold_heads`, temperature folded in): saved in the
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


def augment(x: torch.Tensor, g: torch.Generator, pad_frac: float = 0.08) -> torch.Tensor:
    """Small-image augmentation on a normalized batch: random horizontal flip and random shift (what
    `augment.TrainAugment` applies to small images, e.g. Fashion-MNIST upsampled; photos get crops)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    p = max(1, int(round(pad_frac * h)))
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


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


@torch.no_grad()
def extract_features(model: EdgeNet, x: torch.Tensor, batch_size: int = 128, desc: str = "features") -> torch.Tensor:
    model.eval()
    chunks = range(0, len(x), batch_size)
    return torch.cat([model.features(x[i:i + batch_size]) for i in tqdm(chunks, desc=desc, leave=False, disable=bars_off())])


def _cols(y: torch.Tensor) -> torch.Tensor:
    return y[:, None] if y.ndim == 1 else y


def task_accuracies(logits: list[torch.Tensor], y: torch.Tensor) -> list[float]:
    """Top-1 accuracy per task over the images labelled for it."""
    y = _cols(y)
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
    y = _cols(y)
    total = 0.0
    for t, lg in enumerate(logits):
        m = y[:, t] >= 0
        if m.any():
            w = None if weights[t] is None else weights[t].to(lg.device)
            total = total + F.cross_entropy(lg[m], y[m, t], weight=w, label_smoothing=label_smoothing)
    return total


def linear_probe(model: EdgeNet, f_tr: torch.Tensor, y_tr: torch.Tensor, f_va: torch.Tensor, y_va: torch.Tensor,
                 cfg: TrainConfig, weights: list) -> float:
    """Fit each head on cached features (full batch, AdamW); keep each head's best step by its validation
    accuracy. Returns the mean validation accuracy over tasks."""
    y_tr, y_va = _cols(y_tr), _cols(y_va)
    accs = []
    for t, head in enumerate(model.heads.values()):
        mt, mv = y_tr[:, t] >= 0, y_va[:, t] >= 0
        ft, yt, fv, yv = f_tr[mt], y_tr[mt, t], f_va[mv], y_va[mv, t]
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=cfg.weight_decay)
        best, best_state = -float("inf"), None
        for step in range(cfg.probe_steps):
            head.train()
            loss = F.cross_entropy(head(ft), yt, weight=weights[t], label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 9 or step == cfg.probe_steps - 1:
                with torch.no_grad():
                    acc = (head(fv).argmax(1) == yv).float().mean().item() if len(yv) else -loss.item()
                if acc > best:
                    best, best_state = acc, {k: v.clone() for k, v in head.state_dict().items()}
        head.load_state_dict(best_state)
        accs.append(best)
    return float(np.mean(accs))


# A validation split this small cannot decide (one image moves its accuracy by 2+ points): the probe's
# strength is chosen by k-fold cross-validation on the cached features instead (issue 12).
SMALL_VAL_IMAGES = 50
SMALL_VAL_PER_CLASS = 10


def small_validation(y_va: torch.Tensor, n_classes: int) -> bool:
    y = _cols(y_va)[:, 0]
    counts = np.bincount(y[y >= 0].numpy(), minlength=n_classes)
    return int(counts.sum()) < SMALL_VAL_IMAGES or int(counts.min()) < SMALL_VAL_PER_CLASS


def probe_augmented_views(split: Split, pp: Preprocessing, view: int, seed: int) -> torch.Tensor:
    """One augmented view of every image of `split` as the model's input (N, C, H, W): a random resized
    crop (35-100% of the area) at the input size, a horizontal flip, and for colour images a mild colour
    jitter (torchvision.transforms.v2), seeded by (seed, view). What the probe sees besides the centre crop:
    a few views per image are cheap more data when labels are few (the features are computed once)."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    from edgexfer.runtime.preprocess import load_image, to_8bit

    ops = [T.RandomResizedCrop(pp.crop, scale=(0.35, 1.0), antialias=True), T.RandomHorizontalFlip()]
    if pp.color == "RGB":
        ops.append(T.ColorJitter(0.2, 0.2, 0.2))
    tf = T.Compose([*ops, T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)])
    out = []
    log.info("linear probe: augmented view %d of %d images", view + 1, len(split))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + view)
        for src in split.images:
            img = to_8bit(load_image(src))
            img = img.convert(pp.color) if img.mode != pp.color else img
            side = max(pp.crop * 3 // 2, 1)  # decode once, then crop from a modest size: the crop is resized anyway
            if min(img.size) > side:
                s = side / min(img.size)
                img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BILINEAR)
            out.append(tf(img))
    return torch.stack(out)


def view_folds(t: np.ndarray, k: int, seed: int, views: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds over N images whose rows are stacked as [originals, view 1, ..., view V]: each
    fold trains on every row of its training images and scores the held-out images' originals only, so
    no view of a held-out image is fitted and the score is the centre crop's, as served."""
    from sklearn.model_selection import StratifiedKFold

    n = len(t)
    return [(np.concatenate([tr + v * n for v in range(views + 1)]), te)
            for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), t)]


# the probe's L2 strengths: 25 from 1e-4 to 1e4, a step of x2.2 (scikit-learn's Cs=10 steps by x7.7, too coarse
# to tell neighbouring strengths apart)
PROBE_CS = np.logspace(-4, 4, 25)


def cv_probe(head: torch.nn.Linear, f: torch.Tensor, y: torch.Tensor, balanced: bool, seed: int,
             views: torch.Tensor | None = None) -> dict | None:
    """Fit `head` as multinomial logistic regression on features `f` (N, D) and labels `y` (N,), its L2
    strength chosen by stratified k-fold cross-validation (scikit-learn's LogisticRegressionCV, k = min(5,
    the smallest class)); None when some class has fewer than 2 images (nothing to cross-validate).
    `views` (V, N, D): features of V augmented views of the same images, fitted beside them (view_folds
    keeps every view of a held-out image out of its fold)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    x, t = f.numpy().astype(np.float64), y.numpy()
    counts = np.bincount(t, minlength=head.out_features)
    if counts.min() < 2:
        return None
    k = int(min(5, counts.min()))
    v = 0 if views is None else len(views)
    folds = view_folds(t, k, seed, v)
    if v:
        x = np.concatenate([x, views.reshape(-1, x.shape[1]).numpy().astype(np.float64)])
        t = np.tile(t, v + 1)
    log.info("linear probe: cross-validating the strength (%d strengths, %d folds, %d rows)", len(PROBE_CS), k, len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter at the weakest regularisation
        clf = LogisticRegressionCV(Cs=PROBE_CS, cv=folds, max_iter=2000,
                                   class_weight="balanced" if balanced else None).fit(x, t)
    scores = np.asarray(next(iter(clf.scores_.values())))  # (folds, Cs): held-out accuracy of each strength
    best = int(np.argmin(np.abs(clf.Cs_ - clf.C_[0])))
    fold = scores[:, best]
    edge = None
    if best in (0, len(clf.Cs_) - 1):
        edge = (f"the cross-validated strength C={clf.C_[0]:.3g} is the {'strongest' if best == 0 else 'weakest'} "
                f"regularisation searched ({PROBE_CS[0]:g}-{PROBE_CS[-1]:g}): the best may lie beyond it; with "
                f"{int(counts.min())} labelled images in the smallest class the folds say little")
        log.warning("linear probe: %s", edge)
    w, b = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # scikit-learn keeps one row for two classes: logits (0, w.x + b)
        w, b = np.stack([np.zeros_like(w[0]), w[0]]), np.array([0.0, b[0]])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    return {"method": f"LogisticRegressionCV, stratified {k}-fold cross-validation over {len(clf.Cs_)} strengths "
                      f"({PROBE_CS[0]:g} to {PROBE_CS[-1]:g}, log-spaced)"
                      + (f", fitted on each image and {v} augmented views of it" if v else ""),
            "images": len(f), "views": v, "folds": k, "C": float(clf.C_[0]), "cv_accuracy": float(fold.mean()),
            "cv_stderr": float(fold.std(ddof=1) / np.sqrt(k)), "C_range": [float(PROBE_CS[0]), float(PROBE_CS[-1])],
            "C_at_edge": edge}


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


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def train(model: EdgeNet, data: Dataset, pp: Preprocessing, cfg: TrainConfig, work_dir: Path,
          device: str | None = None, weights: str = "imagenet") -> TrainResult:
    """Train `model` in place on `data`; leaves the best (by validation accuracy) weights loaded.

    `cfg.strategy` "auto" is resolved here from the data (`choose_strategy`; `weights` is what the
    backbone started from). `work_dir/train_state.pt` is written after every epoch; if it exists and
    was made with the same config, training resumes from it.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    n_cls = [len(c) for c in data.tasks.values()]
    strategy, reason = cfg.strategy, None
    if strategy == "auto":
        strategy, reason = choose_strategy(data.train.labels, n_cls[0], weights, data.val.labels, tasks=len(n_cls),
                                           lr_decay=cfg.lr_decay, backbone_lr_mult=cfg.backbone_lr_mult)
        log.info("--strategy auto chose %s: %s", strategy, reason)
    x_tr, y_tr = tensorize(data.train, pp, "preprocess train")
    x_va, y_va = tensorize(data.val, pp, "preprocess val") if len(data.val) else (x_tr[:0], y_tr[:0])
    cw = [class_weights(_cols(y_tr)[:, t], n) for t, n in enumerate(n_cls)]
    history: list[dict] = []
    t_start = time.perf_counter()
    trainable = freeze_for(model, strategy, cfg.unfreeze_blocks) if strategy != "linear" else \
        sum(p.numel() for p in model.heads.parameters())

    def finish(best_epoch, best_acc, probe_acc, probe_s, resumed=None) -> TrainResult:
        for p in model.parameters():
            p.requires_grad_(True)
        per_task = None
        val_logits = None
        if len(x_va):
            model.eval()
            with torch.no_grad():  # the linear strategy's backbone is frozen: its cached features give the logits
                val_logits = ([h(f_va) for h in model.heads.values()] if strategy == "linear" and f_va is not None
                              else predict_logits(model, x_va, task=None))
        if len(n_cls) > 1 and len(x_va):
            accs = task_accuracies(val_logits, y_va)
            per_task = dict(zip(data.tasks, accs))
        if not len(x_va):  # the weights were chosen on the training loss: there is no accuracy to report
            best_acc = probe_acc = None
        calibration = calibrate(model, data, val_logits, y_va, oof, cfg)
        if folds is not None:  # the fold heads give the same scores as the head they stand in for
            t = calibration["tasks"][next(iter(data.tasks))]
            scale = t["temperature"] if t.get("folded") else 1.0
            folds.update(weight=folds["weight"] / scale, bias=folds["bias"] / scale)
        return TrainResult(strategy, best_epoch, best_acc, probe_acc, time.perf_counter() - t_start, probe_s,
                           history, resumed, reason, trainable, per_task, device, selection, calibration,
                           None if aug is None else aug.describe(), folds)

    if cfg.source_bn and _bn_layers(model):
        # AdaBN swaps source-domain statistics for target-domain ones, so the source model must be built on
        # source statistics: re-estimate them on the training images before anything is fitted on top.
        # (Kept frozen at the pretraining data's statistics, the fine-tuned layers co-adapt to those, and
        # swapping in any data set's statistics breaks them: measured in benchmarks/RESULTS.md.)
        adapt_batchnorm(model, x_tr)
    probe_acc = probe_s = selection = f_va = oof = aug = folds = None
    state_path = work_dir / "train_state.pt"
    # `calibrate` acts after the last epoch (on the final weights, never on this per-epoch state), so it is left
    # out: the state resumes under either setting, and the temperature is folded exactly once, at the end
    epoch_cfg = {k: v for k, v in asdict(cfg).items() if k != "calibrate"}
    cfg_key = json.dumps({**epoch_cfg, "resolved_strategy": strategy}, sort_keys=True)
    st = None
    if strategy != "linear" and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if st.get("cfg_key") != cfg_key:
            log.info("ignoring %s: made with another training config", state_path)
            st = None
    probe_done = next((h for h in json.loads(st["history"]) if h.get("phase") == "probe"), None) if st else None
    if probe_done is not None:  # resuming: the state holds the weights the probe started from; not fitted again
        probe_acc, probe_s = probe_done["val_accuracy"], probe_done["seconds"]
        history.append(probe_done)
        log.info("linear probe: done before the interruption (val accuracy %s), not fitted again",
                 "n/a" if probe_acc is None else f"{probe_acc:.4f}")
    elif strategy in ("linear", "lpft", "partial"):
        t0 = time.perf_counter()
        log.info("linear probe: features of %d training and %d validation images", len(x_tr), len(x_va))
        f_tr = extract_features(model, x_tr, desc="features train")
        f_va = extract_features(model, x_va, desc="features val") if len(x_va) else f_tr[:0]
        if strategy == "linear" and len(n_cls) == 1 and (not len(x_va) or small_validation(y_va, n_cls[0])):
            # too few validation images to decide on: cross-validate the probe's strength, then refit on
            # train + val (every label counts). Not (yet) for LP-FT's starting probe: on flowers-dev that start
            # gave a slightly better FP32 file but a much worse INT8 one that the 30-image guard passed
            # (benchmarks/RESULTS.md, "Real photos": results/photos_cv_lpft.json); the guard has to decide on
            # agreement first.
            f_fit = torch.cat([f_tr, f_va])
            y_fit = torch.cat([_cols(y_tr)[:, 0], _cols(y_va)[:, 0]])
            both = Split(list(data.train.images) + list(data.val.images), np.concatenate([data.train.labels,
                                                                                          data.val.labels]))
            views = torch.stack([extract_features(model, probe_augmented_views(both, pp, v, cfg.seed),
                                                  desc=f"features view {v + 1}") for v in range(cfg.probe_views)]) \
                if cfg.probe_views else None
            selection = cv_probe(model.heads[next(iter(model.heads))], f_fit, y_fit, cw[0] is not None, cfg.seed,
                                 views)
            if selection:
                selection.update(refit_on="train + val",
                                 reason="no validation split" if not len(x_va) else
                                        f"{len(x_va)} validation images (< {SMALL_VAL_IMAGES}, or < "
                                        f"{SMALL_VAL_PER_CLASS} in some class): one image moves them by "
                                        f"{100 / len(x_va):.1f} points")
                log.info("linear probe: C=%.3g by %d-fold cross-validation on %d images, CV accuracy %.4f ± %.4f; "
                         "fitted on %s", selection["C"], selection["folds"], selection["images"],
                         selection["cv_accuracy"], selection["cv_stderr"], selection["refit_on"])
                # val is in the refit, so not held out: calibration is measured (and T fitted) on out-of-fold logits
                # and the fold heads behind those logits go with the checkpoint: the INT8 guard scores every
                # labelled image by the head that did not see it (edgexfer.guard)
                from edgexfer.calibration import fold_heads, fold_logits

                log.info("linear probe: fitting the %d fold heads (out-of-fold answers for calibration and the INT8 guard)",
                         selection["folds"])
                folds = fold_heads(f_fit.numpy(), y_fit.numpy(), selection["C"], cw[0] is not None,
                                   selection["folds"], cfg.seed, views=None if views is None else views.numpy())
                oof = (fold_logits(folds, f_fit.numpy()), y_fit.numpy(), selection["folds"])
        if selection:  # fitted on val too: its cross-validated accuracy is the one to report
            probe_acc = selection["cv_accuracy"]
        else:
            probe_acc = linear_probe(model, f_tr, y_tr, f_va, y_va, cfg, cw)
        probe_s = time.perf_counter() - t0
        log.info("linear probe: %s accuracy %s in %.1f s", "cross-validated" if selection else "val",
                 f"{probe_acc:.4f}" if len(x_va) else "n/a (no validation split)", probe_s)
        history.append({"epoch": 0, "phase": "probe", "val_accuracy": probe_acc if len(x_va) else None,
                        "seconds": probe_s})
    if strategy == "linear":
        return finish(0, probe_acc, probe_acc, probe_s)

    if cfg.augment:  # photos: decoded once here, cropped anew each epoch; small images: flip and shift
        from edgexfer.augment import TrainAugment

        aug = TrainAugment.build(data.train.images, pp, cfg.photo_augment, (cfg.crop_scale, 1.0))
        log.info("augmentation: %s (%s)", ", ".join(aug.ops), aug.reason)
    model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg))
    steps_per_epoch = math.ceil(len(x_tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, int(cfg.warmup_fraction * total))))
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    def val_accuracy(losses) -> float:
        if not len(x_va):
            return -float(np.mean(losses))
        return float(np.nanmean(task_accuracies(predict_logits(model, x_va.to(device), task=None), y_va.to(device))))

    # best_* pick the weights to keep (the probe's included); ft_best and bad drive early stopping, which
    # compares fine-tuning epochs with each other only: the first epochs often dip below the probe.
    start_epoch, best_acc, best_epoch, best_state, bad = 1, probe_acc if probe_acc is not None else -1.0, 0, None, 0
    ft_best = -float("inf")
    resumed = None
    if probe_acc is not None:
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if st is not None:
        st = torch.load(state_path, map_location=device, weights_only=True)  # on the training device
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        start_epoch, best_acc, best_epoch, bad = st["epoch"] + 1, st["best_acc"], st["best_epoch"], st["bad"]
        ft_best = st.get("ft_best", ft_best)
        best_state = st["best_state"]
        history = json.loads(st["history"])
        resumed = st["epoch"]
        log.info("resuming fine-tuning after epoch %d (best val %.4f at epoch %d)", st["epoch"], best_acc, best_epoch)

    for epoch in range(start_epoch, cfg.epochs + 1):
        if bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        set_train_mode(model, cfg.freeze_bn)
        g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)  # same shuffle whether resumed or not
        perm = torch.randperm(len(x_tr), generator=g)
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"fine-tune epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=bars_off())
        for s in bar:
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb, yb = (x_tr[idx] if aug is None else aug.batch(idx, x_tr, g)), y_tr[idx]
            xb, yb = xb.to(device), yb.to(device)
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                loss = multitask_loss(model(xb), yb, cw, cfg.label_smoothing)
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
        val_acc = val_accuracy(losses)
        rec = {"epoch": epoch, "phase": "finetune", "train_loss": float(np.mean(losses)),
               "val_accuracy": val_acc if len(x_va) else None, "seconds": time.perf_counter() - t0}
        history.append(rec)
        log.info("epoch %d/%d: loss %.4f, val accuracy %s (%.0f s)", epoch, cfg.epochs, rec["train_loss"],
                 "n/a" if rec["val_accuracy"] is None else f"{val_acc:.4f}", rec["seconds"])
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
    return finish(best_epoch, best_acc, probe_acc, probe_s, resumed)


def calibrate(model: EdgeNet, data: Dataset, val_logits: list | None, y_va: torch.Tensor, oof: tuple | None,
              cfg: TrainConfig) -> dict:
    """Temperature scaling of every head, folded into its weights (edgexfer/calibration.py). Held out: the
    out-of-fold logits of the probe's cross-validation when the probe was refitted on train + val (`oof`: logits,
    labels, folds), else the validation split, reported as uncertain when it is small (a fine-tuned model is
    not cross-validated: that would train it k times); nothing when there is neither."""
    from edgexfer.calibration import calibrate_heads

    names, n_cls = list(data.tasks), [len(c) for c in data.tasks.values()]
    held, fitted_on = {}, {}
    if oof is not None:
        z, y, k = oof
        held[names[0]] = (z, y)
        fitted_on = {"split": f"out-of-fold logits, stratified {k}-fold cross-validation on train + val",
                     "uncertain": bool(len(y) < SMALL_VAL_IMAGES),
                     "reason": "the linear probe was refitted on train + val, so validation is not held out; the "
                               "probe's own cross-validation folds (its chosen strength) give every image a "
                               "held-out logit"}
    elif val_logits is not None:
        y2 = _cols(y_va)
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
    rec = calibrate_heads(dict(model.heads.items()), held, fitted_on, enabled=cfg.calibrate, seed=cfg.seed)
    if not cfg.calibrate:
        rec["reason"] = "--no-calibrate: the heads' logits are as trained"
    for name, r in rec["tasks"].items():
        f = r["fitted_on"]
        if r["folded"]:
            log.info("calibration (%s): T=%.3f on %d %s images%s; ECE %.4f -> %.4f", name, r["temperature"],
                     f["images"], f["split"], " (uncertain: few images)" if f["uncertain"] else "",
                     f["ece_before"], f["ece_after"])
        elif r.get("not_folded"):
            log.warning("calibration (%s): not applied: %s", name, r["not_folded"])
    return rec
