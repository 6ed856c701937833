"""The linear probe: each head fitted on the frozen backbone's cached features.

    fit_probe(model, data, pp, x_tr, y_tr, x_va, y_va, class_weights, cfg, strategy) -> Probe

Two ways, chosen by how much the validation split can decide (`small_validation`):

- a validation split big enough to choose by (or LP-FT's starting probe, or several tasks): full-batch
  AdamW on the cached features, each head kept at its best step by validation accuracy (`linear_probe`);
- too few validation images (the `linear` strategy, one task): multinomial logistic regression whose L2
  strength is chosen from `PROBE_CS` by stratified k-fold cross-validation over every labelled image
  (`cv_probe`), each image fitted beside `TrainConfig.probe_views` augmented views of it
  (`edgexfer.augment.probe_view`; `view_folds` keeps a held-out image's views out of its fold), then
  refitted on train + val. The fold heads of that cross-validation (`fold_heads`) answer each labelled
  image out of fold: the held-out logits temperature scaling is fitted on, and the INT8 guard's
  (`fold_logits`; they go with the checkpoint).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgexfer.runtime.progress import bars_off

if TYPE_CHECKING:
    from edgexfer.data import Dataset
    from edgexfer.finetune import TrainConfig
    from edgexfer.model import EdgeNet
    from edgexfer.runtime.metadata import Preprocessing

log = logging.getLogger(__name__)

# A validation split this small cannot decide (one image moves its accuracy by 2+ points): the probe's
# strength is chosen by k-fold cross-validation on the cached features instead (issue 12).
SMALL_VAL_IMAGES = 50
SMALL_VAL_PER_CLASS = 10

# the probe's L2 strengths: 25 from 1e-4 to 1e4, a step of x2.2 (scikit-learn's Cs=10 steps by x7.7, too coarse
# to tell neighbouring strengths apart)
PROBE_CS = np.logspace(-4, 4, 25)


def label_columns(y: torch.Tensor) -> torch.Tensor:
    """Labels as (N, tasks): one task's (N,) labels become a column."""
    return y[:, None] if y.ndim == 1 else y


def small_validation(y_va: torch.Tensor, n_classes: int) -> bool:
    """Too few validation images (of the first task) to choose by: under SMALL_VAL_IMAGES, or under
    SMALL_VAL_PER_CLASS in some class."""
    y = label_columns(y_va)[:, 0]
    counts = np.bincount(y[y >= 0].numpy(), minlength=n_classes)
    return int(counts.sum()) < SMALL_VAL_IMAGES or int(counts.min()) < SMALL_VAL_PER_CLASS


@torch.no_grad()
def extract_features(model: EdgeNet, x: torch.Tensor, batch_size: int = 128, desc: str = "features") -> torch.Tensor:
    """The backbone's pooled features of `x` (N, C, H, W), in eval mode."""
    model.eval()
    chunks = range(0, len(x), batch_size)
    return torch.cat([model.features(x[i:i + batch_size]) for i in tqdm(chunks, desc=desc, leave=False, disable=bars_off())])


def linear_probe(model: EdgeNet, f_tr: torch.Tensor, y_tr: torch.Tensor, f_va: torch.Tensor, y_va: torch.Tensor,
                 cfg: TrainConfig, weights: list) -> float:
    """Fit each head on cached features (full batch, AdamW); keep each head's best step by its validation
    accuracy. Returns the mean validation accuracy over tasks."""
    y_tr, y_va = label_columns(y_tr), label_columns(y_va)
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


def view_folds(t: np.ndarray, k: int, seed: int, views: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified k folds over N images whose rows are stacked as [originals, view 1, ..., view V]: each
    fold trains on every row of its training images and scores the held-out images' originals only, so
    no view of a held-out image is fitted and the score is the centre crop's, as served."""
    from sklearn.model_selection import StratifiedKFold

    n = len(t)
    return [(np.concatenate([tr + v * n for v in range(views + 1)]), te)
            for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(n), t)]


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


