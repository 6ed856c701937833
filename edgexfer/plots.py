"""The run folder's figures: learning_curve.png (finetune) and confusion_matrix.png (evaluate)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgexfer.runtime.labels import figure_text
from edgexfer.runtime.plotting import save_plot


def learning_curve_points(history: list[dict] | None) -> list[tuple[int, float]]:
    """(epoch, validation accuracy) of each epoch that has one (epoch 0: the linear probe)."""
    return [(h["epoch"], h["val_accuracy"]) for h in history or () if h.get("val_accuracy") is not None]


def has_learning_curve(history: list[dict] | None) -> bool:
    """Is there a curve to draw? One point (a linear probe alone) is no curve: matplotlib would draw it on an
    axis of its own invention (-0.04 to 0.04), so none is drawn and report.md says why instead."""
    return len(learning_curve_points(history)) >= 2


def learning_curve(path: Path, history: list[dict]) -> None:
    """learning_curve.png: validation accuracy by epoch; with fewer than two points, no figure (and an
    earlier run's figure at `path` goes: it would describe another model)."""
    pts = learning_curve_points(history)
    if not has_learning_curve(history):
        Path(path).unlink(missing_ok=True)
        return

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*zip(*pts), marker="o")
        ax.set_xlabel("epoch (0 = linear probe)")
        ax.set_ylabel("validation accuracy")
        ax.set_title("learning curve")
        ax.grid(alpha=0.3)
        return fig

    save_plot(path, draw)


def confusion_matrix(path: Path, models: dict, classes: list[str]) -> None:
    """The INT8 file's confusion matrix on the test split (FP32's when there is no INT8 file)."""
    key = "int8" if "int8" in models else next(iter(models))
    cm = np.asarray(models[key]["confusion_matrix"])

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        im = ax.imshow(cm, cmap="Blues")
        names = [figure_text(c) for c in classes]  # shown as given: a `$` would start mathtext
        ax.set_xticks(range(len(classes)), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix ({models[key]['file']}, test split)")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        fig.colorbar(im, ax=ax)
        return fig

    save_plot(path, draw)
