"""Shared fixtures: a tiny synthetic ImageFolder and pipeline runs over it (built once per session), and the
two tiers of the suite.

Two tiers (issue 25): `make test` (plain `pytest`) runs everything; `make test-fast` (`pytest -m "not system"`)
runs the fast tier, in this process on a tiny random backbone (`fast_run`, `tiny_test`, `invoke`), in about a
minute. A test is marked `system` here, centrally (`pytest_collection_modifyitems`), when it uses the real-weights
run (`tiny_run`, `run_copy`); when its source, a helper of tests/ it calls or a fixture it uses starts a
subprocess (`run_cli`, `subprocess`, `sys.executable`: edgexfer, a venv's pip, qemu, Node), drives a browser or
builds a real backbone with its ImageNet weights; when it is marked `slow`; or when SYSTEM_TESTS or SYSTEM_MODULES
name it. A new test needs no marker: it lands in its tier by what it uses.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# The test runs have tens of unseen images, on which no INT8 file can be proven within a 1% bound, so by default
# the quantize stage would not search (quantize_stage.search_skipped); the tests of the search need it to run.
# Tests of the default delete the variable (test_pipeline_tiny.py::test_no_search_where_no_file_could_be_proven).
os.environ["EDGEXFER_SEARCH_UNPROVABLE"] = "1"
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


# absl-py (litert-torch brings it; openvino imports absl.logging when it is there) makes its stderr handler at
# import, on the sys.stderr of that moment: under pytest's capture, a stream closed when that capture ends, which a
# later log line (a uvicorn test's) then hits ("lost sys.stderr", the run aborted). Import it on the real stderr.
try:
    _stderr, sys.stderr = sys.stderr, sys.__stderr__
    import absl.logging  # noqa: F401,E402
except ImportError:
    pass
finally:
    sys.stderr = _stderr


# -- the fast tier: a tiny random backbone, in-process commands ------------------------------------------------

from edgexfer.backbones import TEST_BACKBONE, register_test_backbone  # noqa: E402

register_test_backbone()  # `tiny_test`: in this process only (a subprocess `edgexfer` does not know it)

# `edgexfer run` on the tiny backbone at 32 px with the built-in tuner: the whole pipeline in seconds
FAST_RUN_ARGS = ("--backbone", TEST_BACKBONE, "--image-size", "32", "--epochs", "2", "--batch-size", "16",
                 "--shots", "20", "--calibration-samples", "16", "--bench-iters", "5", "--tuner", "builtin",
                 "--qat", "off", "--threads", "1")


class Invoked(NamedTuple):
    exit_code: int
    stdout: str
    stderr: str


def invoke(*args) -> Invoked:
    """`edgexfer ARGS` in this process, as the console script runs it (`edgexfer.entry.main`: its one-line
    `error: ...` and exit codes), with stdin, stdout and stderr swapped by click's CliRunner: the fast tier's
    run_cli."""
    import random

    from click.testing import CliRunner

    from edgexfer.entry import main

    # what a command sets for its process stays with the command: torch's threads (bench and QAT set them), the
    # global random generators and the environment (OMP_WAIT_POLICY), as if it had run in a process of its own
    try:
        import torch
    except ImportError:  # the runtime alone: nothing of torch's to keep
        torch = None
    threads = torch.get_num_threads() if torch else None
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state() if torch else None)
    environ = dict(os.environ)
    try:
        with CliRunner().isolation() as streams:
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush(), sys.stderr.flush()  # the swapped streams are text wrappers over byte buffers
            out, err = (s.getvalue() for s in streams[:2])
    finally:
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        random.setstate(states[0]), np.random.set_state(states[1])
        if torch is not None:
            torch.set_num_threads(threads)
            torch.random.set_rng_state(states[2])
    return Invoked(code, *(b.decode(errors="replace") if isinstance(b, bytes) else b for b in (out, err)))


@pytest.fixture(scope="session")
def fast_run(tmp_path_factory, image_folder) -> Iterator[Path]:
    """One whole `edgexfer run` in this process on the tiny random backbone (32 px, the built-in tuner): the
    fast tier's shared run. Never change it: `fast_run_copy` is a copy to change."""
    runs = tmp_path_factory.mktemp("fast-runs")
    r = invoke("run", "--data", image_folder, "--runs", runs, "--name", "fast", *FAST_RUN_ARGS)
    assert r.exit_code == 0, f"edgexfer run (tiny_test) failed ({r.exit_code}):\n{r.stderr[-3000:]}"
    before = _files(runs / "fast")
    yield runs / "fast"
    assert _files(runs / "fast") == before, "a test changed the session's fast_run: change fast_run_copy instead"


def _files(folder: Path) -> dict:
    """Each file under `folder`: its size and modification time (what a test that writes there changes)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def fast_run_copy(fast_run, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "fast"
    shutil.copytree(fast_run, dst)
    return dst


# -- the two tiers: which tests are `system` (run by `make test`, skipped by `make test-fast`) -------------------

SYSTEM_FIXTURES = {"tiny_run", "run_copy"}  # the real-weights run (pretrained EfficientNet-Lite0, a subprocess)
# in a test's source, its helpers' or its fixtures': a subprocess (edgexfer, Python, a tool), a browser, a real
# backbone built with its ImageNet weights in this process (seconds each: the fast tier uses `tiny_test`, whose
# "imagenet" weights are a fixed random init of three small convolutions)
SYSTEM_SOURCE = re.compile(r'run_cli\(|subprocess\.|Popen\(|sys\.executable|sync_playwright'
                           r'|(build_backbone|model_config)\((?!"tiny_test")[^)]*weights="imagenet"|imagenet_classifier\(')
SYSTEM_MODULES: set[str] = set()  # whole files (none today: what each test uses decides)
SYSTEM_TESTS = {  # single tests the rule above misses
    "test_backbone_auto.py::test_select_backbone_ranks_and_honours_the_latency_limit",  # Lite0 and Lite1, ImageNet
}
_TESTS = str(Path(__file__).resolve().parent)


def _ours(fn) -> bool:
    f = getattr(getattr(fn, "__code__", None), "co_filename", "")
    return f.startswith(_TESTS)


def _runs_subprocess(fn, seen: set, depth: int = 3) -> bool:
    """Whether `fn` (a test, a fixture, a helper in tests/) starts a subprocess, itself or through the helpers of
    tests/ it names (followed `depth` calls deep)."""
    fn = inspect.unwrap(fn)
    if fn in seen or not _ours(fn):
        return False
    seen.add(fn)
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if SYSTEM_SOURCE.search(src):
        return True
    if depth == 0:
        return False
    codes, names = [fn.__code__], set()
    while codes:
        c = codes.pop()
        names.update(c.co_names)
        codes += [k for k in c.co_consts if inspect.iscode(k)]
    g = fn.__globals__
    return any(_runs_subprocess(g[n], seen, depth - 1) for n in names if inspect.isfunction(g.get(n)))


def _is_system(item) -> bool:
    if item.get_closest_marker("slow") or item.get_closest_marker("system"):
        return True
    file = Path(str(item.fspath)).name
    if file in SYSTEM_MODULES or f"{file}::{item.originalname}" in SYSTEM_TESTS:
        return True
    if SYSTEM_FIXTURES & set(item.fixturenames):
        return True
    seen: set = set()
    if _runs_subprocess(getattr(item, "obj", None), seen):
        return True
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {}
    return any(_runs_subprocess(d.func, seen) for name in item.fixturenames for d in defs.get(name, ()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _is_system(item):
            item.add_marker(pytest.mark.system)
