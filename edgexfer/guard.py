"""The images the INT8 guard decides on, and how sure it is.

The guard (`edgexfer.pipeline.quantize`) scores each INT8 candidate by how often it gives FP32's top-1
on an *agreement set*: no labels needed, so it can use many more images than the validation split:

- every labelled image of the run (train + validation; never test, which only reports),
- the unlabelled `--adapt-bn` images, if any,
- and, while that is fewer than GUARD_IMAGES (1000), seeded augmented views of the labelled images
  (a random crop of 35-100% of the area, aspect 3/4-4/3, and a horizontal flip half of the time), each
  through the run's own preprocessing (`edgexfer.runtime.preprocess`: colour, resize, crop, normalize).

When `--adapt-bn` was kept, the model carries the target domain's BatchNorm statistics and is for that
domain only (on the source domain's labelled images it can score far below what it scored before), so the
set is the target domain's: its unlabelled images and augmented views of them (`target_set`).

How far FP32 itself can be trusted to repeat its top-1 is measured beside it (`fp32_stability`): FP32 against
itself with every pixel moved by up to half a level, the rounding by which two decoders or resizers differ.
When that changes FP32's own answer on more images than the bound allows, the bound asks a compressed file
to reproduce differences smaller than a decoder's rounding: the guard says so.

The set is held in memory as float32, bounded by GUARD_MAX_BYTES (768 MiB: 1,333 images at 224x224x3;
labelled images past it are a seeded sample). Both limits can be set from the environment
(EDGEXFER_GUARD_IMAGES, EDGEXFER_GUARD_MAX_MB). The statistics are in `edgexfer.exporters.quantize`
(`guard_decision`, `wilson_upper`, `paired_drop`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgexfer.bounds import within

GUARD_IMAGES = int(os.environ.get("EDGEXFER_GUARD_IMAGES", "1000"))
GUARD_MAX_BYTES = int(float(os.environ.get("EDGEXFER_GUARD_MAX_MB", "768")) * 2**20)
CROP_AREA = (0.35, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)


def augmented_views(images: list, pp, n: int, seed: int):
    """Yield `n` augmented views (C, H, W) float32 of `images` (paths or uint8 arrays), spread evenly over
    them, each image decoded once: a random resized crop and a random horizontal flip, then the run's own
    preprocessing (`resize_crop`, `normalize`)."""
    from PIL import Image

    from edgexfer.runtime.preprocess import load_image, normalize, resize_crop

    rng = np.random.default_rng(seed)
    m = len(images)
    for i, src in enumerate(images):
        count = n // m + (i < n % m)
        if not count:
            continue
        img = load_image(src)
        img.load()
        w, h = img.size
        for _ in range(count):
            area = w * h * rng.uniform(*CROP_AREA)
            aspect = np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1])))
            cw = int(round(min(w, max(1, np.sqrt(area * aspect)))))
            ch = int(round(min(h, max(1, np.sqrt(area / aspect)))))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            view = img.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            yield normalize(resize_crop(view, pp), pp)


def augmentation(of: str, seed: int) -> str:
    """What `augmented_views` does, in words, for the guard record: views of the `of` images."""
    return (f"random resized crop ({CROP_AREA[0]:.0%}-{CROP_AREA[1]:.0%} of the area, aspect {CROP_ASPECT[0]:.2f}-"
            f"{CROP_ASPECT[1]:.2f}) and horizontal flip of the {of} images, seed {seed}, through the run's preprocessing")


def agreement_set(ws, unlabelled: np.ndarray | None = None, *, seed: int = 0, min_images: int | None = None,
                  max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """(N, C, H, W) float32 images for the guard's INT8/FP32 agreement, and what they are.

    `ws` is the run's `Workspace` (its cached train and validation tensors and its data set's images);
    `unlabelled`: preprocessed target-domain images (--adapt-bn) or None."""
    min_images = GUARD_IMAGES if min_images is None else min_images
    max_bytes = GUARD_MAX_BYTES if max_bytes is None else max_bytes
    xt, _ = ws.tensors("train")
    xv, _ = ws.tensors("val")
    shape = xt.shape[1:] if len(xt) else xv.shape[1:]
    cap = max(1, int(max_bytes // (4 * int(np.prod(shape)))))
    rng = np.random.default_rng(seed)
    labelled = [(xt, i) for i in range(len(xt))] + [(xv, i) for i in range(len(xv))]
    if len(labelled) > cap:  # a seeded sample of them, in their order
        labelled = [labelled[i] for i in np.sort(rng.choice(len(labelled), cap, replace=False))]
    u = np.zeros((0, *shape), np.float32) if unlabelled is None else unlabelled[:max(0, cap - len(labelled))]
    want = min(cap, max(min_images, len(labelled) + len(u)))
    n_aug = want - len(labelled) - len(u)
    sources = list(ws.dataset.train.images) + list(ws.dataset.val.images)
    if not sources:
        n_aug = 0
    x = np.empty((len(labelled) + len(u) + n_aug, *shape), np.float32)  # filled in place: one copy in memory
    for j, (arr, i) in enumerate(labelled):
        x[j] = arr[i]
    x[len(labelled):len(labelled) + len(u)] = u
    for j, view in enumerate(augmented_views(sources, ws.preprocessing, n_aug, seed), start=len(labelled) + len(u)):
        x[j] = view
    total = len(xt) + len(xv)
    info = {"images": int(len(x)), "labelled": len(labelled), "unlabelled": int(len(u)), "augmented": int(n_aug),
            "labelled_available": int(total), "bytes": int(x.nbytes), "max_bytes": int(max_bytes),
            "augmentation": augmentation("labelled", seed) if n_aug else None}
    return x, info


def target_set(x_target: np.ndarray, files: list, pp, *, seed: int = 0, min_images: int | None = None,
               max_bytes: int | None = None) -> tuple[np.ndarray, dict]:
    """The agreement set of a model adapted to a target domain (--adapt-bn kept): `x_target`, its unlabelled
    images preprocessed (a seeded order of `files`, the folder's image files), and, while that is fewer than
    `min_images`, seeded augmented views of `files`; at most `max_bytes` in all."""
    min_images = GUARD_IMAGES if min_images is None else min_images
    max_bytes = GUARD_MAX_BYTES if max_bytes is None else max_bytes
    cap = max(1, int(max_bytes // (4 * int(np.prod(x_target.shape[1:])))))
    u = x_target[:cap]
    n_aug = max(0, min(cap, min_images) - len(u)) if files else 0
    x = np.empty((len(u) + n_aug, *x_target.shape[1:]), np.float32)
    x[:len(u)] = u
    for j, view in enumerate(augmented_views(list(files), pp, n_aug, seed), start=len(u)):
        x[j] = view
    info = {"images": int(len(x)), "domain": "target", "labelled": 0, "unlabelled": int(len(u)),
            "augmented": int(n_aug), "labelled_available": 0, "bytes": int(x.nbytes), "max_bytes": int(max_bytes),
            "augmentation": augmentation("target", seed) if n_aug else None}
    return x, info


HALF_LEVEL = 0.5  # pixel levels: the rounding by which two decoders or resizers differ


def top1_stability(logits: Callable[[np.ndarray], list], x: np.ndarray, pp, seed: int = 0) -> dict:
    """How often a model (`logits`: (N, C, H, W) float32 -> a list of (N, K) logits, one per task) gives its own
    top-1 again when every pixel of `x` (preprocessed by `pp`) moves by a uniform amount within +-HALF_LEVEL of
    a level (the same amount on every channel of a grey image, whose channels a decoder makes equal): how much
    of its answer survives a perturbation that any deployment already makes."""
    std = np.asarray(pp.std, np.float32).reshape(1, -1, 1, 1)
    level = np.float32(pp.scale) / std  # one pixel level, in the model's input units, per channel
    rng = np.random.default_rng(seed)
    ref = [np.asarray(lg).argmax(1) for lg in logits(x)]
    pixels = x * std + np.asarray(pp.mean, np.float32).reshape(1, -1, 1, 1)  # pixel * scale
    grey = (np.abs(pixels - pixels[:, :1]).max(axis=(1, 2, 3)) < 1e-4) if x.shape[1] > 1 \
        else np.ones(len(x), bool)
    got = []
    for i in range(0, len(x), 64):
        xb = x[i:i + 64]
        noise = rng.uniform(-HALF_LEVEL, HALF_LEVEL, xb.shape).astype(np.float32)
        g = grey[i:i + 64]
        noise[g] = noise[g][:, :1]  # broadcast the first channel's noise to every channel of a grey image
        got.append([np.asarray(lg).argmax(1) for lg in logits(xb + noise * level)])
    agree = float(np.mean([np.mean(np.concatenate([b[t] for b in got]) == r) for t, r in enumerate(ref)]))
    return {"agreement": agree, "images": int(len(x)), "grey_images": int(grey.sum()),
            "noise": f"uniform within +-{HALF_LEVEL:g} of a pixel level on every pixel (the same on every channel "
                     f"of a grey image), seed {seed}"}


def fp32_stability(fp32: Path, x: np.ndarray, pp, threads: int | None = None, seed: int = 0) -> dict:
    """`top1_stability` of the ONNX file `fp32`: the agreement that asking more of INT8 asks it to reproduce
    differences smaller than a decoder's rounding."""
    from edgexfer.evaluate import onnx_logits

    return top1_stability(lambda xb: onnx_logits(fp32, xb, threads=threads), x, pp, seed)


def describe(info: dict) -> str:
    """'1000 images: 150 labelled (train + validation), 850 augmented views of them'."""
    if info.get("domain") == "target":
        s = f"{info['images']} images of the target domain (--adapt-bn kept): {info['unlabelled']} unlabelled"
        return s + (f", {info['augmented']} augmented views of them" if info["augmented"] else "")
    parts = [f"{info['labelled']} labelled (train + validation"
             + (f", a sample of {info['labelled_available']}" if info["labelled"] < info["labelled_available"] else "")
             + ")"]
    if info["unlabelled"]:
        parts.append(f"{info['unlabelled']} unlabelled (--adapt-bn)")
    if info["augmented"]:
        parts.append(f"{info['augmented']} augmented views of the labelled images")
    return f"{info['images']} images: " + ", ".join(parts)


def labelled_evidence(fp32: Path, xv: np.ndarray, yv: np.ndarray, threads: int | None
                      ) -> tuple[float, Callable[[Path], dict]]:
    """FP32's validation accuracy, and evidence(path): a candidate's validation accuracy, its paired drop
    from FP32 and that drop's standard error (recorded beside agreement; see `guard_decision`)."""
    from edgexfer.evaluate import mean_task_accuracy, onnx_logits
    from edgexfer.exporters.quantize import paired_drop

    ref = onnx_logits(fp32, xv, threads=threads)

    def evidence(path) -> dict:
        lg = onnx_logits(path, xv, threads=threads)
        drop, se = paired_drop(ref, lg, yv)
        return {"val_accuracy": mean_task_accuracy(lg, yv), "val_drop": drop, "val_drop_se": se}

    return mean_task_accuracy(ref, yv), evidence


def shipped_row(g: dict) -> dict:
    """The guard record's row of the file it shipped: the QAT row when QAT won, else the candidate it chose
    (by index: the ranked and the prefix fallback can each try a candidate keeping as many layers in FP32),
    else the first candidate keeping as many layers (records without the index), else `g["shipped"]`."""
    if g.get("qat", {}).get("chosen"):
        return g["qat"]["row"]
    i = g.get("chosen_candidate")
    if isinstance(i, int) and 0 <= i < len(g.get("candidates", ())):
        return g["candidates"][i]
    return next((c for c in g.get("candidates", ()) if c.get("fp32_layers") == g.get("chosen_fp32_layers")
                 and "inc_trial" not in c), g.get("shipped", {}))


def summarize(g: dict, info: dict, val_images: int, fp32_val_accuracy: float | None, shipped: dict,
              no_validation: str = "no labelled validation images to compare") -> None:
    """Add to the guard record `g` how sure it is: the agreement set, the shipped file's disagreement with a
    95% Wilson upper bound, its labelled validation drop with the standard error, and one plain sentence.
    `shipped` holds the shipped file's "agreement" and, with a validation split, "val_accuracy", "val_drop"
    and "val_drop_se"."""
    from edgexfer.exporters.quantize import wilson_upper

    n = info["images"]
    rate = max(0.0, 1.0 - shipped["agreement"])
    upper = wilson_upper(rate, n)
    g["decides_on"] = "top-1 agreement with FP32 (label-free): an accuracy drop cannot exceed the disagreement rate"
    g["agreement_set"] = info
    g["disagreement"] = {"rate": rate, "images": n, "disagreeing": int(round(rate * n)), "upper95": upper,
                         "interval": "Wilson score, 95%"}
    v = None
    if val_images and "val_drop" in shipped:
        v = {"images": val_images, "fp32_accuracy": fp32_val_accuracy, "int8_accuracy": shipped["val_accuracy"],
             "drop": shipped["val_drop"], "drop_se": shipped["val_drop_se"]}
    g["validation"] = v
    md = g["max_accuracy_drop"]
    s = (f"INT8 gives FP32's top-1 on {1 - rate:.1%} of {n} images, so it loses at most {rate:.1%} of accuracy on "
         f"images like these (at most {upper:.1%} with 95% confidence")
    s += ", within the bound)" if within(upper, md) else (
        f"; the {md:.1%} bound holds on the measured rate, not with 95% confidence)" if within(rate, md) else ")")
    if v:
        s += (f"; on {val_images} labelled validation images it scores {v['int8_accuracy']:.1%} vs FP32 "
              f"{v['fp32_accuracy']:.1%} (drop {100 * v['drop']:+.1f} ± {100 * v['drop_se']:.1f} points).")
    else:
        s += f"; {no_validation}."
    g["confidence"] = s
