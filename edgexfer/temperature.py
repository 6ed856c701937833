"""Scores a user can threshold: temperature scaling (Guo et al., 2017) and the expected calibration error.

(Temperature scaling has this module to itself: "calibration" in edgexfer's code is the INT8 activation ranges'
(`edgexfer.quantize_stage`, `exporters/quantize.py`). report.json keeps its `calibration` section name for the
temperature, and ECE keeps its name.)

Training with label smoothing leaves softmax scores that are not probabilities: a correct answer can
sit at 0.6 while a confident wrong one reaches 0.9. One scalar T > 0 per task head, fitted after
training by minimising the negative log-likelihood of softmax(z / T) on held-out logits, makes them
closer to probabilities without moving any argmax. T is folded into the head's final Linear layer
(weight / T, bias / T), so every file made from the checkpoint (FP32, INT8, bundles, the server)
gives the scaled scores with no runtime change.

The held-out logits: the validation split's; or, when the linear probe was refitted on train + val
because validation was small, the out-of-fold logits of the first partition of the same stratified
k-fold cross-validation that chose the probe's strength (`edgexfer.probe.fold_heads`). A fine-tuned model with a small validation split is fitted on that
split and reported as uncertain (a bootstrap interval of T), since cross-validating it would mean
training it k times.

T is folded only when the held-out images can pin it down. With no misclassified image among them the
likelihood keeps rising as T -> 0 (every score -> 1.0): a small validation split that happens to be
all correct would ship a model that is certain of everything, unrelated images included. So when T's
90% bootstrap interval reaches either end of the search range, T stays 1 and the report says why.

numpy and scipy only, so the evaluate stage applies the same functions to ONNX Runtime's logits.
"""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15                                    # equal-width bins of top-1 confidence
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)     # the coverage/accuracy table in the report and model card
TARGET_ACCURACY = 0.95                           # the threshold the model card suggests reaches this
T_BOUNDS = (0.05, 20.0)                          # the search range of T
BOOTSTRAP = 200                                  # resamples for T's interval
METHOD = ("temperature scaling: one T per task head, negative log-likelihood minimised on held-out logits, "
          "folded into the head's final Linear layer (weight/T, bias/T)")


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def nll(z: np.ndarray, y: np.ndarray, t: float = 1.0) -> float:
    """Mean negative log-likelihood of labels `y` (N,) under softmax(z / t), z (N, K)."""
    return float(-log_softmax(np.asarray(z, np.float64) / t)[np.arange(len(y)), y].mean())


