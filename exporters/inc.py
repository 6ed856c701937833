"""Accuracy-driven INT8 tuning with Intel Neural Compressor (its ONNX Runtime half,
onnx-neural-compressor), isolated in its own interpreter because it pins numpy<2.

Which interpreter: EDGEXFER_INC_PYTHON, else `.venv-inc/bin/python` under the current folder (`make inc`
builds it), else this one if it can import onnx_neural_compressor. Whatever INC picks, the accuracy that
counts is measured again by the caller with ONNX Runtime on the file that ships.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("inc_worker.py")


def inc_python() -> str | None:
    import os

    for cand in (os.environ.get("EDGEXFER_INC_PYTHON"), str(Path.cwd() / ".venv-inc" / "bin" / "python")):
        if cand and Path(cand).is_file():
            return cand
    try:
        import importlib.util

        if importlib.util.find_spec("onnx_neural_compressor") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    return None


def inc_tune(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, guard_x: np.ndarray,
             guard_y: np.ndarray, *, input_name: str, recipe, fp32_accuracy: float, max_drop: float,
             max_trials: int = 12, python: str | None = None, timeout: float = 1800) -> dict:
    """Run INC's autotune; returns {"tuned": bool, "trials": [...], ...}; writes `out_path` when tuned.

    `guard_x`, `guard_y`: the images and labels INC scores its trials on. The pipeline passes its agreement
    set (~1000 images) with FP32's own top-1 as labels and `fp32_accuracy` 1.0; the arrays travel through
    .npy files in a temporary folder and the worker maps the images from disk, so the set is not held twice
    in memory."""
    python = python or inc_python()
    if python is None:
        return {"tuned": False, "reason": "onnx-neural-compressor not available (make inc, or EDGEXFER_INC_PYTHON)"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgexfer-inc-") as td:
        work = Path(td)
        np.save(work / "calib.npy", calib)
        np.save(work / "guard_x.npy", guard_x)
        np.save(work / "guard_y.npy", guard_y)
        job = {"model": str(Path(fp32_path).resolve()), "input": input_name,
               "activation_type": recipe.activation_type, "weight_type": recipe.weight_type,
               "reduce_range": recipe.reduce_range, "max_trials": max_trials,
               # INC's loss is relative to the baseline; edgexfer's bound is absolute
               "tolerable_loss": max_drop / max(fp32_accuracy, 1e-9)}
        (work / "job.json").write_text(json.dumps(job))
        p = subprocess.run([python, str(WORKER), str(work)], capture_output=True, text=True, timeout=timeout)
        trials = json.loads((work / "trials.json").read_text()) if (work / "trials.json").is_file() else []
        res = {"tuner": "onnx-neural-compressor autotune", "python": python, "returncode": p.returncode,
               "trial_accuracies": trials, "seconds": time.perf_counter() - t0,
               "tolerable_loss_relative": job["tolerable_loss"]}
        if p.returncode != 0:
            res.update(tuned=False, reason=f"INC worker failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
        elif (work / "tuned.onnx").is_file():
            shutil.move(str(work / "tuned.onnx"), str(out_path))
            res["tuned"] = True
        else:
            res.update(tuned=False, reason="no INC candidate met the bound")
    return res
