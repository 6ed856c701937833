"""Shared fixtures: a tiny synthetic ImageFolder and one pipeline run over it (built once per session)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("red_disc", "green_bar", "blue_ring")


def make_image(cls: int, rng: np.random.Generator, size=(64, 48)) -> Image.Image:
    """A noisy image whose class shows in colour and shape (so a few epochs learn it)."""
    w, h = size
    a = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    cx, cy = w / 2 + rng.integers(-6, 7), h / 2 + rng.integers(-5, 6)
    r = np.hypot(xx - cx, yy - cy)
    if cls == 0:
        a[r < 14] = (220, 40, 40)
    elif cls == 1:
        a[np.abs(yy - cy) < 5] = (40, 220, 40)
    else:
        a[(r > 9) & (r < 15)] = (40, 40, 220)
    return Image.fromarray(a)


def make_image_folder(root: Path, per_class: int = 24, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            make_image(k, rng).save(root / c / f"{i:03d}.png")
    return root


def run_cli(*args, check=False, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Run `edgexfer ...` as a user would, in a subprocess (real exit codes, real stderr)."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "edgexfer", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"edgexfer {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p


TINY_RUN_ARGS = ("--backbone", "efficientnet_lite0", "--strategy", "lpft", "--image-size", "64", "--epochs", "2", "--batch-size", "16", "--shots", "20",
                 "--calibration-samples", "32", "--bench-iters", "10")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, image_folder) -> Path:
    """One whole `edgexfer run` on the tiny data set (pretrained EfficientNet-Lite0, 64x64)."""
    runs = tmp_path_factory.mktemp("runs")
    run_cli("run", "--data", image_folder, "--runs", runs, "--name", "tiny", *TINY_RUN_ARGS, check=True)
    return runs / "tiny"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the session's tiny run, for a test to change (the session's run is shared: never change it)."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="session", autouse=True)
def every_report_matches_its_schema(tmp_path_factory):
    """At the end of the session, every report.json an edgexfer command wrote under pytest's temporary folders
    (schema edgexfer.report/2) validates against the shipped JSON Schema (issue 14 item 3). Reports that tests
    wrote by hand as /1 or schema-less fixtures are not ours to check."""
    yield
    import json

    from edgexfer.report_schema import SCHEMA_ID, errors

    bad = []
    for p in sorted(tmp_path_factory.getbasetemp().rglob("report.json")):
        try:
            rep = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rep, dict) and rep.get("schema") == SCHEMA_ID:
            bad += [f"{p}: {e}" for e in errors(rep)[:3]]
    assert not bad, "report.json files that do not match edgexfer/schemas/report.schema.json:\n" + "\n".join(bad)
