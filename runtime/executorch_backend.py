"""ExecuTorch `.pte` programs (written by `edgexfer.exporters.executorch`) behind the part of ONNX Runtime's
`InferenceSession` interface that `EdgeModel` uses, as `openvino_backend` does for OpenVINO IR.

The metadata is the program's second method, `edgexfer_meta` (the metadata JSON as bytes); the model is its
`forward`, which takes the preprocessed float32 batch and returns one logits tensor per task, in the metadata's
task order. ExecuTorch's Python runtime (`executorch.runtime`) comes with the `executorch` package, which
brings torch (`pip install "edgexfer[executorch]"`); it is imported only when a `.pte` file is opened.
"""
from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edgexfer.runtime.backends import Session
from edgexfer.runtime.errors import MetadataError

META_METHOD = "edgexfer_meta"
MISSING = 'opening an ExecuTorch .pte file needs the executorch package (pip install "edgexfer[executorch]")'



class ExecuTorchSession(Session):
    """A `.pte` program loaded with ExecuTorch's runtime (XNNPACK delegate), with `get_inputs`, `get_outputs`,
    `get_modelmeta`, `run` and `get_providers` as `onnxruntime.InferenceSession` has them. ExecuTorch methods
    are not shared between threads: each thread loads its own."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise MetadataError(MISSING) from None
        self._torch = torch
        path = Path(path)
        try:
            self._program = Runtime.get().load_program(str(path))
        except Exception as e:  # ExecuTorch raises RuntimeError/ValueError with its own codes
            raise MetadataError(f"cannot load {path} as an ExecuTorch program: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:300]}") from None
        names = set(self._program.method_names)
        self._props = {}
        if META_METHOD in names:
            from edgexfer.runtime.metadata import META_KEY

            blob = self._program.load_method(META_METHOD).execute([torch.zeros(1)])[0]
            self._props = {META_KEY: bytes(blob.numpy().tobytes()).decode("utf-8", errors="replace")}
        if "forward" not in names:
            raise MetadataError(f"{path}: no 'forward' method in the program")
        # the largest batch `forward`'s memory plan holds (its input's recorded sizes): larger ones are split
        self.max_batch = max(1, int(self._program.metadata("forward").input_tensor_meta(0).sizes()[0]))
        self._local = threading.local()
        self.provider = "ExecuTorch:XNNPACK"
        self._inputs, self._outputs = [], []

    def describe(self, meta) -> None:
        """Inputs and outputs as the metadata says (a .pte program does not name its tensors): one float32
        (N, C, H, W) input, one (N, labels) output per task. EdgeModel's graph check then runs one image."""
        i = meta.input
        self._inputs = [SimpleNamespace(name=i.name, type="tensor(float)", shape=[None, i.channels, i.height, i.width])]
        self._outputs = [SimpleNamespace(name=t.output, type="tensor(float)", shape=[None, None]) for t in meta.tasks]

    def run(self, output_names, feed: dict) -> list:
        method = getattr(self._local, "method", None)
        if method is None:
            method = self._local.method = self._program.load_method("forward")
        (x,) = feed.values()
        names = [o.name for o in self._outputs]
        chunks = [method.execute([self._torch.from_numpy(x[i:i + self.max_batch])])
                  for i in range(0, len(x), self.max_batch)]
        by_name = {n: np.concatenate([c[k].detach().numpy() for c in chunks]) for k, n in enumerate(names)}
        return [by_name[n] for n in (output_names or names)]
