"""PyTorch → LiteRT (TensorFlow Lite) `.tflite`, the metadata inside, with Google's own converter (`litert-torch`:
no TensorFlow needed).

    edgexfer export RUN --format litert     # model.tflite (FP32) and model.int8.tflite (INT8) beside model.onnx

The FP32 file is `litert_torch.convert` of the fine-tuned model at batch 1 (the interpreter resizes the batch:
`resize_tensor_input`). The INT8 file is quantized with PT2E and litert-torch's PT2E quantizer (static INT8,
weights per channel), calibrated on the images given (the run's INT8 calibration images); the converter makes
it full-integer, int8 input and output as MCUs and NPUs take, which the runtime feeds and reads through the
file's own quantization parameters. A quantization of its own, judged by the convert stage as the guard judges
an INT8 file.

The edgexfer metadata travels as an associated file, as TensorFlow Lite's metadata tooling packs them: a zip
archive appended to the flatbuffer (the interpreter reads the flatbuffer and ignores what follows it), holding
`edgexfer_meta.json` (`META_FILE`), read by `edgexfer.runtime.litert_backend`.
"""
from __future__ import annotations

import io
import zipfile

import numpy as np

from edgexfer.runtime import atomic
from edgexfer.runtime.litert_backend import META_FILE
from edgexfer.runtime.metadata import ModelMeta


def _quantized(model, example, calib: np.ndarray):
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    m = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
    with torch.no_grad():
        for i in range(len(calib)):
            m(torch.from_numpy(np.ascontiguousarray(calib[i:i + 1])))
    return convert_pt2e(m, fold_quantize=False), quantizer


def write_tflite(model, meta: ModelMeta, out, example: np.ndarray, calib: np.ndarray | None = None) -> dict:
    """`model` (an nn.Module returning a tuple of logits, one per task) as a LiteRT file at `out`, INT8 when
    `calib` (calibration images, float32 NCHW) is given; written atomically. Returns what was done."""
    import tempfile
    from pathlib import Path

    import litert_torch
    import torch

    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:1]))
    with torch.no_grad():
        if calib is None:
            edge = litert_torch.convert(model, (x,))
        else:
            from litert_torch.quantize.quant_config import QuantConfig

            net, quantizer = _quantized(model, x, calib)
            edge = litert_torch.convert(net, (x,), quant_config=QuantConfig(pt2e_quantizer=quantizer))
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".litert-") as td:
        flat = Path(td) / "model.tflite"
        edge.export(str(flat))
        packed = io.BytesIO()
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(META_FILE, meta.to_json())
        atomic.write_bytes(out, flat.read_bytes() + packed.getvalue())
    import importlib.metadata

    from edgexfer.runtime.litert_backend import LiteRTSession

    integer_io = LiteRTSession(out).integer_io
    return {"exporter": f"litert-torch {importlib.metadata.version('litert-torch')}",
            **({"quantization": "PT2E, litert-torch's quantizer: static INT8, weights per channel"
                                + (", int8 input and output (full integer)" if integer_io else ", float I/O"),
                "calibration_images": int(len(calib))} if calib is not None else {})}
