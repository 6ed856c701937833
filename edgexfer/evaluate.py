"""Accuracy of the files that ship, measured by ONNX Runtime on the held-out test split.

Per-class precision, recall and F1 (scikit-learn), the confusion matrix, and the per-class change
between two files (what quantization did to each class).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm


def onnx_logits(path: str | Path, x: np.ndarray, *, threads: int | None = None, batch: int = 64,
                desc: str | None = None) -> list[np.ndarray]:
    """Logits of every output of the ONNX file for (N, C, H, W) inputs, in batches."""
    import onnxruntime as ort

    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    chunks = [sess.run(None, {name: x[i:i + batch]}) for i in tqdm(range(0, len(x), batch), desc=desc, leave=False, disable=None)]
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
