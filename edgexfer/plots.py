"""The run folder's figures: learning_curve.png (finetune) and confusion_matrix.png (evaluate)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgexfer.runtime.labels import figure_text
from edgexfer.runtime.plotting import save_plot


def learning_curve(path: Path, history: list[dict]) -> None:
    pts = [(h["epoch"], h["val_accuracy"]) for h in history if h["val_accuracy"] is not None]
    if not pts:
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
