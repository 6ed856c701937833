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

With a backbone whose blocks can be tapped (`tap_candidates`), that cross-validation also chooses which features
the head reads (Head2Toe, Evci et al. 2022): the last layer (the plain probe), the stage ends at the final
resolution, or every stage's end, each concatenated from the blocks' global-average-pooled outputs of one pass
(`extract_block_features`), standardised per tap on the training folds, with its own strength (`cv_candidate`);
the best by CV accuracy unless a candidate with fewer features is within one paired standard error of it
(`choose_candidate`). The standardisation is folded into the refitted head and the fold heads (`cv_taps`), so the
exported file takes raw images and the guard's head input is the raw concatenated features.
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
    from edgexfer.features import OnnxFeatures
    from edgexfer.config import TrainConfig
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
def extract_features(model: EdgeNet, x: torch.Tensor, batch_size: int = 128, desc: str = "features",
                     ext: OnnxFeatures | None = None) -> torch.Tensor:
    """The backbone's pooled features of `x` (N, C, H, W), in eval mode; by `ext` (`features_engine(model)`: ONNX
    Runtime, exported once) where given."""
    model.eval()
    if ext is not None:
        return ext(x, batch_size, progress=lambda r: tqdm(r, desc=desc, leave=False, disable=bars_off()))[0]
    chunks = range(0, len(x), batch_size)
    return torch.cat([model.features(x[i:i + batch_size]) for i in tqdm(chunks, desc=desc, leave=False, disable=bars_off())])