def ece(probs: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float | None:
    """Expected calibration error of the top-1 prediction: images binned by confidence into `bins` equal-width
    bins (lo, hi]; the image-weighted mean over bins of |accuracy - mean confidence|. None without images."""
    probs, y = np.asarray(probs, np.float64), np.asarray(y)
    if not len(y):
        return None
    conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # conf in (i/bins, (i+1)/bins] -> i
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(hit[m].mean() - conf[m].mean())
    return float(total / len(y))


def fit_temperature(z: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The T in `bounds` minimising nll(z, y, T): a bounded 1-D search on log T (NLL is smooth in it)."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(z, np.float64)
    wrong = int(np.sum(z.argmax(1) != np.asarray(y)))
    if wrong == 0:  # every image right: NLL falls monotonically as T -> 0 (flat in floating point far from it)
        return float(bounds[0])
    res = minimize_scalar(lambda s: nll(z, y, math.exp(s)), bounds=(math.log(bounds[0]), math.log(bounds[1])),
                          method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def temperature_interval(z: np.ndarray, y: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> list[float]:
    """A 90% bootstrap interval of the fitted T (the images resampled with replacement)."""
    rng = np.random.default_rng(seed)
    ts = [fit_temperature(z[i], y[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(n))]
    return [float(np.percentile(ts, 5)), float(np.percentile(ts, 95))]


def coverage_table(probs: np.ndarray, y: np.ndarray, thresholds=THRESHOLDS) -> list[dict]:
    """For each threshold: the fraction of images whose top-1 confidence reaches it (coverage) and the accuracy
    on those (None where none does)."""
    conf, hit = probs.max(axis=1), probs.argmax(axis=1) == y
    out = []
    for t in thresholds:
        m = conf >= t
        out.append({"threshold": t, "images": int(m.sum()), "coverage": float(m.mean()) if len(y) else None,
                    "accuracy": float(hit[m].mean()) if m.any() else None})
    return out


def threshold_for(probs: np.ndarray, y: np.ndarray, target: float = TARGET_ACCURACY, min_images: int = 10) -> dict | None:
    """The lowest confidence threshold at which the accuracy on the images it accepts reaches `target`, with the
    coverage it keeps; None when no threshold that accepts at least `min_images` does (fewer say nothing)."""
    conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(np.float64)
    order = np.argsort(-conf, kind="stable")
    acc = np.cumsum(hit[order]) / np.arange(1, len(y) + 1)  # accuracy of the k most confident images
    ok = np.flatnonzero(acc >= target)
    if not len(ok) or ok[-1] + 1 < min_images:
        return None
    k = int(ok[-1])
    return {"target_accuracy": target, "threshold": float(conf[order[k]]), "coverage": (k + 1) / len(y),
            "accepted": k + 1, "accuracy": float(acc[k]), "images": len(y)}


def fold_temperature(linear, t: float) -> None:
    """softmax(Linear(x) / t) becomes softmax(Linear(x)): weight and bias divided by t, in place."""
    linear.weight.data.div_(t)
    if linear.bias is not None:
        linear.bias.data.div_(t)


def held_out_summary(z: np.ndarray, y: np.ndarray, t: float) -> dict:
    """ECE and NLL before and after dividing the logits by t, accuracy, and the threshold table (after T)."""
    p0, p1 = softmax(z), softmax(np.asarray(z, np.float64) / t)
    return {"images": int(len(y)), "accuracy": float(np.mean(p1.argmax(1) == y)),
            "ece_before": ece(p0, y), "ece_after": ece(p1, y), "nll_before": nll(z, y), "nll_after": nll(z, y, t),
            "thresholds": coverage_table(p1, y), "threshold_for_target": threshold_for(p1, y)}


def temperature_scale_heads(heads: dict, held_out: dict, fitted_on: dict, *, enabled: bool = True, seed: int = 0) -> dict:
    """Fit one temperature per head on `held_out` {task: (logits (N, K), labels (N,))} and fold it into the head
    (an nn.Linear, `heads` {task: Linear}); record T, where it was fitted and ECE before and after. `fitted_on`
    describes the held-out images ({"split", "uncertain", "reason"}). With `enabled` False, or no held-out image
    for a task, T stays 1 and nothing is folded; the ECE is still measured where it can be."""
    out = {"method": METHOD, "bins": ECE_BINS, "enabled": enabled, "tasks": {}}
    for name, head in heads.items():
        z, y = held_out.get(name, (None, None))
        rec: dict = {"temperature": 1.0, "folded": False}
        if z is not None and len(y):
            z = np.asarray(z, np.float64)
            if enabled:
                t, (lo, hi) = fit_temperature(z, y), temperature_interval(z, y, seed=seed)
                rec.update(fitted_temperature=t, temperature_interval_90=[lo, hi])
                if _inside(lo) and _inside(hi):
                    rec["temperature"] = t
                    fold_temperature(head, t)
                    rec["folded"] = True
                else:
                    errors = int(np.sum(z.argmax(1) != y))
                    rec["not_folded"] = (f"{errors} of {len(y)} held-out images misclassified: T's 90% bootstrap "
                                         f"interval ({lo:.3g}–{hi:.3g}) reaches the end of the search range "
                                         f"{T_BOUNDS}, so these images cannot set it; scores left as trained")
            rec["fitted_on"] = {**fitted_on, **held_out_summary(z, y, rec["temperature"])}
        else:
            rec["fitted_on"] = {"split": None, "images": 0, "reason": "no held-out labelled image to fit T on"}
        out["tasks"][name] = rec
    return out


def _inside(t: float) -> bool:
    """Strictly inside T_BOUNDS (the bounded search ends a hair short of its ends)."""
    return T_BOUNDS[0] * 1.01 < t < T_BOUNDS[1] / 1.01


def summary_on_test_split(logits: dict[str, list[np.ndarray]], y: np.ndarray, temperatures: dict[str, float]) -> dict:
    """Report only, never fitted on: per task, the ECE on the test split of each shipped file's logits (`logits`
    {file key: one array per task}; `y` (N,) or (N, tasks), -1 unlabelled) as shipped ("after") and multiplied
    back by T ("before"); and the threshold table of the first file."""
    y2 = y[:, None] if y.ndim == 1 else y
    out: dict = {}
    for t, (task, temp) in enumerate(temperatures.items()):
        keep = y2[:, t] >= 0
        files, table = {}, None
        for key, per_task in logits.items():
            z, yt = np.asarray(per_task[t][keep], np.float64), y2[keep, t]
            p = softmax(z)
            files[key] = {"images": int(len(yt)), "accuracy": float(np.mean(p.argmax(1) == yt)) if len(yt) else None,
                          "ece_before": ece(softmax(z * temp), yt), "ece_after": ece(p, yt)}
            if table is None:
                table = {"file": key, "thresholds": coverage_table(p, yt)}
        out[task] = {"test": {"files": files, **(table or {})}}
    return out
