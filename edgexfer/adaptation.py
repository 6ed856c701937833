"""AdaBN that cannot hurt silently: measure, without target labels, what re-estimating BatchNorm
statistics on the target images did, and keep the adaptation only when nothing says it hurt.

The target domain has no labels. What decides:

- the mean prediction entropy on the target images: statistics that fit the target make the model
  surer there; a rise beyond noise (2 paired standard errors) and beyond ENTROPY_FLOOR says they did
  not, and the adaptation is reverted;
- the histogram of top-1 predictions on the target images: a collapse onto one class (the largest
  class's share rising above one half, by half again its former share, beyond noise) is the classic
  failure of adapted normalisation statistics, and is reverted;
- the source validation accuracy before and after, paired on the same images (the one labelled figure):
  after AdaBN the source images are normalised with the target's statistics, so the larger the shift
  the larger the drop, also when adaptation helps a lot on the target (tried on Fashion-MNIST made
  inverted, low-contrast, darker or noisy: the source validation accuracy fell far beyond noise each
  time, while the target's accuracy rose and its entropy fell). A drop beyond noise and SOURCE_DROP_FLOOR
  reverts the adaptation only when the target side shows no gain to pay for it (its entropy did not fall
  beyond noise).

Agreement between the adapted and unadapted top-1 and the mean max-probability are recorded beside
them (they say how much changed, not in which direction).
"""
from __future__ import annotations

import math

import numpy as np

from edgexfer.runtime import fmt

# A source validation drop counts only beyond 2 paired standard errors and this floor: the bound the
# project puts on what INT8 may cost (--max-accuracy-drop's default), so that a large validation split,
# whose standard error is tiny, does not revert on a drop nobody would notice.
SOURCE_DROP_FLOOR = 0.01
# An entropy rise counts only beyond 2 paired standard errors and this fraction of ln(K), the entropy of a
# uniform guess over K classes. The head was fitted on features normalised with the training images'
# statistics, so swapping in any other estimate, even one from fresh images of the same domain, makes a
# confident model a little less sure (its mean entropy is a mean of a few large tail values): clearly, in
# standard errors, but with the top-1 unchanged. The floor sits above that no-shift rise, and below what
# a target folder half full of blank frames does (tests/test_adabn_safeguard.py: that, and a slight
# brightness change).
ENTROPY_FLOOR = 0.15
Z = 2.0  # standard errors that count as "beyond noise"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def entropy(p: np.ndarray) -> np.ndarray:
    """Per-image entropy (nats) of probability rows `p`."""
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(1)


def prediction_stats(logits: np.ndarray, labels: list[str]) -> dict:
    """Label-free statistics of one model's predictions on unlabelled images: (N, K) logits."""
    p = softmax(np.asarray(logits, dtype=np.float64))
    top = p.argmax(1)
    counts = np.bincount(top, minlength=len(labels))
    share = counts / max(1, len(top))
    return {"mean_entropy": float(entropy(p).mean()), "mean_max_probability": float(p.max(1).mean()),
            "histogram": {c: int(n) for c, n in zip(labels, counts)},
            "largest_class": labels[int(counts.argmax())], "largest_class_share": float(share.max())}


def paired_accuracy_change(correct_before: np.ndarray, correct_after: np.ndarray) -> dict:
    """after − before on the same images, with the binomial standard error of the paired difference:
    only the images whose correctness changed (fixed: wrong → right, broken: right → wrong) carry it."""
    b = np.asarray(correct_before, bool)
    a = np.asarray(correct_after, bool)
    n = len(b)
    fixed, broken = int((a & ~b).sum()), int((b & ~a).sum())
    diff = (fixed - broken) / n
    se = math.sqrt(max(0.0, (fixed + broken) / n - diff ** 2) / n)
    return {"images": n, "before": float(b.mean()), "after": float(a.mean()), "change": diff, "stderr": se,
            "fixed": fixed, "broken": broken}


