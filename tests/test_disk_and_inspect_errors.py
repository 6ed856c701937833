"""Issue 26 item 2: clean failures. `inspect` refuses a hostile file (empty, truncated, external data outside
its folder) in one line; a full disk is one line naming the path (and the space needed, when known) in
`bundle`, `export` and `quantize`, with nothing half-written; `bundle RUN some_file/out` is one line.

Fast: in-process CLI calls, a two-layer ONNX model, ENOSPC raised by monkeypatching or met on a small tmpfs."""
from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_image_folder
from tests.test_data_safety import listing, tiny_model


def cli(capsys, *args) -> tuple[int, str, str]:
    """`edgexfer ARGS` in this process: (exit code, stdout, the last line of stderr)."""
    from edgexfer.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    return code, out, lines[-1] if lines else ""


def enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# -- inspect: hostile files ----------------------------------------------------------------------------

def test_inspect_reads_a_good_file(tmp_path, capsys):
    code, out, _ = cli(capsys, "inspect", tiny_model(tmp_path / "m.onnx"))
    assert code == 0 and "IR 8" in out and "labels: a, b" in out


def test_inspect_refuses_an_empty_file(tmp_path, capsys):
    (tmp_path / "empty.onnx").write_bytes(b"")
    code, out, err = cli(capsys, "inspect", tmp_path / "empty.onnx")
    assert code == 1 and out == "" and err == f"error: {tmp_path / 'empty.onnx'} is empty (0 bytes): not an ONNX model"


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.1])
def test_inspect_refuses_a_truncated_file(tmp_path, capsys, cut):
    data = tiny_model(tmp_path / "m.onnx").read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[:int(len(data) * cut)])
    code, out, err = cli(capsys, "inspect", bad)
    assert code == 1 and out == "" and err.startswith(f"error: {bad} is not a readable ONNX model (")


def _external(tmp_path: Path, location: str, length: int | None = None) -> Path:
    """The tiny model with its weight kept in external data at `location` (nothing is read or written there)."""
    import onnx
    from onnx.external_data_helper import set_external_data

    m = onnx.load(str(tiny_model(tmp_path / "src.onnx")))
    w = m.graph.initializer[0]
    n = len(w.raw_data) if w.HasField("raw_data") else 4 * len(w.float_data)
    set_external_data(w, location=location, offset=0, length=n if length is None else length)
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(m.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_inspect_refuses_external_data_outside_its_folder(tmp_path, capsys, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    path = _external(tmp_path, location)
    code, out, err = cli(capsys, "inspect", path)
    assert code == 1 and out == ""
    assert err == (f"error: {path}: tensor 'w' keeps its data in {location!r}, outside the model's folder; "
                   "refusing to read it")


def test_inspect_refuses_missing_or_short_external_data(tmp_path, capsys):
    path = _external(tmp_path, "w.bin")
    code, _, err = cli(capsys, "inspect", path)
    assert code == 1 and err == f"error: {path}: tensor 'w' keeps its data in 'w.bin', which is not beside it"
    (path.parent / "w.bin").write_bytes(b"\0" * 8)  # 3x2 float32 need 24
    code, _, err = cli(capsys, "inspect", path)
    assert code == 1 and err == f"error: {path}: tensor 'w' needs bytes up to 24 of 'w.bin', which holds 8 (truncated)"
    (path.parent / "w.bin").write_bytes(b"\0" * 24)
    code, out, _ = cli(capsys, "inspect", path)
    assert code == 0 and "labels: a, b" in out


# -- a full disk ---------------------------------------------------------------------------------------

def test_atomic_write_names_its_path_on_a_full_disk(tmp_path, monkeypatch):
    from edgexfer.runtime import atomic

    monkeypatch.setattr(Path, "write_bytes", enospc)
    with pytest.raises(atomic.DiskFull) as e:
        atomic.write_text(tmp_path / "report.json", "{}")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "report.json")
    assert str(e.value) == f"disk full: {tmp_path / 'report.json'} (No space left on device)"
    assert listing(tmp_path) == []  # no temporary file left


def test_bundle_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    from edgexfer.runtime import bundle as bundle_mod

    m = tiny_model(tmp_path / "m.onnx")
    monkeypatch.setattr(bundle_mod.shutil, "copytree", enospc)
    code, out, err = cli(capsys, "bundle", "--no-wheels", m, tmp_path / "out")
    assert code == 1 and err.startswith(f"error: disk full: {tmp_path / 'out'} (No space left on device; needs about ")
    assert listing(tmp_path) == ["m.onnx"]  # no bundle, no temporary folder


def test_bundle_checks_the_space_first(tmp_path, capsys, monkeypatch):
    from edgexfer.runtime import atomic

    m = tiny_model(tmp_path / "m.onnx")
    monkeypatch.setattr(atomic, "free_bytes", lambda p: 1000)
    code, out, err = cli(capsys, "bundle", "--no-wheels", m, tmp_path / "out")
    assert code == 1 and err.startswith(f"error: disk full: {tmp_path / 'out'} needs about ")
    assert err.endswith(", 1 kB free") and listing(tmp_path) == ["m.onnx"]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only, where mounting works)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to mount a small disk")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_bundle_on_a_real_full_disk(tmp_path, capsys, monkeypatch, small_disk):
    from edgexfer.runtime import atomic

    m = tiny_model(tmp_path / "m.onnx")
    code, _, err = cli(capsys, "bundle", "--no-wheels", m, small_disk / "out")  # the check before writing
    assert code == 1 and err.startswith(f"error: disk full: {small_disk / 'out'} needs about ")
    assert err.endswith(" kB free") and listing(small_disk) == []
    monkeypatch.setattr(atomic, "require_space", lambda path, needed: None)  # met while writing, for real
    code, _, err = cli(capsys, "bundle", "--no-wheels", m, small_disk / "out")
    assert code == 1 and err.startswith(f"error: disk full: {small_disk / 'out'} needs about ")
    assert listing(small_disk) == []  # the temporary folder went with the error


