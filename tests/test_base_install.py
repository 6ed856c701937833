"""`pip install .` with no extras is the runtime: numpy, onnxruntime, Pillow — and it predicts.

Builds a fresh virtual environment (package registries only), so it takes a minute; set
EDGEXFER_SKIP_VENV_TEST=1 to skip it locally.
"""
import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("EDGEXFER_SKIP_VENV_TEST") == "1", reason="EDGEXFER_SKIP_VENV_TEST=1")
def test_base_install_predicts_without_torch(tmp_path, tiny_run, image_folder):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=900)
    freeze = subprocess.run([str(py), "-m", "pip", "list", "--format=json"], check=True, capture_output=True,
                            text=True).stdout
    names = {p["name"].lower() for p in json.loads(freeze)}
    assert "torch" not in names and "onnx" not in names  # click is in: the one command tree (pure Python)
    assert {"numpy", "onnxruntime", "pillow", "edgexfer"} <= names
    code = ("import sys, json; from edgexfer.runtime import EdgeModel; m = EdgeModel(sys.argv[1]); "
            "p = m.predict(sys.argv[2]); print(json.dumps({'top': p[0]['label'], 'torch': 'torch' in sys.modules}))")
    img = next(image_folder.rglob("*.png"))
    out = subprocess.run([str(py), "-c", code, str(tiny_run / "model.int8.onnx"), str(img)], check=True,
                         capture_output=True, text=True, cwd=tmp_path).stdout
    res = json.loads(out)
    assert res["torch"] is False and res["top"]

    # the console script works without the training toolchain: runtime commands run, others explain
    exe = str(env_dir / "bin" / "edgexfer")
    b = subprocess.run([exe, "bench", str(tiny_run / "model.int8.onnx"), "--iters", "3", "--batches", "1",
                        "--no-cold-start", "--json-out", str(tmp_path / "b.json")], capture_output=True, text=True, cwd=tmp_path)
    assert b.returncode == 0, b.stderr
    assert json.loads((tmp_path / "b.json").read_text())["models"][f"{tiny_run.name}/model.int8.onnx"]["latency_ms"]["p50"] > 0
    c = subprocess.run([exe, "compare", str(tmp_path / "b.json"), str(tmp_path / "b.json")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert c.returncode == 0 and "[b.json]" in c.stdout and "model.int8.onnx" in c.stdout, c.stderr
    r = subprocess.run([exe, "run"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1 and "edgexfer[train]" in r.stderr and "Traceback" not in r.stderr
    h = subprocess.run([exe, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert h.returncode == 0 and "serve" in h.stdout and "[train]" in h.stdout and "quantize" in h.stdout, h.stderr
