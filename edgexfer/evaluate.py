"""Accuracy of the files that ship, measured by ONNX Runtime on the held-out test split.

Per-class precision, recall and F1 (scikit-learn), the confusion matrix, and the per-class change
between two files (what quantization did to each class).

`evaluate_folder` scores the same files on any labelled folder a user brings (`edgexfer evaluate
RUN|MODEL --data DIR`), through the runtime's own preprocessing and image limits, as `predict` does;
`write_evaluation` writes evaluation.json, misclassified.csv and a contact sheet of the mistakes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from edgexfer.runtime.progress import bars_off

from edgexfer.runtime import fmt


def onnx_logits(path: str | Path, x: np.ndarray, *, threads: int | None = None, batch: int = 64,
                desc: str | None = None) -> list[np.ndarray]:
    """Logits of every output of the ONNX file for (N, C, H, W) inputs, in batches."""
    import onnxruntime as ort

    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    chunks = [sess.run(None, {name: x[i:i + batch]}) for i in tqdm(range(0, len(x), batch), desc=desc, leave=False, disable=bars_off())]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": int(len(y_true)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def evaluate_file(path: str | Path, x: np.ndarray, y: np.ndarray, classes: list[str], *,
                  threads: int | None = None, tasks: dict[str, list[str]] | None = None) -> dict:
    """Metrics of the first output against `y` (N,) — or, with several `tasks` and `y` (N, tasks), the
    first task's metrics at the top level plus every task's under "tasks" (images unlabelled for a task,
    -1, are left out of its metrics)."""
    t0 = time.perf_counter()
    logits = onnx_logits(path, x, threads=threads, desc=f"evaluate {Path(path).name}")
    y2 = y[:, None] if y.ndim == 1 else y
    m = classification_metrics(y2[:, 0], logits[0].argmax(1), classes)
    if tasks and len(tasks) > 1:
        m["tasks"] = {}
        for t, (name, cls) in enumerate(tasks.items()):
            keep = y2[:, t] >= 0
            m["tasks"][name] = classification_metrics(y2[keep, t], logits[t][keep].argmax(1), cls)
        m["mean_task_accuracy"] = float(np.mean([v["accuracy"] for v in m["tasks"].values()]))
    m["seconds"] = time.perf_counter() - t0
    m["predictions"] = logits[0].argmax(1)  # dropped before writing the report; used for agreement
    m["logits"] = logits  # dropped before writing the report; used for the calibration error on the test split
    return m


def mean_task_accuracy(logits: list[np.ndarray], y: np.ndarray) -> float:
    """Top-1 accuracy averaged over tasks, each over the images labelled for it (-1: unlabelled)."""
    y2 = y[:, None] if y.ndim == 1 else y
    accs = [float(np.mean(lg[y2[:, t] >= 0].argmax(1) == y2[y2[:, t] >= 0, t])) for t, lg in enumerate(logits)]
    return float(np.mean(accs))


def per_class_delta(base: dict, other: dict, *, warn_points: float = 3.0) -> dict:
    """Recall (per-class accuracy) change from `base` to `other`, in points; flags classes past `warn_points`."""
    rows = {c: round(100 * (other["per_class"][c]["recall"] - v["recall"]), 2) for c, v in base["per_class"].items()}
    worst = min(rows, key=rows.get)
    return {"recall_delta_points": rows, "worst_class": worst, "worst_delta_points": rows[worst],
            "classes_losing_more_than": {"points": warn_points,
                                         "classes": [c for c, d in rows.items() if d < -warn_points]}}


# -- any labelled folder: `edgexfer evaluate RUN|MODEL --data DIR` -------------------------------------

EVALUATION_SCHEMA = "edgexfer.evaluation/1"
OUTPUT_FILES = ("evaluation.json", "misclassified.png", "misclassified.csv")
SHEET_MAX = 64  # thumbnails per scored file on the contact sheet; the CSV lists every mistake


def binomial_se(p: float, n: int) -> float | None:
    """Standard error of a proportion `p` measured on `n` independent images."""
    return math.sqrt(p * (1.0 - p) / n) if n else None


@dataclass
class LabelledFolder:
    """Images of a labelled ImageFolder: `root/CLASS/**/image`."""
    given: Path                 # what the user named
    root: Path                  # the folder whose subfolders are the classes (given, or given/test)
    used_test: bool             # root is given/test
    images: dict[str, list[Path]]  # class folder name -> its images, sorted
    outside: list[dict] = field(default_factory=list)  # symbolic links out of the folder, skipped: {path, why}

    @property
    def name(self) -> str:
        """A name for the output folder: the data folder's, with its parent's for a split folder."""
        p = self.given.resolve()
        if p.name in ("test", "val", "valid", "validation", "train") and p.parent.name:
            return f"{p.parent.name}-{p.name}"
        return p.name or "data"


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def find_labelled_folder(data: str | Path, *, follow_symlinks: bool = False) -> LabelledFolder:
    """DIR's subfolders are the classes; if DIR has a test/ subfolder of class folders, that is used instead
    (an ImageFolder tree with train/ val/ test/ splits). DataError when it holds no image in a class folder.
    Symbolic links (class folders, images) out of DIR are skipped and listed, unless `follow_symlinks`."""
    from edgexfer.data import IMAGE_EXTENSIONS, check_class_name, leads_outside
    from edgexfer.errors import DataError

    given = Path(data)
    if not given.is_dir():
        raise DataError(f"data folder not found: {data}")
    root, used_test = given, False
    test = given / "test"
    if test.is_dir() and any(_class_dirs(test)):
        root, used_test = test, True
    images, outside = {}, []
    real = given.resolve()

    def away(p: Path) -> bool:
        where = None if follow_symlinks else leads_outside(p, real)
        if where:
            outside.append({"path": str(p), "why": f"a symbolic link out of the data folder ({where}); "
                                                   "--follow-symlinks follows it"})
        return bool(where)

    for d in _class_dirs(root):
        check_class_name(d.name, f"class folder in {root}")
        if away(d):
            continue
        if d.name == "evaluations" and any(is_evaluation_folder(e) for e in d.iterdir() if e.is_dir()):
            continue  # our own output beside a model kept inside the data folder, not a class
        files = sorted((p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                        and not p.name.startswith(".") and not away(p)), key=str)
        if files:
            images[d.name] = files
    if not images:
        raise DataError(f"{root} holds no images in class subfolders (expected {root}/CLASS/*.jpg, one folder "
                        "per class)")
    return LabelledFolder(given=given, root=root, used_test=used_test, images=images, outside=outside)


def image_limits(max_pixels: int | None = None, max_aspect: float | None = None):
    """`predict`'s image limits (its defaults unless given), with Pillow's own decompression-bomb check
    moved out of their way, as `predict` does."""
    import warnings

    from PIL import Image

    from edgexfer.runtime.preprocess import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageLimits

    limits = ImageLimits(int(max_pixels or MAX_IMAGE_PIXELS), float(max_aspect or MAX_ASPECT_RATIO))
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, limits.max_pixels)
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    return limits


def evaluate_folder(models: dict[str, str | Path], data: str | Path | LabelledFolder, *, threads: int | None = 2,
                    skip_unknown: bool = False, limits=None, batch: int = 32, progress=None) -> dict:
    """Score each edgexfer ONNX file in `models` (key -> path) on a labelled folder, with the file's own
    preprocessing and `predict`'s image limits; corrupt or over-limit images are skipped and counted.

    Class folders must be among the model's labels (its first task's): DataError listing the others,
    unless `skip_unknown`, which leaves their images out and says so. Returns the evaluation document
    (schema edgexfer.evaluation/1): per file accuracy with its binomial standard error, macro-F1, per-class
    precision/recall/F1, the confusion matrix over the model's labels and every misclassified image (most
    confident mistake first); with FP32 among the files, each other file's top-1 agreement with it.
    `progress(done, total)`: called after each batch of images (the command's progress line)."""
    from edgexfer.errors import DataError
    from edgexfer.runtime.errors import ImageError, RuntimeInputError
    from edgexfer.runtime.model import EdgeModel, softmax
    from edgexfer.runtime.preprocess import preprocess

    folder = data if isinstance(data, LabelledFolder) else find_labelled_folder(data)
    limits = limits or image_limits()
    if not models:
        raise DataError("no model to evaluate")
    loaded = {k: EdgeModel(p, threads=threads, max_image_pixels=limits.max_pixels,
                           max_aspect_ratio=limits.max_aspect) for k, p in models.items()}
    first = next(iter(loaded.values()))
    task, labels = first.meta.tasks[0].name, list(first.meta.tasks[0].labels)
    for k, m in loaded.items():
        if list(m.meta.tasks[0].labels) != labels:
            raise DataError(f"{models[k]} has other labels than {models[next(iter(models))]}; evaluate them apart")
    unknown = sorted(set(folder.images) - set(labels))
    if unknown and not skip_unknown:
        raise DataError(f"class folders the model does not know: {', '.join(unknown)} (its labels: "
                        f"{', '.join(labels)}); rename them, or pass --skip-unknown to leave them out")
    paths, y = [], []
    for c, files in folder.images.items():
        if c in labels:
            paths += files
            y += [labels.index(c)] * len(files)
    if not paths:
        raise DataError(f"{folder.root} holds no images of the model's classes ({', '.join(labels)})")

    pps = {m.meta.preprocessing for m in loaded.values()}  # usually one: every file of a run shares it
    kept, skipped = [], list(folder.outside)
    logits: dict[str, list[np.ndarray]] = {k: [] for k in loaded}
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(paths), batch), desc="evaluate", leave=False, disable=bars_off() if progress is None else True):
        xs: dict = {pp: [] for pp in pps}
        for j in range(i, min(i + batch, len(paths))):
            try:
                arrs = {pp: preprocess(paths[j], pp, limits) for pp in pps}
            except (ImageError, RuntimeInputError) as e:
                skipped.append({"path": str(paths[j]), "why": str(e).splitlines()[0] if str(e) else type(e).__name__})
                continue
            kept.append(j)
            for pp, a in arrs.items():
                xs[pp].append(a)
        if not xs[next(iter(pps))]:
            continue
        for k, m in loaded.items():
            logits[k].append(m.run(np.stack(xs[m.meta.preprocessing]))[task].astype(np.float32))
        if progress is not None:
            progress(min(i + batch, len(paths)), len(paths))
    if not kept:
        raise DataError(f"none of the {len(paths)} images under {folder.root} could be read "
                        f"(first: {skipped[0]['path']}: {skipped[0]['why']})")
    y_true = np.asarray([y[j] for j in kept])
    kept_paths = [str(paths[j]) for j in kept]
    out_models, preds = {}, {}
    for k, m in loaded.items():
        prob = softmax(np.concatenate(logits[k]))
        pred = prob.argmax(1)
        preds[k] = pred
        met = classification_metrics(y_true, pred, labels)
        met["accuracy_se"] = binomial_se(met["accuracy"], met["n"])
        wrong = np.flatnonzero(pred != y_true)
        score = prob[np.arange(len(pred)), pred]
        wrong = wrong[np.argsort(-score[wrong], kind="stable")]  # the most confident mistakes first
        met["misclassified"] = [{"path": kept_paths[w], "true": labels[y_true[w]], "predicted": labels[pred[w]],
                                 "score": _finite(score[w])} for w in wrong]
        p = Path(models[k])
        out_models[k] = {"file": p.name, "path": str(p.resolve()), **met}
    doc: dict = {
        "schema": EVALUATION_SCHEMA,
        "data": {
            "folder": str(folder.given.resolve()), "scored_folder": str(folder.root.resolve()),
            "used_test_subfolder": folder.used_test, "task": task, "labels": labels,
            "images": len(kept), "per_class_images": {c: int(np.sum(y_true == labels.index(c))) for c in labels
                                                      if c in folder.images},
            "classes_without_images": [c for c in labels if c not in folder.images],
            "skipped_unknown_classes": {c: len(folder.images[c]) for c in unknown},
            "skipped_corrupt": len(skipped), "skipped": skipped,
        },
        "models": out_models,
        "seconds": time.perf_counter() - t0,
    }
    if "fp32" in preds and len(preds) > 1:
        doc["agreement_with_fp32"] = {}
        for k, pred in preds.items():
            if k != "fp32":
                a = float(np.mean(pred == preds["fp32"]))
                doc["agreement_with_fp32"][k] = {"top1_agreement": a, "se": binomial_se(a, len(pred)),
                                                 "n": int(len(pred))}
    return doc


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def is_evaluation_folder(out: Path) -> bool:
    """Whether `out` holds an evaluation.json edgexfer wrote (so its output files may be replaced)."""
    import json

    try:
        return json.loads((out / "evaluation.json").read_text()).get("schema") == EVALUATION_SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def check_out_dir(out: Path) -> None:
    """Refuse an output folder where writing would replace a file edgexfer did not write."""
    from edgexfer.errors import EdgexferError

    if out.exists() and not out.is_dir():
        raise EdgexferError(f"--out {out} is a file, not a folder")
    if not out.is_dir() or is_evaluation_folder(out):
        return
    clash = [n for n in OUTPUT_FILES if (out / n).exists()]
    if clash:
        raise EdgexferError(f"{out} already holds {', '.join(clash)}, not written by `edgexfer evaluate`; "
                            "choose another folder with --out")