def test_bundle_out_under_a_file_is_one_line(tmp_path, capsys):
    m = tiny_model(tmp_path / "m.onnx")
    (tmp_path / "some_file").write_text("x")
    code, _, err = cli(capsys, "bundle", "--no-wheels", m, tmp_path / "some_file" / "deeper" / "out")
    assert code == 1 and err == (f"error: cannot write {tmp_path / 'some_file' / 'deeper' / 'out'}: "
                                 f"{tmp_path / 'some_file'} is a file, not a folder")
    assert (tmp_path / "some_file").read_text() == "x"


def _fake_run(tmp_path: Path) -> Path:
    """A run folder with a config, a stand-in checkpoint and model.onnx: enough to reach each stage's check."""
    from edgexfer.pipeline import DataConfig, RunConfig, RunFolder

    data = make_image_folder(tmp_path / "d", per_class=3)
    run = tmp_path / "run"
    run.mkdir()
    RunFolder(run).write_config(RunConfig(data=DataConfig(source=str(data), shots=None)))
    (run / "checkpoint.pt").write_bytes(b"\0" * 4096)
    tiny_model(run / "model.onnx")
    return run


def test_export_checks_the_space_first(tmp_path, capsys, monkeypatch):
    from edgexfer.runtime import atomic

    run = _fake_run(tmp_path)
    before = listing(run)
    monkeypatch.setattr(atomic, "free_bytes", lambda p: 2000)
    code, _, err = cli(capsys, "export", run, "--force")
    assert code == 1 and err == f"error: disk full: {run / 'model.onnx'} needs about 12 kB, 2 kB free"
    assert listing(run) == before


def test_quantize_says_disk_full(tmp_path, capsys, monkeypatch):
    from google.protobuf.message import DecodeError

    from edgexfer import quantize_stage
    from edgexfer.runtime import atomic

    run = _fake_run(tmp_path)
    free = {"bytes": 0}
    calls = []

    def quantize(run_dir, cfg=None, ws=None):
        calls.append(run_dir)
        free["bytes"] = 100  # the quantizer filled the disk, then read a truncated file back
        raise DecodeError("Error parsing message with type 'onnx.ModelProto'")

    monkeypatch.setattr(quantize_stage, "quantize", quantize)
    monkeypatch.setattr(atomic, "free_bytes", lambda p: free["bytes"])
    code, _, err = cli(capsys, "quantize", run)  # too little room: refused before any work
    assert code == 1 and err.startswith(f"error: disk full: {run / 'model.int8.onnx'} needs about ") and not calls
    free["bytes"] = 10**12
    code, _, err = cli(capsys, "quantize", run)  # the late DecodeError of a full disk
    assert code == 1 and calls and err.startswith(f"error: disk full: {run / 'model.int8.onnx'} needs about ")
    assert err.endswith(", 0 kB free")


def test_quantize_decode_error_with_room_left_is_not_called_disk_full(tmp_path, monkeypatch):
    from google.protobuf.message import DecodeError

    from edgexfer import pipeline, quantize_stage

    run = _fake_run(tmp_path)

    def quantize(run_dir, cfg=None, ws=None):
        raise DecodeError("Error parsing message")

    monkeypatch.setattr(quantize_stage, "quantize", quantize)
    with pytest.raises(DecodeError):
        pipeline.quantize(run)


def test_disk_full_anywhere_is_one_line(tmp_path, capsys, monkeypatch):
    """An ENOSPC from code that names no path (a library writing a file) still reads as a full disk."""
    from edgexfer.runtime import bundle as bundle_mod

    m = tiny_model(tmp_path / "m.onnx")
    monkeypatch.setattr(bundle_mod, "bundle", enospc)
    code, _, err = cli(capsys, "bundle", "--no-wheels", m, tmp_path / "out")
    assert code == 1 and err == "error: disk full: ? (No space left on device)"
