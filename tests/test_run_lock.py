"""Issue 26 item 3: one writer per run folder. Every command that writes a run folder holds an advisory lock
(flock on RUN/.lock, with the holder's pid, host and command); a second writer refuses in one line naming the
holder; a killed holder's lock is taken over; read-only commands are not blocked.

Fast: the holder is a small Python process; stages are stubbed (tests/test_data_safety.py's fake_stages)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import make_image_folder, run_cli
from tests.test_errors import assert_user_error
from tests.test_data_safety import config, fake_stages, listing, tiny_model  # noqa: F401  (fixture)
from tests.test_disk_and_inspect_errors import cli

HOLDER = textwrap.dedent("""
    import sys, time
    from edgexfer.runfolder import RunFolder
    held = RunFolder(sys.argv[1]).lock("run")
    held.__enter__()
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """A process holding the lock of tmp_path/run (as `edgexfer run` would), killed with SIGKILL at the end."""
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), "--name", "same"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        yield p, run
    finally:
        p.kill()
        p.wait()


def test_lock_records_its_holder(holder):
    p, run = holder
    d = json.loads((run / ".lock").read_text())
    assert d["pid"] == p.pid and d["stage"] == "run" and d["host"] and "--name same" in d["command"]


def test_a_second_writer_refuses_naming_the_first(holder):
    from edgexfer.errors import RunFolderError
    from edgexfer.runfolder import RunFolder

    p, run = holder
    with pytest.raises(RunFolderError) as e:
        with RunFolder(run).lock("quantize"):
            pass
    msg = str(e.value)
    assert msg.startswith(f"{run} is in use by another edgexfer process (pid {p.pid} on ")
    assert "--name same); one writer per run folder: wait for it to finish, or stop it" in msg
    assert len(msg.splitlines()) == 1
    assert json.loads((run / ".lock").read_text())["pid"] == p.pid  # the holder's record is left alone


def test_every_writing_stage_takes_the_lock(holder, fake_stages):  # noqa: F811
    from edgexfer import pipeline
    from edgexfer.errors import RunFolderError

    _, run = holder
    for stage in ("finetune", "export", "quantize", "evaluate", "bench"):
        fn = getattr(pipeline, stage)
        with pytest.raises(RunFolderError, match="is in use by another edgexfer process"):
            fn(run, config(run))
    with pytest.raises(RunFolderError, match="is in use by another edgexfer process"):
        pipeline.run(run, config(run))


def test_two_runs_of_one_name_the_second_refuses(holder, tmp_path):
    """`edgexfer run --name same` while another holds runs/same: one line with the holder's pid, nothing changed."""
    p, run = holder
    data = make_image_folder(tmp_path / "d", per_class=3)
    before = listing(run)
    r = run_cli("run", "--data", data, "--runs", run.parent, "--name", "run", "--backbone", "efficientnet_lite0",
                "--image-size", "32", "--epochs", "1")
    assert_user_error(r, f"is in use by another edgexfer process (pid {p.pid} on ")
    assert listing(run) == before


@pytest.mark.parametrize("args", [("quantize",), ("evaluate",), ("export", "--force")])
def test_writing_commands_refuse_in_one_line(holder, capsys, args):
    from edgexfer.pipeline import RunFolder

    p, run = holder
    RunFolder(run).write_config(config(run))  # a run folder as far as the commands' checks go
    code, _, err = cli(capsys, args[0], run, *args[1:])
    assert code == 1 and err.startswith(f"error: {run} is in use by another edgexfer process (pid {p.pid} on ")


def test_read_only_commands_are_not_blocked(holder, capsys):
    _, run = holder
    m = tiny_model(run / "model.onnx")
    code, out, _ = cli(capsys, "inspect", run)
    assert code == 0 and "labels: a, b" in out
    from PIL import Image

    Image.new("RGB", (32, 32)).save(run / "x.png")
    code, out, _ = cli(capsys, "predict", m, run / "x.png")
    assert code == 0 and '"label"' in out


def test_a_killed_holder_is_taken_over(holder):
    from edgexfer.runfolder import RunFolder

    p, run = holder
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == p.pid  # the stale record is still there
    with RunFolder(run).lock("run"):
        d = json.loads((run / ".lock").read_text())
        assert d["pid"] == os.getpid() and d["stage"] == "run"
        with RunFolder(run).lock("finetune"):  # re-entrant in one process (`run` around its stages)
            pass
        assert (run / ".lock").exists()
    assert not (run / ".lock").exists()


def test_lock_writes_nothing_when_the_data_is_wrong(tmp_path, fake_stages):  # noqa: F811
    from edgexfer import pipeline
    from edgexfer.errors import DataError

    with pytest.raises(DataError):
        pipeline.run(tmp_path / "runs" / "mine", config(tmp_path / "typo"))
    assert listing(tmp_path) == []  # neither runs/ nor runs/mine/ nor a .lock is left


def test_force_keeps_the_lock_and_replaces_the_rest(tmp_path, fake_stages):  # noqa: F811
    from edgexfer import pipeline

    data = make_image_folder(tmp_path / "d", per_class=4)
    run = tmp_path / "new"
    pipeline.run(run, config(data), force=True)  # --force on a folder not there yet
    (run / "old-artifact.onnx").write_bytes(b"x")
    pipeline.run(run, config(data), force=True)
    assert not (run / "old-artifact.onnx").exists() and not (run / ".lock").exists()
    assert (run / "config.json").is_file()