def fold_heads(f: np.ndarray, y: np.ndarray, C: float, balanced: bool, folds: int, seed: int,
               views: np.ndarray | None = None) -> dict:
    """The heads of the stratified `folds`-fold split `cv_probe` chose C with (same seed, same folds; with
    `views` (V, N, D), the augmented views of each fold's training images fitted too, as cv_probe does): a
    multinomial logistic regression (strength C) per fold, fitted without the images of that fold.

    {"fold": (N,) the fold that holds each image out, "weight": (k, K, D), "bias": (k, K)}: image i's
    out-of-fold logits are weight[fold[i]] @ f[i] + bias[fold[i]], the answer of a head that never saw it
    (two classes: logits (0, w.x + b), as `cv_probe` writes them)."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    v = 0 if views is None else len(views)
    x = np.asarray(f, np.float64)
    xs = np.concatenate([x, np.asarray(views, np.float64).reshape(-1, x.shape[1])]) if v else x
    ys = np.tile(y, v + 1)
    fold, weights, biases = np.zeros(len(x), np.int64), [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter at weak regularisation
        for j, (tr, te) in enumerate(view_folds(np.asarray(y), folds, seed, v)):
            clf = LogisticRegression(C=C, max_iter=2000, class_weight="balanced" if balanced else None)
            clf.fit(xs[tr], ys[tr])
            w, b = clf.coef_, clf.intercept_
            if len(clf.classes_) == 2:
                w, b = np.stack([np.zeros_like(w[0]), w[0]]), np.array([0.0, b[0]])
            weights.append(w)
            biases.append(b)
            fold[te] = j
    return {"fold": fold, "weight": np.stack(weights), "bias": np.stack(biases)}


def fold_logits(heads: dict, f: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold logits (N, K) of features `f` (N, D) by `fold_heads`' heads; `rows` (N,): the labelled image
    each row of `f` shows (default: row i is image i)."""
    fold = np.asarray(heads["fold"])[np.arange(len(f)) if rows is None else np.asarray(rows)]
    w, b = np.asarray(heads["weight"]), np.asarray(heads["bias"])
    out = np.empty((len(f), w.shape[1]), w.dtype)
    for j in range(len(w)):
        m = fold == j
        out[m] = np.asarray(f[m], w.dtype) @ w[j].T + b[j]
    return out


def out_of_fold_logits(f: np.ndarray, y: np.ndarray, C: float, balanced: bool, folds: int, seed: int,
                       views: np.ndarray | None = None) -> np.ndarray:
    """Logits of each image from a multinomial logistic regression (strength C) fitted without it (`fold_heads`).
    (N, K)."""
    return fold_logits(fold_heads(f, y, C, balanced, folds, seed, views), f)


@dataclass
class Probe:
    """What fitting the probe gave (the heads themselves are fitted in place)."""

    accuracy: float | None                 # validation accuracy, or the cross-validated one when refitted on val
    seconds: float
    selection: dict | None = None          # cross-validation's choice of strength (the report's probe_selection)
    f_va: torch.Tensor | None = None       # the validation images' features (the linear strategy's logits)
    oof: tuple | None = None               # (out-of-fold logits, labels, folds): where the temperature is fitted
    folds: dict | None = None              # `fold_heads`' heads, for the INT8 guard

    def record(self, has_validation: bool) -> dict:
        """The probe's line of the training history."""
        return {"epoch": 0, "phase": "probe", "val_accuracy": self.accuracy if has_validation else None,
                "seconds": self.seconds}


