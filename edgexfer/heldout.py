"""A run folder's held-out test split, rebuilt from its config.json (the data section pins the source,
label budget, test size and seed), for checks that run outside the pipeline (`edgexfer verify`).

numpy and Pillow only: it works with the runtime install, as `edgexfer verify` does.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def test_split(run_dir: str | Path) -> tuple[list, np.ndarray, list[str], str]:
    """(images, labels, classes, description) of the run's test split: images are paths or uint8 arrays."""
    from edgexfer.data import load_dataset
    from edgexfer.errors import DataError
    from edgexfer.runtime.errors import RuntimeInputError

    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json)")
    d = dict(json.loads(cfg_path.read_text())["data"])
    try:
        ds = load_dataset(d.pop("source", None), **{k: d[k] for k in ("shots", "val_fraction", "test_size",
                                                                       "test_fraction", "seed", "strict",
                                                                       "follow_symlinks") if k in d})
    except DataError as e:
        raise RuntimeInputError(f"{run_dir}: cannot rebuild its test split: {e}") from None
    return list(ds.test.images), np.asarray(ds.test.labels), list(ds.classes), f"the test split of {run_dir} ({ds.source})"
