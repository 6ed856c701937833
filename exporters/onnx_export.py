"""PyTorch -> ONNX with a dynamic batch axis, validated against PyTorch, metadata inside.

Validation follows optimum's `_run_validation`: run the source and ONNX Runtime on the same inputs,
compare output names, then shapes, then values within `atol`, then top-1 agreement; any failure
raises a typed `ExportError` and no file is left at the destination.
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgexfer.exporters.errors import AgreementError, AtolError, OutputNamesError, ShapeError
from edgexfer.exporters.metadata_io import set_props
from edgexfer.runtime.metadata import ModelMeta

DEFAULT_OPSET = 17


def validate(reference: list[np.ndarray], onnx_path: str | Path, x: np.ndarray, output_names: list[str], *,
             atol: float, min_agreement: float) -> dict:
    """Compare ONNX Runtime's outputs on `x` with `reference` (the source's outputs on the same `x`)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got_names = [o.name for o in sess.get_outputs()]
    if got_names != output_names:
        raise OutputNamesError(f"ONNX outputs {got_names} != expected {output_names}")
    outs = sess.run(output_names, {sess.get_inputs()[0].name: x})
    report = {"n": int(len(x)), "atol": atol, "outputs": {}}
    for name, ref, got in zip(output_names, reference, outs):
        if ref.shape != got.shape:
            raise ShapeError(f"output {name}: ONNX shape {got.shape} != source shape {ref.shape}")
        diff = float(np.max(np.abs(ref - got))) if ref.size else 0.0
        agree = float(np.mean(ref.argmax(-1) == got.argmax(-1))) if ref.size else 1.0
        report["outputs"][name] = {"max_abs_diff": diff, "top1_agreement": agree}
        if not diff <= atol:  # also catches NaN
            raise AtolError(f"output {name}: max abs difference {diff:.3g} exceeds atol {atol:g}")
        if agree < min_agreement:
            raise AgreementError(f"output {name}: top-1 agreement {agree:.4f} below {min_agreement}")
    report["max_abs_diff"] = max(o["max_abs_diff"] for o in report["outputs"].values())
    report["top1_agreement"] = min(o["top1_agreement"] for o in report["outputs"].values())
    return report


def _torch_export(model, dummy, path: Path, meta: ModelMeta, names: list[str], opset: int) -> None:
    import torch

    # The TorchScript exporter writes one self-contained file in under a second (the dynamo one
    # splits weights into a .onnx.data file and took far longer here).
    torch.onnx.export(
        model, (dummy,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
        input_names=[meta.input.name], output_names=names,
        dynamic_axes={meta.input.name: {0: "batch"}, **{n: {0: "batch"} for n in names}},
    )


def export_onnx(model, meta: ModelMeta, out_path: str | Path, sample: np.ndarray, *, opset: int = DEFAULT_OPSET,
                atol: float = 1e-3, min_agreement: float = 0.99) -> dict:
    """Export `model` (an `EdgeNet`, eval mode) to `out_path`; validate on `sample` (N, C, H, W) float32.

    Returns the validation report (max abs difference, top-1 agreement, export seconds).
    """
    import torch

    model = model.eval()
    out_path = Path(out_path)
    names = [t.output for t in meta.tasks]
    dummy = torch.from_numpy(sample[:1].copy())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".export-") as td:
        raw, checked = Path(td) / "raw.onnx", Path(td) / "model.onnx"
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # the TorchScript exporter's constant-folding chatter
            warnings.simplefilter("ignore", UserWarning)
            _torch_export(model, dummy, raw, meta, names, opset)
        export_s = time.perf_counter() - t0
        proto = onnx.load(str(raw))
        onnx.checker.check_model(proto)
        from edgexfer import __version__

        proto.producer_name, proto.producer_version = "edgexfer", __version__
        set_props(proto, meta)
        onnx.save_model(proto, str(checked))
        with torch.no_grad():
            ref = [o.numpy() for o in model(torch.from_numpy(sample))]
        report = validate(ref, checked, sample, names, atol=atol, min_agreement=min_agreement)
        report["cleanup"] = cleanup(checked, Path(td) / "slim.onnx", ref, sample, names, atol=atol,
                                    min_agreement=min_agreement)
        os.replace(Path(td) / "slim.onnx" if report["cleanup"]["kept"] else checked, out_path)  # same folder: atomic
    report.update(export_seconds=export_s, opset=opset, exporter=f"torch.onnx (TorchScript) {torch.__version__}")
    return report


def _p50_ms(path: Path, x: np.ndarray, rounds: int) -> float:
    from edgexfer.runtime.model import session_options

    sess = ort.InferenceSession(str(path), sess_options=session_options(1, spinning=False),
                                providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(3):
        sess.run(None, feed)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e3)


def cleanup(src: Path, dst: Path, reference: list[np.ndarray], x: np.ndarray, output_names: list[str], *,
            atol: float, min_agreement: float, rounds: int = 30) -> dict:
    """Graph clean-up with onnxslim (constant folding, pad fusion, dead nodes), kept only when the result
    is smaller or faster and still passes the same validation as the export."""
    try:
        import onnxslim
    except ImportError:
        return {"tool": "onnxslim", "kept": False, "reason": "onnxslim not installed"}
    before = onnx.load(str(src))
    try:
        slim = onnxslim.slim(before)
    except Exception as e:  # a failed optional optimisation must not fail the export
        return {"tool": "onnxslim", "kept": False, "reason": f"onnxslim failed: {type(e).__name__}: {e}"}
    slim.producer_name = before.producer_name
    onnx.save_model(slim, str(dst))
    try:
        val = validate(reference, dst, x, output_names, atol=atol, min_agreement=min_agreement)
    except ValueError as e:
        return {"tool": "onnxslim", "kept": False, "reason": f"outputs changed: {e}"}
    x1 = x[:1]
    t_before, t_after = _p50_ms(src, x1, rounds), _p50_ms(dst, x1, rounds)
    t_before = min(t_before, _p50_ms(src, x1, rounds))  # second pass, after the other, against drift
    size_before, size_after = src.stat().st_size, dst.stat().st_size
    kept = size_after < size_before or t_after < t_before
    return {"tool": f"onnxslim {getattr(onnxslim, '__version__', '')}".strip(), "kept": kept,
            "nodes_before": len(before.graph.node), "nodes_after": len(slim.graph.node),
            "size_before": size_before, "size_after": size_after,
            "p50_ms_before": t_before, "p50_ms_after": t_after, "max_abs_diff": val["max_abs_diff"],
            "reason": "smaller or faster, same outputs" if kept else "neither smaller nor faster"}