def features_engine(model: EdgeNet, image_size: int, channels: int, blocks: bool) -> OnnxFeatures:
    """The frozen `model`'s features through ONNX Runtime (`edgexfer.features`): every block's pooled output
    (`blocks`, for the multi-layer candidates) or the head's input. Built once per fit, used for every split and
    augmented view; valid while the backbone's weights stay as they are."""
    from edgexfer.features import BlockPools, Features, OnnxFeatures

    model.eval()
    ext = OnnxFeatures(BlockPools(model.backbone) if blocks else Features(model), image_size, channels,
                       what="linear probe: features")
    log.info("linear probe: features computed by %s", ext.described)
    return ext


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
             views: torch.Tensor | None = None, repeats: int = 1) -> dict | None:
    """Fit `head` as multinomial logistic regression on features `f` (N, D) and labels `y` (N,), its L2
    strength chosen by stratified k-fold cross-validation (scikit-learn's LogisticRegressionCV, k = min(5,
    the smallest class)); None when some class has fewer than 2 images (nothing to cross-validate).
    `views` (V, N, D): features of V augmented views of the same images, fitted beside them (view_folds
    keeps every view of a held-out image out of its fold). `repeats` > 1: the k folds are drawn that many times
    (seed, seed + 1, ...) and the strength's score averages over all of them (as `cv_candidate`)."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV

    x, t = f.numpy().astype(np.float64), y.numpy()
    counts = np.bincount(t, minlength=head.out_features)
    if counts.min() < 2:
        return None
    k = int(min(5, counts.min()))
    v = 0 if views is None else len(views)
    repeats = max(1, repeats)
    folds = [fold for r in range(repeats) for fold in view_folds(t, k, seed + r, v)]
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
    return {"method": f"LogisticRegressionCV, stratified {k}-fold cross-validation"
                      + (f" repeated over {repeats} partitions" if repeats > 1 else "")
                      + f" over {len(clf.Cs_)} strengths ({PROBE_CS[0]:g} to {PROBE_CS[-1]:g}, log-spaced)"
                      + (f", fitted on each image and {v} augmented views of it" if v else ""),
            "images": len(f), "views": v, "folds": k, "repeats": repeats, "C": float(clf.C_[0]),
            "cv_accuracy": float(fold.mean()),
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


# -- multi-layer candidates (Head2Toe, Evci et al. 2022): which blocks' pooled outputs the head reads ----------

@torch.no_grad()
def extract_block_features(model: EdgeNet, x: torch.Tensor, batch_size: int = 128,
                           desc: str = "features", ext: OnnxFeatures | None = None) -> list[torch.Tensor]:
    """The global-average-pooled output of every block of the backbone on `x`, in eval mode, from one forward
    pass: a list over `backbone.blocks` of (N, C_block); by `ext` (`features_engine(model, ..., blocks=True)`)
    where given."""
    from edgexfer.backbones import block_outputs, pool

    model.eval()
    if ext is not None:
        return ext(x, batch_size, progress=lambda r: tqdm(r, desc=desc, leave=False, disable=bars_off()))
    chunks = [[pool(o) for o in block_outputs(model.backbone, x[i:i + batch_size])]
              for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, disable=bars_off())]
    return [torch.cat([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def tap_candidates(backbone, image_size: int) -> list[dict]:
    """The feature sets the cross-validated probe chooses among, by a rule on the network's shape (never on the
    data): the last layer (`head`, today's probe), the stage ends at the final spatial resolution (`late`), every
    stage's end (`stages`, `backbones.stage_ends`: where the width or the resolution changes). Fewest features
    first, identical sets once. Only the last layer when the backbone has no explicit block path (`block_outputs`:
    EfficientNet-Lite and the test backbone; the forward hooks that tap the others do not fire under torch.fx, which
    QAT traces the model with), when its blocks' outputs are not (C, H, W) maps, or their last one pooled is not the
    backbone's features."""
    from edgexfer.backbones import block_outputs, pool, stage_ends, tap_shapes

    if getattr(backbone, "block_outputs", None) is None:
        return [{"name": "head", "taps": None, "rule": "the backbone's last layer (no explicit block path to tap)"}]
    try:
        shapes = tap_shapes(backbone, image_size)
        with torch.no_grad():
            x = torch.rand(1, 3, image_size, image_size)
            was = backbone.training
            backbone.eval()
            same = torch.allclose(pool(block_outputs(backbone, x)[-1]), backbone(x).flatten(1), atol=1e-5)
            backbone.train(was)
    except Exception as e:  # noqa: BLE001 - any backbone that cannot be tapped keeps its last layer
        log.info("linear probe: the backbone's blocks cannot be tapped (%s): its last layer only", e)
        shapes, same = None, False
    if not shapes or not same or any(len(sh) != 3 for sh in shapes):
        return [{"name": "head", "taps": None, "rule": "the backbone's last layer (its pooled features)"}]
    last = len(shapes) - 1
    ends = stage_ends(shapes)
    late = [i for i in ends if shapes[i][1:] == shapes[last][1:]]
    out, seen = [], set()
    for name, taps, rule in (("head", [last], "the last layer (the backbone's pooled features)"),
                             ("late", late, "each stage's end at the final spatial resolution"),
                             ("stages", ends, "each stage's end (where width or resolution changes)")):
        if tuple(taps) not in seen:
            seen.add(tuple(taps))
            out.append({"name": name, "taps": None if taps == [last] else taps, "rule": rule,
                        "features": int(sum(shapes[i][0] for i in taps))})
    return sorted(out, key=lambda c: c["features"])


def tap_standardiser(f: np.ndarray, dims: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale (D,) of rows `f` (N, D) whose columns are taps of widths `dims`: each feature
    z-scored, then each tap divided by the square root of its width, so every tap weighs alike whatever its width
    (a constant feature keeps scale 1: its weight is 0 whatever it is)."""
    mu, sd = f.mean(0), f.std(0)
    sd = np.where(sd > 1e-8, sd, 1.0) * np.repeat(np.sqrt(np.asarray(dims, np.float64)), dims)
    return mu, sd


def fold_standardiser(w: np.ndarray, b: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A linear layer on standardised features, (w, b) on (f - mu) / sd, as one on the raw features:
    (w / sd, b - (w / sd) mu). Exact."""
    w2 = w / sd
    return w2, b - w2 @ mu


def _binary_rows(w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(w) == 1:  # scikit-learn keeps one row for two classes: logits (0, w.x + b)
        return np.stack([np.zeros_like(w[0]), w[0]]), np.array([0.0, b[0]])
    return w, b


def _fit_path(x: np.ndarray, y: np.ndarray, cs: np.ndarray, balanced: bool, x_out: np.ndarray | None = None):
    """Multinomial logistic regression on rows `x` at each strength of `cs` (strongest first, warm-started), solved
    in the row space of `x` (an L2-penalised solution lies in it: exact, and fewer columns when D > N).
    Yields (C, w (K, D), b (K,), predictions on `x_out`)."""
    from sklearn.linear_model import LogisticRegression

    _, _, vt = np.linalg.svd(x, full_matrices=False)
    z = x @ vt.T
    z_out = None if x_out is None else x_out @ vt.T
    clf = LogisticRegression(max_iter=2000, warm_start=True, class_weight="balanced" if balanced else None)
    for c in cs:
        clf.set_params(C=float(c)).fit(z, y)
        w, b = _binary_rows(clf.coef_ @ vt, clf.intercept_)
        yield c, w, b, None if z_out is None else clf.predict(z_out)


def cv_candidate(blocks: list[np.ndarray], taps: list[int], y: np.ndarray, balanced: bool, k: int, seed: int,
                 views: list[np.ndarray] | None = None, standardise: bool = True, repeats: int = 1) -> dict:
    """One candidate's cross-validation: the taps' pooled features (`blocks`: per block (N, C), `views`: per block
    (V, N, C)) concatenated, standardised per tap on each training fold only (`tap_standardiser`; not the last
    layer alone, fitted raw as the plain probe is), multinomial logistic regression at every strength of PROBE_CS
    on `view_folds`' stratified k folds, `repeats` times over (repeat r draws its folds with seed + r: the
    strength's and the candidate's scores average over partitions, so which images share a fold decides less).
    Keeps, at the strength with the best mean fold accuracy: each image's held-out correctness (the share of
    repeats it was right in, for paired comparisons) and the first repeat's fold heads (seed's folds, as
    `fold_heads` draws them), folded into the raw features' space."""
    import warnings

    n = len(y)
    f = np.concatenate([np.asarray(blocks[t], np.float64) for t in taps], 1)
    dims = [blocks[t].shape[1] for t in taps]
    v = 0 if views is None else len(views[0])
    xs = f if not v else np.concatenate([f, np.concatenate([np.asarray(views[t], np.float64) for t in taps], 2)
                                         .reshape(-1, f.shape[1])])
    ys = np.tile(y, v + 1)
    splits = [view_folds(y, k, seed + r, v) for r in range(max(1, repeats))]
    correct = np.zeros((len(splits), len(PROBE_CS), n), bool)
    heads = [[None] * k for _ in PROBE_CS]
    fold_of = np.zeros(n, np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter at the weakest regularisation
        for r, folds in enumerate(splits):
            for j, (tr, te) in enumerate(folds):
                # raw features are only centred: with the intercept unpenalised that is the same model, better
                # conditioned
                mu, sd = tap_standardiser(xs[tr], dims) if standardise else (xs[tr].mean(0), np.ones(f.shape[1]))
                for i, (_, w, b, pred) in enumerate(_fit_path((xs[tr] - mu) / sd, ys[tr], PROBE_CS, balanced,
                                                              (f[te] - mu) / sd)):
                    correct[r, i, te] = pred == y[te]
                    if r == 0:
                        heads[i][j] = fold_standardiser(w, b, mu, sd)
                if r == 0:
                    fold_of[te] = j
    # (Cs, repeats x k): each fold's held-out accuracy at each strength
    per_fold = np.array([[correct[r, i, te].mean() for r, folds in enumerate(splits) for _, te in folds]
                         for i in range(len(PROBE_CS))])
    best = int(per_fold.mean(1).argmax())  # the first best: the strongest regularisation among equals
    fold = per_fold[best]
    # repeats average out the partition, not the images: the standard error is that of k folds' worth of data
    return {"C_index": best, "C": float(PROBE_CS[best]), "cv_accuracy": float(fold.mean()),
            "cv_stderr": float(fold.std(ddof=1) / np.sqrt(k)), "correct": correct[:, best].mean(0),
            "folds": {"fold": fold_of, "weight": np.stack([h[0] for h in heads[best]]),
                      "bias": np.stack([h[1] for h in heads[best]])},
            "dims": dims, "standardise": standardise, "repeats": len(splits)}


def choose_candidate(results: list[dict]) -> tuple[int, list[dict]]:
    """The candidate to ship among `results` (fewest features first, each with `cv_accuracy` and per-image
    held-out `correct`): the best by CV accuracy, unless a cheaper one is within one paired standard error of it
    (the mean and the standard error over images of the best's correct-minus-that-one's): then the cheapest such.
    Returns its index and, per candidate, the best's lead over it and that lead's paired standard error."""
    best = int(np.argmax([r["cv_accuracy"] for r in results]))
    leads = []
    for r in results:
        d = results[best]["correct"].astype(float) - r["correct"].astype(float)
        leads.append({"lead_of_best": float(d.mean()), "lead_stderr": float(d.std(ddof=1) / np.sqrt(len(d)))})
    chosen = next(i for i, (r, l) in enumerate(zip(results, leads))
                  if i == best or l["lead_of_best"] <= l["lead_stderr"])
    return chosen, leads


def cv_taps(model: EdgeNet, blocks: list[torch.Tensor], y: torch.Tensor, balanced: bool, seed: int,
            views: list[torch.Tensor] | None, candidates: list[dict],
            repeats: int = 1) -> tuple[dict, dict, np.ndarray] | None:
    """Cross-validate each of `candidates` (`tap_candidates`) with its own strength (`cv_candidate`, the same
    stratified folds for all, `repeats` partitions), choose one (`choose_candidate`), refit it on every labelled image (and views),
    standardisation folded into the head, and set `model` to read its taps (`EdgeNet.set_taps`).
    Returns (selection, fold heads, the refitted candidate's raw features of the images) or None (a class under 2)."""
    import warnings

    t = y.numpy()
    head = next(iter(model.heads.values()))
    counts = np.bincount(t, minlength=head.out_features)
    if counts.min() < 2:
        return None
    k = int(min(5, counts.min()))
    b_np = [b.numpy() for b in blocks]
    v_np = None if views is None else [v.numpy() for v in views]
    last = len(blocks) - 1
    results = []
    for c in candidates:
        taps = c["taps"] or [last]
        log.info("linear probe: cross-validating candidate %s (%s: %d features, blocks %s)", c["name"], c["rule"],
                 c["features"], taps)
        results.append(cv_candidate(b_np, taps, t, balanced, k, seed, v_np, standardise=c["taps"] is not None,
                                    repeats=repeats))
    chosen, leads = choose_candidate(results)
    c, r = candidates[chosen], results[chosen]
    taps = c["taps"] or [last]
    v = 0 if v_np is None else len(v_np[0])
    f = np.concatenate([b_np[i].astype(np.float64) for i in taps], 1)
    xs = f if not v else np.concatenate([f, np.concatenate([v_np[i].astype(np.float64) for i in taps], 2)
                                         .reshape(-1, f.shape[1])])
    mu, sd = tap_standardiser(xs, r["dims"]) if r["standardise"] else (xs.mean(0), np.ones(f.shape[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, w, b, _ = next(_fit_path((xs - mu) / sd, np.tile(t, v + 1), [r["C"]], balanced))
    w, b = fold_standardiser(w, b, mu, sd)
    model.set_taps(c["taps"], f.shape[1])
    head = next(iter(model.heads.values()))
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    edge = None
    if r["C_index"] in (0, len(PROBE_CS) - 1):
        edge = (f"the cross-validated strength C={r['C']:.3g} is the "
                f"{'strongest' if r['C_index'] == 0 else 'weakest'} regularisation searched ({PROBE_CS[0]:g}-"
                f"{PROBE_CS[-1]:g}): the best may lie beyond it; with {int(counts.min())} labelled images in the "
                "smallest class the folds say little")
        log.warning("linear probe: %s", edge)
    table = [{"name": cc["name"], "rule": cc["rule"], "taps": cc["taps"] or [last], "features": cc["features"],
              "standardised": rr["standardise"], "C": rr["C"], "cv_accuracy": rr["cv_accuracy"],
              "cv_stderr": rr["cv_stderr"], **ll} for cc, rr, ll in zip(candidates, results, leads)]
    best = int(np.argmax([rr["cv_accuracy"] for rr in results]))
    why = ("it has the best cross-validated accuracy" if chosen == best else
           f"it is within one paired standard error of {candidates[best]['name']} "
           f"(its lead {leads[chosen]['lead_of_best']:+.4f} ± {leads[chosen]['lead_stderr']:.4f}) with fewer features")
    for row in table:
        log.info("linear probe: candidate %-6s %4d features  C=%.3g  CV %.4f ± %.4f  best's lead %+.4f ± %.4f",
                 row["name"], row["features"], row["C"], row["cv_accuracy"], row["cv_stderr"], row["lead_of_best"],
                 row["lead_stderr"])
    log.info("linear probe: the head reads %s (%s): %s", c["name"], c["rule"], why)
    selection = {
        "method": f"multinomial logistic regression on {len(candidates)} feature sets x {len(PROBE_CS)} strengths "
                  f"({PROBE_CS[0]:g} to {PROBE_CS[-1]:g}, log-spaced), stratified {k}-fold cross-validation"
                  + (f" repeated over {r['repeats']} partitions" if r["repeats"] > 1 else "") + ", each "
                  "multi-layer set standardised per tap on its training folds (folded into the head)"
                  + (f", fitted on each image and {v} augmented views of it" if v else ""),
        "images": len(t), "views": v, "folds": k, "repeats": r["repeats"], "C": r["C"], "cv_accuracy": r["cv_accuracy"],
        "cv_stderr": r["cv_stderr"], "C_range": [float(PROBE_CS[0]), float(PROBE_CS[-1])], "C_at_edge": edge,
        "features": {"name": c["name"], "taps": taps, "count": int(f.shape[1]), "rule": c["rule"], "reason": why},
        "candidates": table,
        "tie_rule": "the best cross-validated candidate, unless a candidate with fewer features is within one paired "
                    "standard error (over images, held-out correct minus correct) of it: then the cheapest such"}
    return selection, r["folds"], f


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
    cross_validate = strategy == "linear" and len(n_cls) == 1 and (not len(x_va) or small_validation(y_va, n_cls[0]))
    # the cross-validation also chooses which blocks' pooled outputs the head reads (`tap_candidates`): every
    # block's, from one pass over the images
    # Not with --adapt-bn: AdaBN re-estimates every BatchNorm layer's statistics on the target afterwards, which moves
    # the intermediate blocks' outputs that a multi-layer head standardises with the source's means and scales, and
    # the AdaBN safeguard's label-free checks were built on the last layer's probe (a multi-layer head fitted on
    # separable images answered near-uniformly there and hid a harmful adaptation from the entropy check)
    candidates = tap_candidates(model.backbone, pp.crop) if cross_validate and not cfg.adapt_bn else []
    if cross_validate and cfg.adapt_bn:
        log.info("linear probe: the last layer only (--adapt-bn re-estimates the statistics intermediate features "
                 "depend on after training)")
    b_fit = None
    # the cross-validated probe computes the frozen backbone's features of every image and view: through ONNX
    # Runtime, exported once (edgexfer.features); the stepwise probe (LP-FT's start) keeps PyTorch's
    ext = features_engine(model, pp.crop, x_tr.shape[1], blocks=len(candidates) > 1) if cross_validate else None
    if len(candidates) > 1:
        b_tr = extract_block_features(model, x_tr, desc="features train", ext=ext)
        b_va = extract_block_features(model, x_va, desc="features val", ext=ext) if len(x_va) else [b[:0] for b in b_tr]
        f_tr, f_va, b_fit = b_tr[-1], b_va[-1], [torch.cat([a, b]) for a, b in zip(b_tr, b_va)]
    else:
        f_tr = extract_features(model, x_tr, desc="features train", ext=ext)
        f_va = extract_features(model, x_va, desc="features val", ext=ext) if len(x_va) else f_tr[:0]
    selection = oof = folds = None
    if cross_validate:
        # too few validation images to decide on: cross-validate the probe's strength, then refit on
        # train + val (every label counts). Not (yet) for LP-FT's starting probe: on flowers-dev that start
        # gave a slightly better FP32 file but a much worse INT8 one that the 30-image guard passed
        # (benchmarks/RESULTS.md, "Real photos": results/photos_cv_lpft.json); the guard has to decide on
        # agreement first.
        f_fit = torch.cat([f_tr, f_va])
        y_fit = torch.cat([label_columns(y_tr)[:, 0], label_columns(y_va)[:, 0]])
        both = Split(list(data.train.images) + list(data.val.images), np.concatenate([data.train.labels,
                                                                                      data.val.labels]))
        views = v_fit = None
        if cfg.probe_views:
            views = []
            for v in range(cfg.probe_views):
                log.info("linear probe: augmented view %d of %d images", v + 1, len(both))
                x_v = probe_view(both.images, pp, v, cfg.seed)
                views.append(extract_features(model, x_v, desc=f"features view {v + 1}", ext=ext) if b_fit is None
                             else extract_block_features(model, x_v, desc=f"features view {v + 1}", ext=ext))
            if b_fit is not None:  # per block (V, N, C)
                v_fit = [torch.stack([vb[j] for vb in views]) for j in range(len(b_fit))]
                views = v_fit[-1]
            else:
                views = torch.stack(views)
        # every feature is computed: the session and its memory go before the cross-validation
        features_by, ext = ext.described, None
        balanced = class_weights[0] is not None
        f_chosen = f_fit.numpy()
        if b_fit is not None:
            out = cv_taps(model, b_fit, y_fit, balanced, cfg.seed, v_fit, candidates, repeats=cfg.probe_cv_repeats)
            if out:
                selection, folds, f_chosen = out
                f_va = torch.as_tensor(f_chosen[len(f_tr):], dtype=f_tr.dtype)  # the chosen head's input
        else:
            selection = cv_probe(model.heads[next(iter(model.heads))], f_fit, y_fit, balanced, cfg.seed, views,
                                 repeats=cfg.probe_cv_repeats)
        if selection:
            selection.update(features_by=features_by, refit_on="train + val",
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
            if folds is None:  # the tap candidates' cross-validation kept its fold heads (in the raw features' space)
                folds = fold_heads(f_fit.numpy(), y_fit.numpy(), selection["C"], balanced, selection["folds"],
                                   cfg.seed, views=None if views is None else views.numpy())
            oof = (fold_logits(folds, f_chosen), y_fit.numpy(), selection["folds"])
    if selection:  # fitted on val too: its cross-validated accuracy is the one to report
        accuracy = selection["cv_accuracy"]
    else:
        accuracy = linear_probe(model, f_tr, y_tr, f_va, y_va, cfg, class_weights)
    seconds = time.perf_counter() - t0
    log.info("linear probe: %s accuracy %s in %.1f s", "cross-validated" if selection else "val",
             f"{accuracy:.4f}" if len(x_va) else "n/a (no validation split)", seconds)
    return Probe(accuracy, seconds, selection, f_va, oof, folds)