def write_evaluation(doc: dict, out: Path, *, limits=None, sheet_max: int = SHEET_MAX) -> dict:
    """evaluation.json, misclassified.csv (every mistake of every file) and misclassified.png (per file,
    at most `sheet_max` most confident mistakes) into `out`, each written atomically; returns their paths."""
    import csv
    import io

    from edgexfer.contact_sheet import contact_sheet
    from edgexfer.runtime import atomic

    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "evaluation.json"), "png": str(out / "misclassified.png"),
             "csv": str(out / "misclassified.csv")}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "true", "predicted", "score", "file"])
    sections = []
    for k, m in doc["models"].items():
        for r in m["misclassified"]:
            w.writerow([r["path"], r["true"], r["predicted"], "" if r["score"] is None else f"{r['score']:.6f}", m["file"]])
        rows = m["misclassified"][:sheet_max]
        title = (f"{m['file']}: {len(m['misclassified'])} of {m['n']} misclassified (true -> predicted, "
                 f"the predicted label's score; most confident first)")
        sections.append((title, rows, len(m["misclassified"]) - len(rows)))
        m["contact_sheet_shows"] = len(rows)
    atomic.write_text(paths["csv"], buf.getvalue())
    sheet = contact_sheet(sections, limits=limits)
    with atomic.atomic_path(paths["png"]) as tmp:
        sheet.save(tmp, format="PNG")
    doc["outputs"] = paths
    atomic.write_json(paths["json"], doc)
    return paths


