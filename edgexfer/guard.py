"""The images the INT8 guard decides on, and how sure it is.

The guard (`edgexfer.pipeline.quantize`) scores each INT8 candidate by how often it gives FP32's top-1
on an *agreement set*: no labels needed, so it can use many more images than the validation split:

- every labelled image of the run (train + validation; never test, which only reports),
- the unlabelled `--adapt-bn` images, if any,
- and, while that is fewer than `QuantizeConfig.guard_images` (1000), seeded augmented views of the labelled images
  (`edgexfer.augment.crop_flip_views`: a random crop of 35-100% of the area, aspect 3/4-4/3, and a horizontal
  flip half of the time), each through the run's own preprocessing (`edgexfer.runtime.preprocess`).

When `--adapt-bn` was kept, the model carries the target domain's BatchNorm statistics and is for that
domain only (on the source domain's labelled images it can score far below what it scored before), so the
set is the target domain's: its unlabelled images and augmented views of them (`target_set`).

How far FP32 itself can be trusted to repeat its top-1 is measured beside it (`fp32_stability`): FP32 against
itself with every pixel moved by up to half a level, the rounding by which two decoders or resizers differ.
When that changes FP32's own answer on more images than the bound allows, the bound asks a compressed file
to reproduce differences smaller than a decoder's rounding: the guard says so.

The set is held in memory as float32, bounded by `QuantizeConfig.guard_max_mb` (768 MiB: 1,333 images at
224x224x3; labelled images past it are a seeded sample); both limits are quantize settings (`edgexfer.config.
QuantizeConfig`: EDGEXFER_GUARD_IMAGES and EDGEXFER_GUARD_MAX_MB set them when the CLI builds the config).

This module is the whole guard: the agreement set and the search/certify split (above), the figures
(`Agreement`, `wilson_upper`, `paired_drop`), the decision on one candidate file (`guard_decision`, `Scorer`,
`Judge`: post-training candidates and QAT's file are judged alike), the candidate search (`guarded_quantize`,
over `edgexfer.exporters.quantize`'s `calibrate`/`quantize` pair and `edgexfer.exporters.sensitivity`'s
ranking), how sure it is (`summarize`) and the verdict it writes once into the record (`verdict`: report.py's
`recommend` and runtime/bundle.py's `int8_verdict` read it).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgexfer.bounds import at_least, within
from edgexfer.config import QuantizeConfig

def agreement_set(ws, unlabelled: np.ndarray | None = None, *, seed: int = 0, out_of_fold: bool = False,
                  min_images: int | None = None, max_bytes: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(N, C, H, W) float32 images for the guard's INT8/FP32 agreement, the labelled image each row shows, and
    what they are. Every image is one the model was not fitted on:

    - `out_of_fold` (the cross-validated probe, refitted on train + validation, whose fold heads score each
      labelled image by the head that did not see it: `Agreement`): every labelled image; else the validation
      split (training fits the train split; validation only picks among its steps);
    - `unlabelled`: preprocessed images of the domain that no stage fitted (--guard-data, --adapt-bn), or None;
    - while that is fewer than `min_images`, seeded augmented views of those labelled images (a view of an
      image is scored by the same head as the image: none that saw it).

    Only when there is none of these (no validation split, no fold heads, no unlabelled images) are the
    training images used, and the record says that they were fitted on (`info["fitted"]`).

    rows (N,): which image a row is or is a view of: the labelled image's index (train, then validation, order),
    or the number of labelled images plus the unlabelled image's. `ws` is the run's `Workspace`."""
    from edgexfer.augment import crop_flip_views, describe_crop_flip_views, views_origin

    min_images = QuantizeConfig.guard_images if min_images is None else min_images
    max_bytes = int(QuantizeConfig.guard_max_mb * 2**20) if max_bytes is None else max_bytes
    xt, _ = ws.tensors("train")
    xv, _ = ws.tensors("val")
    shape = xt.shape[1:] if len(xt) else xv.shape[1:]
    cap = max(1, int(max_bytes // (4 * int(np.prod(shape)))))
    rng = np.random.default_rng(seed)
    u = np.zeros((0, *shape), np.float32) if unlabelled is None else unlabelled
    images = list(ws.dataset.train.images) + list(ws.dataset.val.images)
    fitted = False
    if out_of_fold:
        held, how = np.arange(len(xt) + len(xv)), "out-of-fold"
    elif len(xv):
        held, how = len(xt) + np.arange(len(xv)), "validation"
    elif len(u):
        held, how = np.zeros(0, np.int64), None
    else:
        held, how, fitted = np.arange(len(xt)), "train", True
    if len(held) > cap:  # a seeded sample of them, in their order
        held = np.sort(rng.choice(held, cap, replace=False))
    u = u[:max(0, cap - len(held))]
    want = min(cap, max(min_images, len(held) + len(u)))
    n_aug = want - len(held) - len(u) if len(held) else 0
    x = np.empty((len(held) + len(u) + n_aug, *shape), np.float32)  # filled in place: one copy in memory
    for j, i in enumerate(held):
        x[j] = xt[i] if i < len(xt) else xv[i - len(xt)]
    x[len(held):len(held) + len(u)] = u
    for j, view in enumerate(crop_flip_views([images[i] for i in held], ws.preprocessing, n_aug, seed),
                             start=len(held) + len(u)):
        x[j] = view
    total = len(xt) + len(xv)
    rows = np.concatenate([held, total + np.arange(len(u)), held[views_origin(n_aug, len(held))]]).astype(np.int64)
    info = {"images": int(len(x)), "unseen": int(len(held) + len(u)) if not fitted else 0,
            "labelled": int(len(held)), "labelled_from": how, "fitted": fitted, "unlabelled": int(len(u)),
            "augmented": int(n_aug), "labelled_available": int(total), "bytes": int(x.nbytes),
            "max_bytes": int(max_bytes), "augmentation": describe_crop_flip_views("labelled", seed) if n_aug else None}
    return x, rows, info


def target_set(x_target: np.ndarray, files: list, pp, *, seed: int = 0, min_images: int | None = None,
               max_bytes: int | None = None, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The agreement set of a model adapted to a target domain (--adapt-bn kept): `x_target`, its unlabelled
    images preprocessed (`files[order[i]]` for row i: a seeded order of the folder's image files; default their
    own order), and, while that is fewer than `min_images`, seeded augmented views of `files`; at most
    `max_bytes` in all. Rows as `agreement_set`'s, by file (no labelled images)."""
    from edgexfer.augment import crop_flip_views, describe_crop_flip_views, views_origin

    order = np.arange(len(x_target)) if order is None else np.asarray(order)
    min_images = QuantizeConfig.guard_images if min_images is None else min_images
    max_bytes = int(QuantizeConfig.guard_max_mb * 2**20) if max_bytes is None else max_bytes
    cap = max(1, int(max_bytes // (4 * int(np.prod(x_target.shape[1:])))))
    u = x_target[:cap]
    n_aug = max(0, min(cap, min_images) - len(u)) if files else 0
    x = np.empty((len(u) + n_aug, *x_target.shape[1:]), np.float32)
    x[:len(u)] = u
    for j, view in enumerate(crop_flip_views(list(files), pp, n_aug, seed), start=len(u)):
        x[j] = view
    rows = np.concatenate([order[:len(u)], views_origin(n_aug, len(files))]).astype(np.int64)
    info = {"images": int(len(x)), "domain": "target", "unseen": int(len(u)), "labelled": 0, "labelled_from": None,
            "fitted": False, "unlabelled": int(len(u)), "augmented": int(n_aug), "labelled_available": 0,
            "bytes": int(x.nbytes), "max_bytes": int(max_bytes),
            "augmentation": describe_crop_flip_views("target", seed) if n_aug else None}
    return x, rows, info


CERTIFY_SHARE = 0.5  # of the unseen images, held out of the search to certify the file it chose
MIN_CERTIFY = 20     # images: fewer, and the search and the certificate share every image (the record says so)


def search_and_certify(rows: np.ndarray, labelled: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """Two disjoint sets of the images `rows` shows (each image with all its views): the search's, which choose
    among INT8 candidates, and the certificate's, on which the chosen file's figures are measured. A figure
    measured on the images that chose the file is biased low: the search keeps the candidate that happened to
    do well on them (benchmarks/bench_guard.py found two Fashion-MNIST cases of fourteen outside their 95% bound
    that way). A seeded CERTIFY_SHARE of the labelled images (ids below `labelled`) and of the unlabelled ones
    certifies. None when either side would have fewer than MIN_CERTIFY images."""
    images = np.unique(rows)
    rng = np.random.default_rng(seed + 7919)
    cert = np.sort(np.concatenate([
        (lambda kind: rng.permutation(kind)[:int(round(CERTIFY_SHARE * len(kind)))])(kind)
        for kind in (images[images < labelled], images[images >= labelled])]).astype(np.int64))
    search = np.setdiff1d(images, cert)
    if min(len(cert), len(search)) < MIN_CERTIFY:
        return None
    return search, cert


def head_inputs(model) -> list[str]:
    """The tensor each output of an ONNX model (a ModelProto) computes its logits from: the first input of the
    Gemm (or MatMul) its output is made by, through any Quantize/DequantizeLinear, Add or Identity after it."""
    made_by = {o: n for n in model.graph.node for o in n.output}
    out = []
    for o in model.graph.output:
        n = made_by.get(o.name)
        while n is not None and n.op_type not in ("Gemm", "MatMul"):
            n = next((made_by[i] for i in n.input if i in made_by), None)
        if n is None:
            raise ValueError(f"no Gemm or MatMul makes output {o.name!r}")
        out.append(n.input[0])
    return out


def with_head_inputs(path: Path) -> bytes:
    """The ONNX file `path` with its first head's input (the pooled features) as one more output."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info(head_inputs(model)[0], TensorProto.FLOAT, None))
    return model.SerializeToString()


class Agreement:
    """The guard's figure: how often an INT8 candidate gives FP32's top-1 on the agreement set's images, as
    the model answers images it was not fitted on.

    `rows` (from `agreement_set`) says which image each row of `x` is or is a view of. With `folds` (the
    cross-validated probe's fold heads, `probe.fold_heads`; `head` the refitted head (W, b) they stand in
    for), a row of a labelled image is answered by the fold head that held that image out: the candidate's
    features through it, plus the candidate's own head error (its logits minus W f + b), so both the features
    and the quantized head count. Without, each file's own answers.

    The rate is the mean over images of the share of an image's rows (the image and its views) that disagree;
    `detail` gives it with a 95% Wilson upper bound over the images, the independent units (views of one image
    are not independent of it). Several tasks: the worst task's rate decides. Results are cached by file
    (path, size, mtime), so the agreement and the labelled evidence of one candidate cost one pass."""

    def __init__(self, fp32: Path, x: np.ndarray, rows: np.ndarray, *, folds: dict | None = None,
                 head: tuple[np.ndarray, np.ndarray] | None = None, labels: np.ndarray | None = None,
                 threads: int | None = None, _cached: dict | None = None):
        self.x, self.rows, self.folds, self.head, self.threads = x, np.asarray(rows), folds, head, threads
        self.labels = labels  # (labelled images,) or (labelled images, tasks), train then validation order
        self._cache: dict = dict(_cached or {})  # a subset's FP32 outputs, sliced from its parent's (`_subset`)
        _, self.cluster = np.unique(self.rows, return_inverse=True)
        self.images = int(self.cluster.max()) + 1 if len(self.cluster) else 0
        self._fp32 = self._key(fp32)  # kept when the cache is cleared: `_subset` slices it
        self.top1 = [lg.argmax(1) for lg in self._outputs(fp32)[0]]  # INC's labels: FP32's answers, as the file gives them
        self.ref_logits = self._logits(fp32)
        self.ref = [lg.argmax(1) for lg in self.ref_logits]

    @property
    def out_of_fold(self) -> bool:
        return self.folds is not None

    def only(self, fp32: Path, images: np.ndarray) -> "Agreement | None":
        """The same measure on the rows of `images` (image ids, as in `rows`) alone; None when no row is left."""
        return self._subset(fp32, np.isin(self.rows, images))

    def without(self, fp32: Path, images: np.ndarray) -> "Agreement | None":
        """The same measure on the rows that show none of `images` (labelled image indices): for a candidate
        that was itself trained on them (QAT trains on the train split). None when no row is left."""
        return self._subset(fp32, ~np.isin(self.rows, images))

    def _subset(self, fp32: Path, keep: np.ndarray) -> "Agreement | None":
        if not keep.any():
            return None
        key, mine = self._key(fp32), None
        if key in self._cache:  # FP32's outputs on those rows are this set's: not run again
            outs, f = self._cache[key]
            mine = {key: ([o[keep] for o in outs], None if f is None else f[keep])}
        return Agreement(fp32, self.x[keep], self.rows[keep], folds=self.folds, head=self.head, labels=self.labels,
                         threads=self.threads, _cached=mine)

    @staticmethod
    def _key(path) -> tuple:
        st = Path(path).stat()
        return str(path), st.st_size, st.st_mtime_ns, st.st_ino

    def _outputs(self, path) -> tuple[list[np.ndarray], np.ndarray | None]:
        import onnxruntime as ort

        from edgexfer.runtime.model import session_options

        key = self._key(path)
        if key not in self._cache:
            if len(self._cache) > 2:
                self._cache = {k: v for k, v in self._cache.items() if k == self._fp32}
            src = with_head_inputs(Path(path)) if self.folds is not None else str(path)
            sess = ort.InferenceSession(src, sess_options=session_options(self.threads),
                                        providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            chunks = [sess.run(None, {name: self.x[i:i + 64]}) for i in range(0, len(self.x), 64)]
            outs = [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))] if chunks else []
            self._cache[key] = (outs[:-1], outs[-1]) if self.folds is not None else (outs, None)
        return self._cache[key]

    def _logits(self, path) -> list[np.ndarray]:
        """Each row's logits per task: a labelled image's from the fold head that held it out, when there are
        fold heads."""
        logits, f = self._outputs(path)
        if self.folds is None:
            return logits
        from edgexfer.probe import fold_logits

        w, b = self.head
        lab = self.rows < len(self.folds["fold"])
        z = logits[0].astype(np.float64)
        own_error = z[lab] - (f[lab].astype(np.float64) @ w.T + b)
        z[lab] = fold_logits(self.folds, f[lab], self.rows[lab]) + own_error
        return [z, *logits[1:]]

    def rates(self, path) -> list[float]:
        """Each task's disagreement with FP32: the mean over images of the share of their rows that disagree."""
        out = []
        for r, lg in zip(self.ref, self._logits(path)):
            per_image = np.bincount(self.cluster, weights=(lg.argmax(1) != r), minlength=self.images)
            out.append(float(np.mean(per_image / np.bincount(self.cluster, minlength=self.images))))
        return out

    def __call__(self, path) -> float:
        return 1.0 - max(self.rates(path))

    def detail(self, path) -> dict:
        rates = self.rates(path)
        rate = max(rates)
        return {"rate": rate, "images": self.images, "rows": int(len(self.rows)),
                "disagreeing": round(rate * self.images, 1), "upper95": wilson_upper(rate, self.images),
                "interval": "Wilson score, 95%, over images (an image and its views are one unit)",
                **({"per_task": rates} if len(rates) > 1 else {})}

    def labelled(self) -> np.ndarray:
        """The rows of the labelled images themselves (an image's first row; its views follow it)."""
        first = np.zeros(len(self.rows), bool)
        first[np.unique(self.cluster, return_index=True)[1]] = True
        return first & (self.rows < (0 if self.labels is None else len(self.labels)))

    def fp32_accuracy(self) -> float:
        from edgexfer.evaluate import mean_task_accuracy

        m = self.labelled()
        return mean_task_accuracy([lg[m] for lg in self.ref_logits], np.asarray(self.labels)[self.rows[m]])

    def evidence(self, path) -> dict:
        """The labelled images' paired accuracy drop, each answered as `_logits` answers it (out of fold): the
        evidence beside agreement (`guard_decision`). The images themselves, not their views."""
        from edgexfer.evaluate import mean_task_accuracy

        m = self.labelled()
        y = np.asarray(self.labels)[self.rows[m]]
        got = [lg[m] for lg in self._logits(path)]
        drop, se = paired_drop([lg[m] for lg in self.ref_logits], got, y)
        return {"val_accuracy": mean_task_accuracy(got, y), "val_drop": drop, "val_drop_se": se}


HALF_LEVEL = 0.5  # pixel levels: the rounding by which two decoders or resizers differ


def top1_stability(logits: Callable[[np.ndarray], list], x: np.ndarray, pp, seed: int = 0,
                   ref: list[np.ndarray] | None = None) -> dict:
    """How often a model (`logits`: (N, C, H, W) float32 -> a list of (N, K) logits, one per task) gives its own
    top-1 again when every pixel of `x` (preprocessed by `pp`) moves by a uniform amount within +-HALF_LEVEL of
    a level (the same amount on every channel of a grey image, whose channels a decoder makes equal): how much
    of its answer survives a perturbation that any deployment already makes. `ref`: its top-1 on `x` per task,
    where already known (else one more pass computes it)."""
    std = np.asarray(pp.std, np.float32).reshape(1, -1, 1, 1)
    level = np.float32(pp.scale) / std  # one pixel level, in the model's input units, per channel
    rng = np.random.default_rng(seed)
    ref = [np.asarray(lg).argmax(1) for lg in logits(x)] if ref is None else [np.asarray(r) for r in ref]
    pixels = x * std + np.asarray(pp.mean, np.float32).reshape(1, -1, 1, 1)  # pixel * scale
    grey = (np.abs(pixels - pixels[:, :1]).max(axis=(1, 2, 3)) < 1e-4) if x.shape[1] > 1 \
        else np.ones(len(x), bool)
    got = []
    for i in range(0, len(x), 64):
        xb = x[i:i + 64]
        noise = (rng.random(xb.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(2 * HALF_LEVEL)
        g = grey[i:i + 64]
        noise[g] = noise[g][:, :1]  # broadcast the first channel's noise to every channel of a grey image
        got.append([np.asarray(lg).argmax(1) for lg in logits(xb + noise * level)])
    agree = float(np.mean([np.mean(np.concatenate([b[t] for b in got]) == r) for t, r in enumerate(ref)]))
    return {"agreement": agree, "images": int(len(x)), "grey_images": int(grey.sum()),
            "noise": f"uniform within +-{HALF_LEVEL:g} of a pixel level on every pixel (the same on every channel "
                     f"of a grey image), seed {seed}"}


def fp32_stability(fp32: Path, x: np.ndarray, pp, threads: int | None = None, seed: int = 0,
                   ref: list[np.ndarray] | None = None) -> dict:
    """`top1_stability` of the ONNX file `fp32`: the agreement that asking more of INT8 asks it to reproduce
    differences smaller than a decoder's rounding."""
    from edgexfer.evaluate import onnx_logits

    return top1_stability(lambda xb: onnx_logits(fp32, xb, threads=threads), x, pp, seed, ref)


def describe(info: dict) -> str:
    """'1000 images: 150 labelled, out-of-fold (each answered by a cross-validation fold head that did not see
    it), 850 augmented views of the labelled images'."""
    if info.get("domain") == "target":
        s = f"{info['images']} images of the target domain (--adapt-bn kept): {info['unlabelled']} unlabelled"
        return s + (f", {info['augmented']} augmented views of them" if info["augmented"] else "")
    how = {"out-of-fold": "out-of-fold (each answered by a cross-validation fold head that did not see it)",
           "validation": "the validation split (not fitted)",
           "train": "training images, which the model was fitted on: no held-out images to measure on"}
    parts = []
    if info["labelled"]:
        parts.append(f"{info['labelled']} labelled, {how.get(info.get('labelled_from'), 'train + validation')}"
                     + (f", a sample of {info['labelled_available']}"
                        if info.get("labelled_from") == "out-of-fold" and info["labelled"] < info["labelled_available"]
                        else ""))
    if info["unlabelled"]:
        parts.append(f"{info['unlabelled']} unlabelled ("
                     + (", ".join(info["unlabelled_from"]) if info.get("unlabelled_from") else "--guard-data, --adapt-bn")
                     + ")")
    if info["augmented"]:
        parts.append(f"{info['augmented']} augmented views of the labelled images")
    return f"{info['images']} images: " + ", ".join(parts)


def images_needed(rate: float, max_drop: float, have: int, limit: int = 100_000) -> int | None:
    """How many unseen images the same disagreement `rate` needs for its 95% Wilson upper bound to fit `max_drop`
    (None: not even `limit`, or the rate itself is over)."""
    if not within(rate, max_drop) or not within(wilson_upper(rate, limit), max_drop):
        return None
    lo, hi = have, limit
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if within(wilson_upper(rate, mid), max_drop) else (mid + 1, hi)
    return lo


def unprovable(images: int, max_drop: float, fitted: bool = False) -> dict | None:
    """Why no INT8 file could be proven within `max_drop` on a certificate of `images` unseen images (None: one
    could): the images were fitted, or even a file that never disagrees with FP32 there would have a 95% upper
    bound over the bound (0 of 105 images: at most 3.5%, against 1%). `images_needed`: the smallest certificate on
    which a file with no disagreement is proven."""
    if fitted:
        return {"images": int(images), "why": "the guard's images are ones the model was fitted on"}
    floor = wilson_upper(0.0, images)
    if within(floor, max_drop):
        return None
    need = images_needed(0.0, max_drop, images)
    return {"images": int(images), "upper95_at_zero": floor, "images_needed": need,
            "why": f"even a file that never disagreed with FP32 on those {images} images would have a 95% upper "
                   f"bound of {floor:.1%}, over the {max_drop:.1%} bound"
                   + (f" (a certificate needs at least {need} images)" if need else "")}


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


def summarize(g: dict, info: dict, detail: dict, labelled: int, fp32_accuracy: float | None, shipped: dict,
              no_labelled: str = "no labelled images held out to compare") -> None:
    """Add to the guard record `g` how sure it is: the agreement set, the shipped file's disagreement with FP32
    (`detail`, from `Agreement.detail`: the rate over unseen images and its 95% Wilson upper bound), its labelled
    drop with the standard error (`shipped`: "val_accuracy", "val_drop", "val_drop_se", on `labelled` images
    held out as `info` says), whether the bound is proven (`g["proven"]`: the upper bound within it, on images
    the model was not fitted on), and one plain sentence that says on which images each figure was measured."""
    md = g["max_accuracy_drop"]
    rate, n, upper = detail["rate"], detail["images"], detail["upper95"]
    g["decides_on"] = "top-1 agreement with FP32 (label-free): an accuracy drop cannot exceed the disagreement rate"
    g["agreement_set"] = info
    g["disagreement"] = detail
    on = {"out-of-fold": "out-of-fold", "validation": "validation"}.get(info.get("labelled_from"))
    v = None
    if labelled and "val_drop" in shipped and on:
        v = {"images": labelled, "held_out_as": on, "fp32_accuracy": fp32_accuracy,
             "int8_accuracy": shipped["val_accuracy"], "drop": shipped["val_drop"], "drop_se": shipped["val_drop_se"]}
    g["validation"] = v
    fitted = bool(info.get("fitted"))
    g["proven"] = bool(g.get("within_bound") and within(upper, md) and not fitted)
    extra = detail.get("rows", n) - n  # the augmented views among the rows scored
    views = f", with {extra} augmented views of them" if extra > 0 else ""
    held = ", held out of the search that chose the file" if info.get("certified") else ""
    where = ("training images, which the model was fitted on (no validation split, no fold heads, no --guard-data)"
             if fitted else f"images the model was not fitted on{held}{views}")
    s = (f"INT8 gives FP32's top-1 on {1 - rate:.1%} of {n} {where}, so it loses at most {rate:.1%} of accuracy on "
         f"new images like these (at most {upper:.1%} with 95% confidence")
    if g["proven"]:
        s += ", within the bound)"
    elif fitted:
        s += "; no promise about new photos: pass unlabelled photos of the domain with --guard-data DIR)"
    elif within(rate, md):
        need = images_needed(rate, md, n)
        s += (f"; the {md:.1%} bound holds on the measured rate, not with 95% confidence: unproven"
              + (f"; about {need} unseen images at this rate would prove it (--guard-data DIR: unlabelled photos "
                 f"of the domain)" if need else "") + ")")
    else:
        s += f"; over the {md:.1%} bound)"
    if v:
        s += (f"; on {labelled} labelled images, {on}, it scores {v['int8_accuracy']:.1%} vs FP32 "
              f"{v['fp32_accuracy']:.1%} (drop {100 * v['drop']:+.1f} ± {100 * v['drop_se']:.1f} points).")
    else:
        s += f"; {no_labelled}."
    g["confidence"] = s


# -- the decision on one candidate ------------------------------------------------------------------------
# The guard decides on INT8/FP32 top-1 agreement over many images, not on labelled accuracy over a few:
# where INT8 gives FP32's top-1 it scores what FP32 scores, so each disagreement costs at most one correct
# answer, and an accuracy drop cannot exceed the disagreement rate. Labelled accuracy on images the model was
# not fitted on is measured beside it, and only a significant drop (below) overrules agreement.

SIGNIFICANT_SE = 2.0  # a labelled drop counts as evidence past max_drop by this many standard errors


def wilson_upper(rate: float, n: int, z: float = 1.96) -> float:
    """The upper end of the Wilson score interval (95% for z=1.96) of a proportion `rate` seen on `n`
    trials: with 0 of 1000 images disagreeing it is 0.38%, not 0."""
    if n <= 0:
        return 1.0
    d = 1 + z * z / n
    c = rate + z * z / (2 * n)
    h = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return float(min(1.0, (c + h) / d))


def paired_drop(ref: list[np.ndarray], cand: list[np.ndarray], y: np.ndarray) -> tuple[float, float]:
    """FP32 accuracy minus the candidate's on the same labelled images (averaged over tasks, each over its
    labelled images; -1: unlabelled), and the standard error of that paired difference. Per image the
    difference d = correct(candidate) - correct(FP32) is -1, 0 or +1; its binomial variance over n images
    is (b + c)/n - ((c - b)/n)^2 for b losses and c gains, so the standard error is sqrt(that / n): one
    flip on 4 images is a 25-point drop with a 22-point standard error."""
    y2 = y[:, None] if y.ndim == 1 else y
    drops, var = [], 0.0
    for t, (r, c) in enumerate(zip(ref, cand)):
        m = y2[:, t] >= 0
        if not m.any():
            continue
        d = (c[m].argmax(1) == y2[m, t]).astype(np.float64) - (r[m].argmax(1) == y2[m, t])
        drops.append(-float(d.mean()))
        var += float(d.var()) / len(d)
    if not drops:
        return 0.0, 0.0
    return float(np.mean(drops)), float(np.sqrt(var) / len(drops))


def guard_decision(disagreement: float, max_drop: float, val_drop: float | None = None,
                   val_drop_se: float | None = None) -> tuple[bool, str]:
    """Whether an INT8 candidate ships, and why, from its top-1 disagreement rate with FP32 on the
    agreement set and (optionally) its labelled drop (on images the model was not fitted on) with that drop's
    standard error.

    It passes when the disagreement rate is within `max_drop`: the accuracy drop cannot be larger, on
    images like those of the set. The labelled images can still reject it, but only on evidence: a drop
    beyond `max_drop` by more than SIGNIFICANT_SE (2) standard errors of the paired difference (about a
    one-sided 2.5% test). On 4 labelled images one flipped image is a 25-point drop with a ~22-point standard
    error: noise, not a reason to throw INT8 away; on 30 images, 10 losses and no gains are evidence
    (33 points with a 9-point standard error), though agreement on the whole set may look fine when the
    augmented views outnumber the real images.
    """
    if not within(disagreement, max_drop):  # one image at the bound is in
        return False, f"disagrees with FP32 on {disagreement:.2%} of the agreement set, over {max_drop:.2%}"
    if val_drop is not None and not within(val_drop, max_drop + SIGNIFICANT_SE * (val_drop_se or 0.0)):
        return False, (f"the drop on the held-out labelled images (out-of-fold or validation) {val_drop:+.2%} is "
                       f"beyond {max_drop:.2%} by more than "
                       f"{SIGNIFICANT_SE:g} standard errors ({val_drop_se:.2%})")
    return True, f"disagrees with FP32 on {disagreement:.2%} of the agreement set, within {max_drop:.2%}"


@dataclass(frozen=True)
class Scorer:
    """One figure the guard measures on every INT8 candidate file (`fn(path)`), and what it does with it.

    role "decides": the guard's own figure (exactly one): a candidate is within the bound when
        `reference - fn(path) <= max_drop` (the quantize stage: top-1 agreement with FP32, reference 1.0; the
        arm64 guard: emulated accuracy, reference FP32's). Recorded as the row's guard_accuracy and drop.
    role "at_least": must also be >= `limit` (e.g. agreement on the unlabelled --adapt-bn images).
    role "evidence": `fn` returns a dict of labelled figures, recorded in the row ("val_drop" and "val_drop_se"
        among them); it rejects a candidate only on a significant drop (`guard_decision`).
    role "record": recorded in the row under `name`, never decides (e.g. this host's accuracy)."""
    name: str
    fn: Callable[[Path], object]
    role: str = "record"
    reference: float = 1.0
    limit: float | None = None
    measured_on: str = "this host"

    def __post_init__(self):
        if self.role not in ("decides", "at_least", "evidence", "record"):
            raise ValueError(f"unknown scorer role {self.role!r}")


@dataclass(frozen=True)
class Judge:
    """How the guard judges one INT8 candidate file, whatever made it (a post-training recipe with some layers
    kept in FP32, quantization-aware fine-tuning, INC): its `scorers` (exactly one decides) and the bound.
    `judge(path)` is the candidate's row: guard_accuracy, drop, within_bound (and decision, with evidence),
    and every other scorer's figure."""
    scorers: tuple
    max_drop: float

    def __post_init__(self):
        object.__setattr__(self, "scorers", tuple(self.scorers))
        if [s.role for s in self.scorers].count("decides") != 1:
            raise ValueError("a guard's judge needs exactly one scorer that decides")

    @property
    def main(self) -> Scorer:
        return next(s for s in self.scorers if s.role == "decides")

    @property
    def at_least(self) -> dict:
        return {s.name: s.limit for s in self.scorers if s.role == "at_least"}

    def __call__(self, path) -> dict:
        main = self.main
        acc = float(main.fn(Path(path)))
        row = {"guard_accuracy": acc, "drop": main.reference - acc,
               "within_bound": within(main.reference - acc, self.max_drop)}  # one image at the bound is in
        for s in self.scorers:
            if s.role == "record":
                row[s.name] = s.fn(Path(path))
            elif s.role == "evidence":
                row.update(s.fn(Path(path)))
                row["within_bound"], row["decision"] = guard_decision(row["drop"], self.max_drop, row.get("val_drop"),
                                                                      row.get("val_drop_se"))
        for s in self.scorers:
            if s.role == "at_least":
                row[s.name] = s.fn(Path(path))
                row["within_bound"] = row["within_bound"] and at_least(row[s.name], s.limit)
        return row


def agreement_judge(agreement: Callable[[Path], float], max_drop: float, *, evidence: Callable | None = None,
                    target: tuple[str, Callable, float] | None = None) -> Judge:
    """The quantize stage's judge: top-1 agreement with FP32 decides (FP32 scores 1.0 against itself), the
    labelled `evidence` (`Agreement.evidence`) can reject on a significant drop, and `target` (name, scorer,
    limit: the --adapt-bn images' agreement) is a second bound."""
    return Judge([Scorer("guard_accuracy", agreement, "decides", 1.0),
                  *([Scorer(target[0], target[1], "at_least", limit=target[2])] if target else []),
                  *([Scorer("validation", evidence, "evidence")] if evidence else [])], max_drop)


# -- the search over post-training candidates ------------------------------------------------------------

PREFIX_STEPS = (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 10**6)


def guarded_quantize(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, recipe, judge: Judge, *,
                     steps: tuple[int, ...] = PREFIX_STEPS, fallback: str = "ranked", rank_on: np.ndarray | None = None,
                     rank_images: int = QuantizeConfig.rank_images, ranking: str = "revert",
                     threads: int | None = None, stop_below: float | None = None) -> dict:
    """Static INT8 under an accuracy bound: keep the fewest, cheapest weighted layers in FP32 until `judge`
    passes a candidate.

    Pre-processing and calibration run once (`edgexfer.exporters.quantize.calibrate`); every candidate is
    written from those ranges (`quantize`, the recipe with its layers excluded) and judged by `judge` (see
    `Judge`, `Scorer`). Plain INT8 (every weighted layer quantized) is tried first; when it misses the bound:

    - `fallback` "ranked" (the default): the weighted layers are ranked by their measured effect on the
      output (`edgexfer.exporters.sensitivity`, `ranking` "revert" or "qdq"), on `rank_on` images (default:
      up to `rank_images` of the calibration images: label-free, what the model will see), each layer's
      latency cost in FP32 is estimated, and the candidates are the top k of that ranking, of the
      ranking per millisecond and of graph order, k in `steps`, tried cheapest first: the first within the
      bound keeps the most (estimated) speed;
    - `fallback` "prefix": the first k weighted layers in graph order, k in `steps` (early layers see raw
      pixels and are, in CNNs, often the most sensitive);
    - `fallback` "none": no search, plain INT8 is written and judged (where no file could be proven, the
      quantize stage does not search: `unprovable`).

    `stop_below` (a speed-up, e.g. QAT's MIN_SPEEDUP): the ranked candidates estimated slower than that many
    times FP32 are not tried. They come last (cheapest first), so the search stops there: an INT8 file that keeps
    so many layers in FP32 is not worth shipping, and QAT, which keeps none, competes instead. For a host that is
    the target: the estimate is this host's speed (`benchmarks/bench_early_stop.py` measures how it holds). The record
    says how many were left and why (`stopped_early`).

    The first candidate within the bound is written to `out_path`; if none is, the most accurate one,
    with `within_bound` False. Returns the file's quantization record with the guard's under "guard"."""
    from edgexfer.exporters import quantize as qz
    from edgexfer.exporters.metadata_io import read_meta

    main = judge.main
    out_path = Path(out_path)
    if fallback not in ("ranked", "prefix", "none"):
        raise ValueError(f"unknown fallback {fallback!r}; choose ranked, prefix or none")
    if fallback == "none":
        steps = (0,)
    tried, best, stopped = [], None, None
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".guard-") as td:
        cal = qz.calibrate(fp32_path, calib, recipe, td)
        nodes = cal.nodes
        sens = None
        queue = [{"fp32_layers": 0, "nodes": (), "order": "plain"}] if 0 in steps else []
        if fallback == "prefix" or (fallback == "ranked" and not len(nodes)):
            queue += [{"fp32_layers": k, "nodes": tuple(nodes[:k]), "order": "graph prefix"}
                      for k in sorted({min(s, len(nodes)) for s in steps} - {0})]
        i = 0
        while True:
            if i == len(queue) and sens is None and fallback == "ranked" and len(nodes):
                from edgexfer.exporters import sensitivity

                x = calib[:rank_images] if rank_on is None else rank_on
                sens = sensitivity.rank(cal, x, method=ranking, threads=threads)
                sens["report"]["images_from"] = "calibration images" if rank_on is None else "given images"
                ranked = [c for c in sensitivity.candidates(sens, steps) if c["nodes"]]
                if stop_below is not None:
                    left = [c for c in ranked if c["est_speedup"] < stop_below]
                    ranked = [c for c in ranked if c["est_speedup"] >= stop_below]
                    plain = sens["latency"]["fp32"] / max(sens["latency"]["int8"], 1e-9)
                    why = (f"plain INT8 itself measured {plain:.2f}x FP32's batch-1 speed here, under {stop_below:g}x: "
                           f"none of the {len(left)} candidates that keep layers in FP32 can reach it, so none was tried"
                           if not ranked else
                           f"{len(left)} more candidates keep so many layers in FP32 that their estimated speed-up is "
                           f"under {stop_below:g}x FP32's: not tried")
                    stopped = {"below_speedup": stop_below, "candidates_left": len(left), "why": why} if left else None
                queue += ranked
            if i == len(queue):
                break
            c = queue[i]
            cand = dataclasses.replace(recipe, nodes_to_exclude=tuple(c["nodes"]))
            path = Path(td) / f"c{i}.onnx"
            t0 = time.perf_counter()
            qz.quantize(fp32_path, path, cal, cand)
            row = {"fp32_layers": c["fp32_layers"], **({k: v for k, v in c.items() if k not in ("nodes", "fp32_layers")}),
                   "seconds": time.perf_counter() - t0}
            t0 = time.perf_counter()
            row = {**row, **judge(path), "judge_seconds": time.perf_counter() - t0}
            tried.append(row)
            if best is None or row["guard_accuracy"] > best[0]["guard_accuracy"]:
                best = (row, path, cand)
            if row["within_bound"]:
                best = (row, path, cand)
                break
            i += 1
        row, path, cand = best
        os.replace(path, out_path)
    bounds = judge.at_least
    g = {"fp32_accuracy": main.reference, "max_accuracy_drop": judge.max_drop, "candidates": tried,
         "chosen_fp32_layers": row["fp32_layers"], "layers_kept_fp32": list(cand.nodes_to_exclude),
         "chosen_candidate": next(i for i, r in enumerate(tried) if r is row),  # two may keep as many layers
         "shipped_accuracy": row["guard_accuracy"], "measured_on": main.measured_on,
         "within_bound": row["within_bound"], "quantizable_layers": len(nodes),
         "calibration": {"calibrations": 1 if cal.ranges is not None else len(tried),
                         "seconds": cal.seconds, "reused_by_candidates": cal.ranges is not None,
                         "images": int(min(len(calib), recipe.calibration_samples))},
         **({"at_least": bounds} if bounds else {})}
    g["fallback"] = {"ranked": "sensitivity-ranked", "prefix": "graph prefix (first k weighted layers)",
                     "none": "none: plain INT8 only, not searched"}[fallback]
    if stopped and not row["within_bound"]:
        g["stopped_early"] = stopped
    if sens is not None:
        g["sensitivity"] = sens["report"]
        if "est_speedup" in row:
            g["estimated_speedup"] = row["est_speedup"]
    elif fallback == "ranked":
        g["sensitivity"] = None  # plain INT8 met the bound: nothing to rank
    return {**read_meta(out_path).quantization, "guard": g}


# -- the verdict, written once ---------------------------------------------------------------------------

def verdict(g: dict) -> dict:
    """The guard's last word on its record `g`, written into it once by the quantize stage: {"shippable": whether
    validation-side evidence lets the INT8 file ship, "verdict": why}: a candidate within the bound and, where the
    record says how sure it is, the 95% upper bound proving it (`proven`). report.py's `recommend` and
    runtime/bundle.py's `int8_verdict` read these; the rule is `edgexfer.runtime.bundle.guard_verdict`, where the
    runtime also reads records made before the guard wrote it. Where it was measured is `measured_on`: a reader
    that needs this host's own figure (`recommend`) checks that too."""
    from edgexfer.runtime.bundle import guard_verdict

    ok, why = guard_verdict(g)
    return {"shippable": ok, "verdict": why}
