"""`edgexfer bundle`: a folder that installs into a fresh venv with the pinned runtime requirements only,
and whose example program classifies an image."""
import json
import os
import subprocess
import venv

import pytest

from tests.conftest import run_cli


def test_bundle_contents(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    run_cli("bundle", tiny_run, out, "--no-wheels", check=True)  # the wheels: test_bundle_runs_in_fresh_venv
    # the tiny run's INT8 is within the bound on a dozen unseen images, which cannot prove it: FP32 ships
    assert not json.loads((tiny_run / "report.json").read_text())["quantize"]["guard"]["proven"]
    assert json.loads((out / "bundle.json").read_text())["why"].startswith("FP32: INT8, unproven")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "bundle.json", "edgexfer", "example.py", "labels.txt",
                                                    "model.e2e.onnx", "model.onnx", "requirements.txt"]
    readme = (out / "README.md").read_text()
    assert "pip install -r requirements.txt" in readme and "--no-index" not in readme and "package index" in readme
    # INT8 anyway: the file itself
    run_cli("bundle", tiny_run / "model.int8.onnx", tmp_path / "int8", "--no-wheels", check=True)
    assert {"model.int8.onnx", "model.int8.e2e.onnx"} <= {p.name for p in (tmp_path / "int8").iterdir()}
    reqs = (out / "requirements.txt").read_text().split()
    assert [r.split("==")[0] for r in reqs] == ["numpy", "onnxruntime", "Pillow", "click"] and all("==" in r for r in reqs)
    again = run_cli("bundle", tiny_run, out, "--no-wheels")
    assert again.returncode == 1 and "exists" in again.stderr
    run_cli("bundle", tiny_run, out, "--force", "--no-wheels", check=True)


@pytest.mark.skipif(os.environ.get("EDGEXFER_SKIP_VENV_TEST") == "1", reason="EDGEXFER_SKIP_VENV_TEST=1")
def test_bundle_runs_in_fresh_venv(tiny_run, image_folder, tmp_path):
    """A host bundle carries this platform's wheels: it installs into a fresh venv with no index and no other
    wheel folder (the pip configuration of this machine left out), as its README says, and classifies."""
    out = tmp_path / "bundle"
    run_cli("bundle", tiny_run / "model.int8.onnx", out, check=True)  # the INT8 file itself (the run's is unproven)
    readme = (out / "README.md").read_text()
    assert "pip install --no-index --find-links wheels -r requirements.txt" in readme
    assert {w.split("-")[0].lower() for w in os.listdir(out / "wheels")} >= {"numpy", "onnxruntime", "pillow", "click"}
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    offline = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    offline.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", "wheels", "-r", "requirements.txt"],
                   cwd=out, env=offline, check=True, capture_output=True, text=True, timeout=900)
    img = next(image_folder.rglob("*.png"))
    p = subprocess.run([py, "example.py", "model.int8.onnx", str(img), "--top-k", "2"], cwd=out,
                       capture_output=True, text=True, check=True)
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(line["predictions"]) == 2 and line["predictions"][0]["label"]
    # the camera-loop shape: watch a folder for a bounded time
    watch = tmp_path / "incoming"
    watch.mkdir()
    (watch / "a.png").write_bytes(img.read_bytes())
    p = subprocess.run([py, "example.py", "model.int8.onnx", "--watch", str(watch), "--max-seconds", "1"], cwd=out,
                       capture_output=True, text=True, check=True)
    assert json.loads(p.stdout.strip().splitlines()[0])["image"].endswith("a.png")
    # the runtime's command line, as the board and the Docker image run it: the bundle holds edgexfer.runtime alone
    cmd = [py, "-m", "edgexfer.runtime"]
    p = subprocess.run([*cmd, "--help"], cwd=out, capture_output=True, text=True)
    assert p.returncode == 0 and "serve" in p.stdout and "finetune" not in p.stdout, p.stderr
    p = subprocess.run([*cmd, "predict", "model.int8.onnx", str(img)], cwd=out, capture_output=True, text=True)
    assert p.returncode == 0 and json.loads(p.stdout.strip().splitlines()[-1])["predictions"], p.stderr
    p = subprocess.run([*cmd, "finetune"], cwd=out, capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "runtime alone" in p.stderr, p.stderr
    # nothing but the runtime requirements was installed
    freeze = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True, check=True)
    assert "torch" not in {d["name"].lower() for d in json.loads(freeze.stdout)}