def format_evaluation(doc: dict, *, max_table_classes: int = 20) -> str:
    """The evaluation for people: per file accuracy ± SE, per-class table and confusion matrix."""
    d, lines = doc["data"], []
    labels = d["labels"]
    lines.append(f"{fmt.count(d['images'], 'image')} of {fmt.count(len(d['per_class_images']), 'class')} in {d['scored_folder']}"
                 + (f"; skipped {d['skipped_corrupt']} unreadable or corrupt" if d["skipped_corrupt"] else "")
                 + (f"; left out unknown classes {', '.join(d['skipped_unknown_classes'])}"
                    if d["skipped_unknown_classes"] else ""))
    w = max(8, min(14, max(len(c) for c in labels)))
    short = lambda c: c if len(c) <= w else c[:w - 1] + "~"  # noqa: E731
    for k, m in doc["models"].items():
        se = m["accuracy_se"]
        lines += ["", f"{m['file']} ({k}): accuracy {m['accuracy']:.4f} ± {se:.4f} (binomial SE), macro-F1 "
                      f"{m['macro_f1']:.4f}, {len(m['misclassified'])} misclassified"]
        if len(labels) > max_table_classes:
            lines.append(f"  ({len(labels)} classes: per-class metrics and confusion matrix in evaluation.json)")
            continue
        lines.append(f"  {'class':{w}s} {'precision':>9s} {'recall':>7s} {'F1':>7s} {'images':>7s}")
        for c, v in m["per_class"].items():
            lines.append(f"  {short(c):{w}s} {v['precision']:9.3f} {v['recall']:7.3f} {v['f1']:7.3f} {v['support']:7d}")
        lines.append("  confusion matrix (rows: true, columns: predicted)")
        lines.append("  " + " " * w + "".join(f" {short(c):>{w}s}" for c in labels))
        for c, row in zip(labels, m["confusion_matrix"]):
            lines.append(f"  {short(c):{w}s}" + "".join(f" {n:>{w}d}" for n in row))
    for k, a in doc.get("agreement_with_fp32", {}).items():
        lines += ["", f"{k.upper()}/FP32 top-1 agreement: {a['top1_agreement']:.4f} ± {a['se']:.4f} on {fmt.count(a['n'], 'image')}"]
    return "\n".join(lines)
