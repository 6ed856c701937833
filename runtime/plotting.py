"""One way to save a figure: matplotlib on the Agg backend, written atomically as PNG; nothing (False) when
matplotlib is not installed (it is optional for the runtime and the training install alike)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgexfer.runtime import atomic


def save_plot(path: str | Path, draw: Callable) -> bool:
    """`draw(plt)` returns a figure; it is saved to `path` (PNG, 110 dpi) atomically and closed. False when
    matplotlib is missing (nothing is written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = draw(plt)
    try:
        with atomic.atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return True