def compare_target(before: np.ndarray, after: np.ndarray, labels: list[str]) -> dict:
    """What adaptation did to one head's predictions on the target images: (N, K) logits before and after."""
    pb, pa = softmax(np.asarray(before, np.float64)), softmax(np.asarray(after, np.float64))
    dh = entropy(pa) - entropy(pb)
    n = len(dh)
    out = {"images": n, "before": prediction_stats(before, labels), "after": prediction_stats(after, labels),
           "entropy_change": float(dh.mean()),
           "entropy_change_stderr": float(dh.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
           "top1_agreement": float((pa.argmax(1) == pb.argmax(1)).mean())}
    return out


def collapsed(t: dict) -> bool:
    """The predictions on the target piled onto one class: its share above one half, half again the largest
    share before, and up by more than 2 binomial standard errors of the share."""
    s0, s1, n = t["before"]["largest_class_share"], t["after"]["largest_class_share"], t["images"]
    return s1 > 0.5 and s1 >= 1.5 * s0 and s1 - s0 > Z * math.sqrt(s1 * (1 - s1) / n)


def decide(source: dict | None, target: dict[str, dict], force: bool = False) -> dict:
    """Keep AdaBN's statistics or revert to the unadapted ones. `source`: paired_accuracy_change on the
    source validation split (None without one); `target`: compare_target per head."""
    hurt, fine = [], []
    many = len(target) > 1
    gained = []  # heads whose target entropy fell beyond noise: a label-free sign the new statistics fit
    for name, t in target.items():
        on = f" ({name})" if many else ""
        dh, se, k = t["entropy_change"], t["entropy_change_stderr"], len(t["before"]["histogram"])
        floor = ENTROPY_FLOOR * math.log(max(k, 2))
        what = (f"mean prediction entropy on {t['images']} target images{on} {t['before']['mean_entropy']:.3f} -> "
                f"{t['after']['mean_entropy']:.3f} nats (paired s.e. {se:.3f})")
        if dh > max(Z * se, floor):
            hurt.append(what + f": a rise beyond 2 s.e. and the {floor:.3f}-nat floor, the model is less sure on the target")
        elif dh < -Z * se:
            gained.append(name)
            fine.append(what + ": lower beyond 2 s.e., the model is surer on the target")
        else:
            fine.append(what + (f": a rise under the {floor:.3f}-nat floor" if dh > Z * se else
                                ": no change beyond noise"))
        b, a = t["before"], t["after"]
        what = (f"largest predicted class on the target{on} {b['largest_class']} {fmt.pct(b['largest_class_share'])} -> "
                f"{a['largest_class']} {fmt.pct(a['largest_class_share'])}")
        if collapsed(t):
            hurt.append(what + ": the predictions collapsed onto one class")
        else:
            fine.append(what + ": no collapse")
    if source is not None:
        drop, se = -source["change"], source["stderr"]
        bound = max(Z * se, SOURCE_DROP_FLOOR)
        what = (f"source validation accuracy {fmt.accuracy(source['before'])} -> {fmt.accuracy(source['after'])} on "
                f"{source['images']} images ({fmt.points(100 * source['change'])} points, paired s.e. "
                f"{fmt.points(100 * se, signed=False)})")
        if drop <= bound:
            fine.append(what + f": no drop beyond max(2 s.e., {100 * SOURCE_DROP_FLOOR:.0f} point)")
        elif gained and len(gained) == len(target):
            fine.append(what + ": a drop beyond noise, the price of the target's statistics, paid for by the lower "
                               "entropy on the target")
        else:
            hurt.append(what + ": a drop beyond 2 s.e. with no label-free gain on the target to pay for it")
    else:
        fine.append("no source validation split to check")
    kept = force or not hurt
    return {"kept": kept, "forced": bool(force and hurt), "reasons": hurt if hurt else fine,
            "checks_passed": fine if hurt else [],
            "rule": ("revert when the mean target entropy rises by more than max(2 paired s.e., "
                     f"{ENTROPY_FLOOR:g} ln K), the target predictions collapse onto one class (largest share above "
                     "one half, x1.5 and 2 s.e. above before), or the source validation accuracy drops by more than "
                     f"max(2 paired s.e., {100 * SOURCE_DROP_FLOOR:.0f} point) while the target entropy did not fall "
                     "beyond 2 s.e.; --adapt-bn-force keeps it regardless")}


STABILITY_IMAGES = 256  # target images on which the model's own top-1 is perturbed (edgexfer.guard.top1_stability)
STABLE = 0.95  # below this share of its top-1 surviving half-a-level pixel noise, a model is called fragile


def fragility(before: dict, after: dict) -> str | None:
    """A warning when AdaBN left the model fragile on the target: its top-1 survives half-a-level pixel noise
    (`top1_stability`) on fewer than STABLE of the target images, fewer than before by more than 2 binomial s.e.
    Statistics re-estimated on a narrow target (low contrast, grey images) can be tiny for some channels, and
    dividing by them amplifies differences below a pixel level: the model's answers there then hang on a
    decoder's rounding, and INT8 or FP16 cannot follow them. Recorded and warned; the keep/revert rule is
    `decide`'s."""
    a, b, n = after["agreement"], before["agreement"], after["images"]
    se = math.sqrt(max(a * (1 - a), 1e-12) / max(n, 1))
    if a >= STABLE or b - a <= Z * se:
        return None
    return (f"the adapted model's top-1 on the target changes on {fmt.pct(1 - a)} of {n} images when every pixel "
            f"moves by up to half a level (unadapted: {fmt.pct(1 - b)}): some adapted BatchNorm statistics are tiny "
            f"and amplify sub-level differences, so its answers there hang on a decoder's rounding, and INT8 or "
            f"FP16 copies cannot follow them; more varied target images, or no --adapt-bn, give a steadier model")


def save_batchnorm(model) -> list:
    """Copies of every BatchNorm layer's running statistics (what AdaBN replaces)."""
    import torch

    return [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None]


def restore_batchnorm(model, saved: list) -> None:
    """Put back the statistics `save_batchnorm` copied: the unadapted model, bit for bit."""
    for m, mean, var, n in saved:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(n)
