"""`--backbone auto` (issue 12 item 4): the backbone a cross-validated probe on the labelled images prefers,
within a latency budget measured on this host; recorded, shown in the report, and kept on resume."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgexfer.data import load_image_folder
from edgexfer.errors import EdgexferError
from edgexfer.transfer import probe_cv, select_backbone
from tests.conftest import make_image_folder, run_cli

SMALL = ("--image-size", "32", "--strategy", "linear", "--calibration-samples", "8", "--bench-iters", "2")


def test_probe_cv_separable_vs_noise():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 12)
    good = np.eye(3)[y] * 5 + rng.normal(0, 0.3, (36, 3))
    noise = rng.normal(0, 1, (36, 8))
    g, n = probe_cv(good, y), probe_cv(noise, y)
    assert g["cv_accuracy"] > 0.95 and g["images"] == 36 and "leave-one-out" in g["method"]
    assert n["cv_accuracy"] < 0.7 and n["cv_stderr"] > 0
    assert g["correct"].shape == (36,)
    # two images in a class are enough to hold one out; one is not
    assert probe_cv(good[:7], np.array([0, 0, 1, 1, 2, 2, 2]))["images"] == 7
    assert probe_cv(good[:5], np.array([0, 0, 1, 1, 2])) is None
    # two classes (one decision column): the held-out predictions are still right
    two = probe_cv(good[:24, :2], (y[:24] > 0).astype(int))
    assert two["cv_accuracy"] > 0.9 and two["correct"].shape == (24,)


def test_select_backbone_ranks_and_honours_the_latency_limit(tmp_path):
    ds = load_image_folder(make_image_folder(tmp_path / "d", per_class=6), shots=None, seed=0)
    names = ["efficientnet_lite0", "efficientnet_lite1"]
    sel = select_backbone(ds, names, {n: 32 for n in names})
    assert sel["chosen"] in names and sel["image_size"] == 32 and sel["method"] == "cv_accuracy"
    rows = {r["backbone"]: r for r in sel["candidates"]}
    assert set(rows) == set(names) and all(r["latency_p50_ms"] > 0 and "cv_accuracy" in r for r in rows.values())
    best = max(rows.values(), key=lambda r: (r["cv_accuracy"], -r["latency_p50_ms"]))
    assert sel["chosen"] == best["backbone"]
    assert sel["images"] == len(ds.train) + len(ds.val)  # train + validation, never the test split
    with pytest.raises(EdgexferError, match="no backbone runs that fast"):
        select_backbone(ds, names, {n: 32 for n in names}, max_latency_ms=1e-6)


def test_run_backbone_auto_records_and_resumes(tmp_path):
    data = make_image_folder(tmp_path / "shapes", per_class=8)
    args = ("run", "--data", data, "--runs", tmp_path / "runs", "--name", "a", *SMALL)
    p = run_cli(*args, check=True)
    run = tmp_path / "runs" / "a"
    cfg = json.loads((run / "config.json").read_text())
    sel = json.loads((run / "backbone_selection.json").read_text())
    assert cfg["model"]["requested_backbone"] == "auto" and cfg["model"]["backbone"] == sel["chosen"]
    assert cfg["model"]["image_size"] == 32 == sel["image_size"]
    rep = json.loads((run / "report.json").read_text())
    assert rep["backbone"]["name"] == sel["chosen"] and rep["backbone"]["selection"]["chosen"] == sel["chosen"]
    md = (run / "report.md").read_text()
    assert "`--backbone auto`" in md and ("| efficientnet_lite0 | 32 |" in md or "| efficientnet_lite0 (chosen) | 32 |" in md)
    assert f"| {sel['chosen']} (chosen) | 32 |" in md
    # the same command again: the folder's choice stands, nothing is redone
    before = (run / "backbone_selection.json").stat().st_mtime_ns
    p = run_cli(*args, check=True)
    assert "done already" in p.stderr and (run / "backbone_selection.json").stat().st_mtime_ns == before
    # another request is another configuration
    p = run_cli("run", "--data", data, "--runs", tmp_path / "runs", "--name", "a", *SMALL,
                "--backbone", "efficientnet_lite2")
    assert p.returncode == 1 and "another configuration" in p.stderr


def test_latency_limit_needs_auto_and_curve_takes_auto_as_its_default(tmp_path):
    p = run_cli("run", "--backbone", "efficientnet_lite0", "--max-latency-ms", "5", "--runs", tmp_path)
    assert p.returncode == 1 and "--max-latency-ms goes with --backbone auto" in p.stderr
    assert "Traceback" not in p.stderr
    p = run_cli("run", "--weights", "none", "--runs", tmp_path)
    assert p.returncode == 1 and "name the backbone" in p.stderr and "Traceback" not in p.stderr
    # `curve --help` shows auto as the default, so auto is accepted: one backbone for every point (issue 23)
    p = run_cli("curve", "--backbone", "auto", "--data", tmp_path / "missing", "--out", tmp_path / "c")
    assert "--backbone auto: the curve compares label counts on one backbone, efficientnet_lite0" in p.stderr
    assert p.returncode == 1 and "not found" in p.stderr and "Traceback" not in p.stderr


def test_each_size_of_a_backbone_is_a_candidate(tmp_path):
    """Photos are compared at several sizes of one backbone (data.auto_image_sizes): each (backbone, size) pair is
    measured, timed and ranked on its own, and the lead names the runner-up's size (the tiny test backbone)."""
    from edgexfer.backbones import TEST_BACKBONE

    ds = load_image_folder(make_image_folder(tmp_path / "d", per_class=6), shots=None, seed=0)
    sel = select_backbone(ds, [f"{TEST_BACKBONE}@none"], {TEST_BACKBONE: [32, 48]})
    rows = sel["candidates"]
    assert sorted(r["image_size"] for r in rows) == [32, 48] and {r["backbone"] for r in rows} == {TEST_BACKBONE}
    assert all(r["latency_p50_ms"] > 0 and "cv_accuracy" in r for r in rows)
    best = max(rows, key=lambda r: (r["cv_accuracy"], -r["latency_p50_ms"]))
    assert (sel["chosen"], sel["image_size"]) == (best["backbone"], best["image_size"])
    other = next(r for r in rows if r is not best)
    assert sel["lead"]["over"] == f"{TEST_BACKBONE} at {other['image_size']} px" and sel["lead"]["over"] in sel["reason"]
    with pytest.raises(EdgexferError, match=rf"no backbone runs that fast here \(fastest: {TEST_BACKBONE} at \d+ px"):
        select_backbone(ds, [f"{TEST_BACKBONE}@none"], {TEST_BACKBONE: [32, 48]}, max_latency_ms=1e-6)
