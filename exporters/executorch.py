"""PyTorch → ExecuTorch `.pte` with the XNNPACK delegate (PyTorch's own edge runtime), the metadata inside.

    edgexfer export RUN --format executorch     # model.pte (FP32) and model.int8.pte (INT8) beside model.onnx

The FP32 program is `torch.export` of the fine-tuned model (a dynamic batch dimension, up to MAX_BATCH images),
lowered with `to_edge_transform_and_lower` and the XNNPACK partitioner: ExecuTorch's documented path. The INT8
program is quantized with PT2E (`prepare_pt2e` / `convert_pt2e`) and the XNNPACK quantizer (symmetric INT8,
weights per channel), calibrated on the images given (the run's INT8 calibration images), then lowered alike:
a quantization of its own, judged by the convert stage as the guard judges an INT8 file.

The edgexfer metadata travels in the program as a second method, `edgexfer_meta`, that returns the metadata's
JSON as bytes (`META_METHOD`): one file, no sidecar, read by `edgexfer.runtime.executorch_backend`. The XNNPACK
delegate's memory plan may hold fewer images than the exported bound: the program's input tensor records the
largest batch its memory plan holds, which the runtime reads (`MethodMeta`) and splits larger batches by.
"""
from __future__ import annotations

import numpy as np

from edgexfer.runtime import atomic
from edgexfer.runtime.executorch_backend import META_METHOD
from edgexfer.runtime.metadata import ModelMeta

MAX_BATCH = 64  # the largest batch the program takes (its batch dimension is dynamic up to this)


def _meta_module(blob: bytes):
    import torch

    class Meta(torch.nn.Module):  # forward(x) -> the metadata JSON's bytes (x only gives the method a signature)
        def __init__(self):
            super().__init__()
            self.register_buffer("blob", torch.tensor(list(blob), dtype=torch.uint8))

        def forward(self, x):
            return self.blob + 0 * x.sum().to(torch.uint8)

    return Meta()


def _quantized(model, example, calib: np.ndarray):
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    m = torch.export.export(model, (example,)).module()
    m = prepare_pt2e(m, XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True)))
    with torch.no_grad():
        for i in range(0, len(calib), 16):
            m(torch.from_numpy(np.ascontiguousarray(calib[i:i + 16])))
    return convert_pt2e(m)


def write_pte(model, meta: ModelMeta, out, example: np.ndarray, calib: np.ndarray | None = None) -> dict:
    """`model` (an nn.Module returning a tuple of logits, one per task) as an ExecuTorch program at `out`, INT8
    when `calib` (calibration images, float32 NCHW) is given; written atomically. Returns what was done."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.eval()
    x = torch.from_numpy(np.ascontiguousarray(example[:2] if len(example) >= 2 else np.repeat(example, 2, 0)))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        net = _quantized(model, x, calib) if calib is not None else model
        ep = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
        em = torch.export.export(_meta_module(meta.to_json().encode()), (torch.zeros(1),))
    prog = to_edge_transform_and_lower({"forward": ep, META_METHOD: em},
                                       partitioner={"forward": [XnnpackPartitioner()]}).to_executorch()
    plan = next(p for p in prog.executorch_program.execution_plan if p.name == "forward")
    cap = int(plan.values[plan.inputs[0]].val.sizes[0])  # the batch the memory plan holds
    atomic.write_bytes(out, prog.buffer)
    import executorch

    return {"exporter": f"executorch {getattr(executorch, '__version__', '')}".strip(), "delegate": "XNNPACK",
            "max_batch": cap,
            **({"quantization": "PT2E, XNNPACK quantizer: symmetric INT8, weights per channel",
                "calibration_images": int(len(calib))} if calib is not None else {})}
