"""A fine-tune killed mid-run resumes from its last finished epoch: no epoch lost, none repeated."""
import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import make_image_folder

ARGS = ("--backbone", "efficientnet_lite0", "--image-size", "64", "--epochs", "4", "--batch-size", "4", "--shots", "24", "--strategy", "lpft")


def test_killed_finetune_resumes(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=24)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "edgexfer", "finetune", "--data", str(data), "--out", str(out), *ARGS]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "no epoch finished before the deadline"
    os.kill(p.pid, signal.SIGKILL)  # mid-run: at least one epoch done, the next under way
    p.wait()
    assert not (out / "checkpoint.pt").exists()
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming fine-tuning after epoch" in r.stderr
    assert "linear probe: done before the interruption" in r.stderr  # issue 27: the probe is not fitted again
    assert "linear probe: features of" not in r.stderr
    rep = json.loads((out / "report.json").read_text())
    t = rep["training"]
    assert t["resumed_after_epoch"] >= 1
    epochs = [h["epoch"] for h in t["history"] if h["phase"] == "finetune"]
    assert epochs == sorted(set(epochs)) and epochs == list(range(1, epochs[-1] + 1))  # none lost, none repeated
    assert (out / "checkpoint.pt").is_file() and not state.exists()
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary files left behind
