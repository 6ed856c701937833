"""Issue 13, data loss and the CLI: `--force` removes only what edgexfer wrote, artifacts are readable by
others (the umask's mode, not 0600), corrupt and unreadable images are told apart and skipped, a run that
fails on its data leaves nothing to refuse a corrected rerun, and bad --name / --port are one-line errors.

Fast: a two-layer ONNX model with edgexfer metadata stands in for a trained one; no training here."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import make_image_folder, run_cli
from tests.test_errors import assert_user_error


def tiny_model(path: Path, labels=("a", "b")) -> Path:
    """input (N,3,32,32) -> mean over H, W -> (N,3) @ W -> logits (N, len(labels)), with edgexfer metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgexfer.exporters.metadata_io import set_props
    from edgexfer.runtime.metadata import InputSpec, ModelMeta, Preprocessing, Task

    w = numpy_helper.from_array(np.ones((3, len(labels)), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(labels)])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    meta = ModelMeta(tasks=[Task("label", "logits", list(labels))], input=InputSpec("input", 32, 32),
                     preprocessing=Preprocessing(resize=32, crop=32), provenance={"backbone": "tiny"})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(set_props(model, meta), str(path))
    return path


def fake_run(folder: Path) -> Path:
    """A run folder as far as `bundle` cares: model.int8.onnx (mode 0600, as the old atomic writes left it) and
    a report.json whose accuracy guard passed it (without one, `bundle RUN` refuses to pick the INT8 file)."""
    m = tiny_model(folder / "model.int8.onnx")
    os.chmod(m, 0o600)
    (folder / "config.json").write_text("{}\n")
    (folder / "report.json").write_text(json.dumps(
        {"quantize": {"guard": {"within_bound": True, "max_accuracy_drop": 0.01}}}) + "\n")
    return folder