def fit_probe(model: EdgeNet, data: Dataset, pp: Preprocessing, x_tr: torch.Tensor, y_tr: torch.Tensor,
              x_va: torch.Tensor, y_va: torch.Tensor, class_weights: list, cfg: TrainConfig,
              strategy: str) -> Probe:
    """Fit `model`'s heads on its cached features: cross-validated and refitted on train + val when `strategy` is
    linear with one task and the validation split is too small to choose by (`small_validation`), else stepwise on
    the training images with the validation split choosing each head's step (`linear_probe`)."""
    from edgexfer.augment import probe_view
    from edgexfer.data import Split

    n_cls = [len(c) for c in data.tasks.values()]
    t0 = time.perf_counter()
    log.info("linear probe: features of %d training and %d validation images", len(x_tr), len(x_va))
    f_tr = extract_features(model, x_tr, desc="features train")
    f_va = extract_features(model, x_va, desc="features val") if len(x_va) else f_tr[:0]
    selection = oof = folds = None
    if strategy == "linear" and len(n_cls) == 1 and (not len(x_va) or small_validation(y_va, n_cls[0])):
        # too few validation images to decide on: cross-validate the probe's strength, then refit on
        # train + val (every label counts). Not (yet) for LP-FT's starting probe: on flowers-dev that start
        # gave a slightly better FP32 file but a much worse INT8 one that the 30-image guard passed
        # (benchmarks/RESULTS.md, "Real photos": results/photos_cv_lpft.json); the guard has to decide on
        # agreement first.
        f_fit = torch.cat([f_tr, f_va])
        y_fit = torch.cat([label_columns(y_tr)[:, 0], label_columns(y_va)[:, 0]])
        both = Split(list(data.train.images) + list(data.val.images), np.concatenate([data.train.labels,
                                                                                      data.val.labels]))
        views = None
        if cfg.probe_views:
            views = []
            for v in range(cfg.probe_views):
                log.info("linear probe: augmented view %d of %d images", v + 1, len(both))
                views.append(extract_features(model, probe_view(both.images, pp, v, cfg.seed),
                                              desc=f"features view {v + 1}"))
            views = torch.stack(views)
        balanced = class_weights[0] is not None
        selection = cv_probe(model.heads[next(iter(model.heads))], f_fit, y_fit, balanced, cfg.seed, views)
        if selection:
            selection.update(refit_on="train + val",
                             reason="no validation split" if not len(x_va) else
                                    f"{len(x_va)} validation images (< {SMALL_VAL_IMAGES}, or < "
                                    f"{SMALL_VAL_PER_CLASS} in some class): one image moves them by "
                                    f"{100 / len(x_va):.1f} points")
            log.info("linear probe: C=%.3g by %d-fold cross-validation on %d images, CV accuracy %.4f ± %.4f; "
                     "fitted on %s", selection["C"], selection["folds"], selection["images"],
                     selection["cv_accuracy"], selection["cv_stderr"], selection["refit_on"])
            # val is in the refit, so not held out: the temperature is fitted (and the calibration error measured)
            # on out-of-fold logits, and the fold heads behind those logits go with the checkpoint: the INT8 guard
            # scores every labelled image by the head that did not see it (edgexfer.guard)
            log.info("linear probe: fitting the %d fold heads (out-of-fold answers for temperature scaling and "
                     "the INT8 guard)", selection["folds"])
            folds = fold_heads(f_fit.numpy(), y_fit.numpy(), selection["C"], balanced, selection["folds"], cfg.seed,
                               views=None if views is None else views.numpy())
            oof = (fold_logits(folds, f_fit.numpy()), y_fit.numpy(), selection["folds"])
    if selection:  # fitted on val too: its cross-validated accuracy is the one to report
        accuracy = selection["cv_accuracy"]
    else:
        accuracy = linear_probe(model, f_tr, y_tr, f_va, y_va, cfg, class_weights)
    seconds = time.perf_counter() - t0
    log.info("linear probe: %s accuracy %s in %.1f s", "cross-validated" if selection else "val",
             f"{accuracy:.4f}" if len(x_va) else "n/a (no validation split)", seconds)
    return Probe(accuracy, seconds, selection, f_va, oof, folds)
