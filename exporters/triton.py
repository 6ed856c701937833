"""A Triton / KServe model repository from an edgexfer ONNX file, so the same model runs on an
existing serving cluster:

    REPO/<name>/config.pbtxt        platform onnxruntime_onnx, max_batch_size, dims without the batch axis,
                                    dynamic_batching, a CPU instance group, label files for classification
    REPO/<name>/1/model.onnx
    REPO/<name>/labels_<output>.txt one label per line (Triton's classification extension)
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgexfer.runtime.labels import lines
from edgexfer.runtime.model import EdgeModel


def quoted(s: str) -> str:
    """A protobuf text-format string literal: backslashes, quotes and control characters escaped."""
    return '"' + "".join({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c, c)
                         for c in s) + '"'


def config_pbtxt(model: EdgeModel, name: str, *, max_batch_size: int = 32, max_queue_delay_us: int = 1000,
                 instances: int = 1) -> str:
    i = model.meta.input
    outputs = "\n".join(
        f"""  {{
    name: {quoted(t.output)}
    data_type: TYPE_FP32
    dims: [ {len(t.labels)} ]
    label_filename: {quoted(f"labels_{t.output}.txt")}
  }}""" for t in model.meta.tasks)
    return f"""name: {quoted(name)}
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: {quoted(i.name)}
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ {i.channels}, {i.height}, {i.width} ]
  }}
]
output [
{outputs}
]
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: {instances}
    kind: KIND_CPU
  }}
]
"""


def write_triton_repo(model_path: str | os.PathLike, repo: str | os.PathLike, name: str, *,
                      max_batch_size: int = 32, max_queue_delay_us: int = 1000, version: int = 1) -> Path:
    """Write REPO/NAME (replacing an existing one atomically) and return its path."""
    model = EdgeModel(model_path)
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    dest = repo / name
    with tempfile.TemporaryDirectory(dir=repo, prefix=f".{name}.") as td:
        tmp = Path(td) / name
        (tmp / str(version)).mkdir(parents=True)
        shutil.copy2(model_path, tmp / str(version) / "model.onnx")
        (tmp / "config.pbtxt").write_text(config_pbtxt(model, name, max_batch_size=max_batch_size,
                                                       max_queue_delay_us=max_queue_delay_us))
        for t in model.meta.tasks:
            (tmp / f"labels_{t.output}.txt").write_text(lines(t.labels, f"{model_path}"), encoding="utf-8")
        if dest.exists():
            old = Path(td) / "old"
            os.replace(dest, old)
        os.replace(tmp, dest)
    return dest