def cli(*args, cwd=None, **kw) -> subprocess.CompletedProcess:
    """`edgexfer ...` in a subprocess, optionally in another working directory."""
    if cwd is None:
        return run_cli(*args, **kw)
    return subprocess.run([sys.executable, "-m", "edgexfer", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- 1. bundle --force removes only a bundle -------------------------------------------------------

def test_bundle_force_refuses_the_working_directory(tmp_path):
    run = fake_run(tmp_path / "run")
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep me")
    p = cli("bundle", "--no-wheels", run, ".", "--force", cwd=work)
    assert_user_error(p, "--force will not replace")
    assert (work / "precious.txt").read_text() == "keep me" and listing(work) == ["precious.txt"]
    p = cli("bundle", "--no-wheels", run, "..", "--force", cwd=work)  # a folder above the working directory
    assert_user_error(p, "working directory")
    assert (work / "precious.txt").is_file() and (run / "model.int8.onnx").is_file()


def test_bundle_force_refuses_the_source_and_its_parent(tmp_path):
    run = fake_run(tmp_path / "run")
    before = listing(run)
    p = run_cli("bundle", "--no-wheels", run / "model.int8.onnx", run, "--force")
    assert_user_error(p, "source")
    p = run_cli("bundle", "--no-wheels", run, run, "--force")
    assert_user_error(p, "source")
    assert listing(run) == before


def test_bundle_force_refuses_a_folder_it_did_not_write(tmp_path):
    run = fake_run(tmp_path / "run")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not mine to delete")
    p = run_cli("bundle", "--no-wheels", run, other, "--force")
    assert_user_error(p, "not an edgexfer bundle")
    assert listing(other) == ["holiday.jpg"]
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    assert_user_error(run_cli("bundle", "--no-wheels", run, afile, "--force"), "not a folder")
    assert afile.read_text() == "x"


def test_bundle_force_replaces_a_bundle(tmp_path):
    run = fake_run(tmp_path / "run")
    out = tmp_path / "bundle"
    run_cli("bundle", "--no-wheels", run, out, check=True)
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["schema"] == "edgexfer.bundle/1" and manifest["model"] == "model.int8.onnx"
    (out / "stale.txt").write_text("from the last bundle")
    run_cli("bundle", "--no-wheels", run, out, "--force", check=True)
    assert not (out / "stale.txt").exists() and (out / "model.int8.onnx").is_file()
    # a bundle written before bundle.json existed (it had no end-to-end file and no labels.txt either) is
    # still recognised
    for p in [out / "bundle.json", out / "labels.txt", *out.glob("*.e2e.onnx")]:
        p.unlink(missing_ok=True)
    run_cli("bundle", "--no-wheels", run, out, "--force", check=True)
    assert (out / "bundle.json").is_file()


# -- 2. artifacts get the umask's mode -------------------------------------------------------------

def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_get_the_umask_mode(tmp_path, umask):
    from edgexfer.runtime import atomic

    old = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "report.json", {"a": 1})
        with atomic.atomic_path(tmp_path / "model.onnx") as tmp:
            tmp.write_bytes(b"x")
        assert mode(tmp_path / "report.json") == 0o666 & ~umask
        assert mode(tmp_path / "model.onnx") == 0o666 & ~umask
        assert atomic.current_umask() == umask and os.umask(umask) == umask  # read, and left as it was
    finally:
        os.umask(old)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bundle_files_do_not_copy_0600(tmp_path):
    run = fake_run(tmp_path / "run")  # its model is 0600
    out = tmp_path / "bundle"
    old = os.umask(0o022)
    try:
        run_cli("bundle", "--no-wheels", run, out, check=True)
    finally:
        os.umask(old)
    assert mode(out) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {p.name: mode(p) for p in files if mode(p) != 0o644} == {}


# -- 3. truncated and unreadable images ------------------------------------------------------------

def truncated_jpeg(path: Path) -> Path:
    """A JPEG cut off at two thirds: its header is whole, so Image.verify() passes it."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path, "JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with Image.open(path) as im:
        im.verify()  # the old check: it passes
    return path


def all_images(ds) -> list[str]:
    return [str(p) for s in (ds.train, ds.val, ds.test) for p in s.images]


def test_truncated_jpeg_is_skipped_and_listed(tmp_path, caplog):
    from edgexfer.data import list_images, load_image_folder

    data = make_image_folder(tmp_path / "d", per_class=6)
    bad = truncated_jpeg(data / "red_disc" / "cut.jpg")
    ds = load_image_folder(data)
    assert str(bad) not in all_images(ds)
    assert ds.skipped == [str(bad)] and ds.summary()["skipped_corrupt"] == [str(bad)]
    assert any("skipping corrupt image" in r.getMessage() and "cut.jpg" in r.getMessage() for r in caplog.records)
    assert str(bad) not in list_images(data)  # the unlabelled images of --adapt-bn too


def test_truncated_jpeg_strict_is_one_line(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=4)
    truncated_jpeg(data / "red_disc" / "cut.jpg")
    p = run_cli("run", "--data", data, "--runs", tmp_path / "runs", "--strict", "--epochs", "1", "--image-size", "32",
                "--bench-iters", "2", "--backbone", "efficientnet_lite0")
    assert_user_error(p, "corrupt image", "cut.jpg")
    assert not (tmp_path / "runs" / "demo" / "config.json").exists()  # a corrected rerun is not refused


def test_unreadable_image_is_not_called_corrupt(tmp_path, monkeypatch, caplog):
    """Root reads any file, so the permission error is simulated at the open the check makes."""
    from PIL import Image as PILImage

    from edgexfer import data as data_mod
    from edgexfer.errors import DataError

    folder = make_image_folder(tmp_path / "d", per_class=4)
    locked = folder / "green_bar" / "001.png"
    real_open = PILImage.open

    def open_(fp, *a, **k):
        if Path(fp) == locked:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(data_mod.Image, "open", open_)
    ds = data_mod.load_image_folder(folder)
    assert str(locked) not in all_images(ds)
    assert ds.unreadable == [str(locked)] and ds.skipped == []
    assert ds.summary()["skipped_unreadable"] == [str(locked)] and ds.summary()["skipped_corrupt"] == []
    msgs = [r.getMessage() for r in caplog.records if "001.png" in r.getMessage()]
    assert msgs and all("unreadable" in m and "Permission denied" in m and "corrupt" not in m for m in msgs)
    with pytest.raises(DataError, match=r"unreadable image: .*001\.png \(Permission denied\)"):
        data_mod.load_image_folder(folder, strict=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_unreadable_image_for_real(tmp_path):
    from edgexfer.data import load_image_folder

    folder = make_image_folder(tmp_path / "d", per_class=4)
    locked = folder / "green_bar" / "001.png"
    locked.chmod(0)
    try:
        ds = load_image_folder(folder)
    finally:
        locked.chmod(0o644)
    assert ds.unreadable == [str(locked)] and ds.skipped == []


# -- 4. the run folder: a data error writes nothing, --force removes only a run, resume cleans up --------

@pytest.fixture
def fake_stages(monkeypatch):
    """pipeline.run with every stage (and the report) stubbed: each marks itself done. The data still loads."""
    from edgexfer import pipeline, report

    calls = []

    def stage(name):
        def fn(run_dir, cfg, ws=None):
            calls.append(name)
            pipeline.RunFolder(run_dir).mark_done(name, 0.0)
        return fn

    for name in pipeline.STAGES:
        monkeypatch.setitem(pipeline.STAGE_FUNCS, name, stage(name))
    monkeypatch.setattr(report, "finalize", lambda run, cfg: {"stages": calls})
    return calls


def config(source) -> "object":
    from edgexfer.pipeline import DataConfig, ModelConfig, RunConfig

    return RunConfig(data=DataConfig(source=str(source), shots=None),
                     model=ModelConfig(backbone="efficientnet_lite0", image_size=96))  # no select stage


def test_data_error_leaves_no_config(tmp_path, fake_stages):
    from edgexfer import pipeline
    from edgexfer.errors import DataError

    run_dir = tmp_path / "runs" / "mine"
    with pytest.raises(DataError):
        pipeline.run(run_dir, config(tmp_path / "typo"))
    assert not (run_dir / "config.json").exists()
    data = make_image_folder(tmp_path / "d", per_class=4)
    pipeline.run(run_dir, config(data))  # the corrected rerun: not "another configuration"
    assert fake_stages == list(pipeline.STAGES) and (run_dir / "config.json").is_file()
    # --force over a finished run: a data error keeps the old run as it was
    before = listing(run_dir)
    with pytest.raises(DataError):
        pipeline.run(run_dir, config(tmp_path / "typo"), force=True)
    assert listing(run_dir) == before


def test_resume_removes_what_a_killed_run_left(tmp_path, fake_stages):
    from edgexfer import pipeline

    data = make_image_folder(tmp_path / "d", per_class=4)
    run_dir = tmp_path / "run"
    cfg = config(data)
    run_dir.mkdir()
    pipeline.RunFolder(run_dir).write_config(cfg)
    pipeline.RunFolder(run_dir).mark_done("finetune", 1.0)
    stale = [".train_state.pt.k2j3h4.tmp", ".report.json.x8y9z0.tmp"]
    for n in stale:
        (run_dir / n).write_bytes(b"\0" * 100)
    for d in (".guard-abc123", ".inc-q1w2e3", ".quantize-zz", ".export-yy", ".dynamic-xx"):
        (run_dir / d).mkdir()
        (run_dir / d / "candidate.onnx").write_bytes(b"\0" * 100)
    keep = ["notes.tmp", ".my-notes", "checkpoint.pt"]  # not names our temporaries have
    for n in keep:
        (run_dir / n).write_text("mine")
    (run_dir / ".git").mkdir()
    pipeline.run(run_dir, cfg)
    assert fake_stages == ["export", "quantize", "evaluate", "bench"]  # resumed after finetune
    assert sorted(p.name for p in run_dir.iterdir() if p.name not in ("config.json", "report.json")) == \
        sorted(keep + [".git"])


def test_force_removes_only_a_run_folder(tmp_path, fake_stages):
    from edgexfer import pipeline
    from edgexfer.errors import RunFolderError

    data = make_image_folder(tmp_path / "d", per_class=4)
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="not an edgexfer run folder"):
        pipeline.run(mine, config(data), force=True)
    assert listing(mine) == ["holiday.jpg"]
    (mine / "config.json").write_text('{"something": "else"}')
    with pytest.raises(RunFolderError, match="not an edgexfer run folder"):
        pipeline.run(mine, config(data), force=True)
    # a run folder is replaced
    run_dir = tmp_path / "run"
    pipeline.run(run_dir, config(data))
    (run_dir / "old-artifact.onnx").write_bytes(b"x")
    pipeline.run(run_dir, config(data), force=True)
    assert not (run_dir / "old-artifact.onnx").exists() and (run_dir / "config.json").is_file()


def test_force_never_removes_the_working_directory(tmp_path, monkeypatch, fake_stages):
    from edgexfer import pipeline
    from edgexfer.errors import RunFolderError

    data = make_image_folder(tmp_path / "d", per_class=4)
    work = tmp_path / "work"
    pipeline.run(work, config(data))  # even a run folder: not while it is where we stand
    monkeypatch.chdir(work)
    before = listing(work)
    with pytest.raises(RunFolderError, match="working directory"):
        pipeline.run(Path("."), config(data), force=True)
    with pytest.raises(RunFolderError, match="working directory"):
        pipeline.run(Path("../work"), config(data), force=True)
    assert listing(work) == before


@pytest.mark.parametrize("name", ["../victim", "..", ".", "a/b", "/tmp/x"])
def test_run_name_must_be_plain(tmp_path, name):
    """`run --name ../x --force` removed whatever that named; now a one-line usage error, nothing touched.
    (--data names a folder with no class folders, so that the old code failed fast, after its rmtree.)"""
    from edgexfer.pipeline import RunConfig

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    (victim / "precious.txt").write_text("keep me")
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (tmp_path / "no_classes").mkdir()
    p = run_cli("run", "--runs", runs, "--name", name, "--force", "--data", tmp_path / "no_classes")
    assert (victim / "precious.txt").is_file() and (victim / "config.json").is_file()
    assert_user_error(p, "--name")


# -- 5. --port is a port ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, env", [
    (("--port", "99999"), {}),
    (("--port", "-1"), {}),
    (("--port", "http"), {}),
    (("--port", "99999", "--server", "stdlib"), {}),
    ((), {"EDGEXFER_PORT": "70000"}),
])
def test_port_out_of_range_is_one_line(tmp_path, args, env):
    """`--port 99999` logged 99999 and listened elsewhere (or, on the stdlib server, a traceback)."""
    model = tiny_model(tmp_path / "m.onnx")
    try:
        p = run_cli("serve", model, *args, env=env, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started on an invalid port")
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--port" in last and "0 to 65535" in last, last
