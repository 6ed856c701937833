"""A frozen network's features through ONNX Runtime: the cached features the probe and `--backbone auto` fit on.

    ext = OnnxFeatures(module, image_size=224, threads=2)   # exported once, in memory
    outs = ext(x)                                            # list of (N, ...) tensors, one per output of `module`

Where the backbone is frozen (the linear probe, its augmented views, the multi-layer candidates, the backbone
selection), its features are a pure function of the image, and ONNX Runtime computes them several times faster
than PyTorch eager on a CPU (depthwise convolutions, fused BatchNorm): `benchmarks/bench_features.py` measures
both on the same images, with the largest difference between them. One export per network and call site, reused
for every batch and every augmented view, and checked against PyTorch on a batch of another size first (a traced
graph can freeze a shape or a branch at the example's values). A module the exporter cannot trace, or whose graph
disagrees, falls back to PyTorch, as does a batch ONNX Runtime fails on; the log says so.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


class OnnxFeatures:
    """`module`'s outputs (a tensor, or a tuple of tensors) on batches of images, computed by ONNX Runtime on the
    CPU with `threads` intra-op threads (default: PyTorch's own), or by PyTorch where the export fails
    (`self.engine` says which, `self.why` why not ONNX Runtime). In eval mode (BatchNorm's running statistics, no
    dropout), whatever mode `module` is in, which is left as it was; its weights at construction are the ones
    exported."""

    def __init__(self, module: torch.nn.Module, image_size: int, channels: int = 3, *, threads: int | None = None,
                 what: str = "features"):
        self.module, self.session, self.why, self.exported = module, None, None, False
        threads = threads or torch.get_num_threads()
        try:
            import onnxruntime as ort

            from edgexfer.runtime.model import session_options

            buf = io.BytesIO()
            x = torch.zeros(2, channels, image_size, image_size)
            with torch.inference_mode(), warnings.catch_warnings(), evaluating(module):
                warnings.simplefilter("ignore")  # the tracer's chatter: this graph is for features, not shipped
                n_out = len(_as_tuple(module(x)))
                torch.onnx.export(module, (x,), buf, dynamo=False, opset_version=17, input_names=["input"],
                                  output_names=[f"out{i}" for i in range(n_out)],
                                  dynamic_axes={"input": {0: "batch"}, **{f"out{i}": {0: "batch"} for i in range(n_out)}})
            self.session = ort.InferenceSession(buf.getvalue(), sess_options=session_options(threads),
                                                providers=["CPUExecutionProvider"])
            self.exported = True
            # a traced graph can be silently wrong (a shape or a branch frozen at the example's values): both
            # engines on a batch of another size must agree before ONNX Runtime is trusted
            probe = torch.from_numpy(np.random.default_rng(0).standard_normal((3, channels, image_size, image_size))
                                     .astype(np.float32))
            with torch.no_grad(), evaluating(module):
                want = [o.numpy() for o in _as_tuple(module(probe))]
            got = self.session.run(None, {"input": probe.numpy()})
            for w, g in zip(want, got):
                if w.shape != g.shape or not np.allclose(g, w, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(w).max()))):
                    raise ValueError(f"the exported graph disagrees with PyTorch on a batch of 3 (shape {g.shape} "
                                     f"vs {w.shape})")
        except Exception as e:  # noqa: BLE001 - any exporter or runtime failure: PyTorch computes the same features
            self.session, self.why, self.exported = None, _why(e), False
            log.info("%s: PyTorch computes them (the ONNX export failed or disagreed: %s)", what, self.why)

    def _onnxruntime(self, xb: torch.Tensor) -> list[torch.Tensor] | None:
        """ONNX Runtime's outputs on one batch, or None (and PyTorch from then on) where it fails or gives a
        number of rows other than the batch's."""
        try:
            outs = self.session.run(None, {"input": np.ascontiguousarray(xb.numpy(), np.float32)})
            if any(len(o) != len(xb) for o in outs):
                raise ValueError(f"{len(xb)} images gave outputs of {[len(o) for o in outs]} rows")
        except Exception as e:  # noqa: BLE001 - PyTorch computes this batch and the rest
            self.session, self.why = None, _why(e)
            log.info("features: PyTorch computes the rest (ONNX Runtime failed: %s)", self.why)
            return None
        return [torch.from_numpy(o) for o in outs]

    @property
    def engine(self) -> str:
        return "onnxruntime" if self.session is not None else "pytorch"

    @property
    def described(self) -> str:
        """Which engine computed the features so far, for a record: "onnxruntime", "pytorch (why)", or
        "onnxruntime, then pytorch (why)" where ONNX Runtime failed on a batch after the check passed."""
        if self.session is not None:
            return "onnxruntime"
        return f"{'onnxruntime, then ' if self.exported else ''}pytorch ({self.why})"

    def __call__(self, x: torch.Tensor, batch_size: int = 64, progress: Callable | None = None) -> list[torch.Tensor]:
        """The outputs on `x` (N, C, H, W), batch by batch: one (N, ...) float32 tensor per output."""
        chunks = []
        starts = range(0, len(x), batch_size)
        for i in (progress(starts) if progress else starts):
            xb = x[i:i + batch_size]
            outs = self._onnxruntime(xb) if self.session is not None else None
            if outs is None:
                with torch.no_grad(), evaluating(self.module):
                    outs = [o.detach().clone() for o in _as_tuple(self.module(xb))]
            chunks.append(outs)
        if not chunks:
            with torch.no_grad(), evaluating(self.module):
                return [o[:0].clone() for o in _as_tuple(self.module(torch.zeros(1, *x.shape[1:])))]
        return [torch.cat([c[j] for c in chunks]) for j in range(len(chunks[0]))]


@contextlib.contextmanager
def evaluating(module: torch.nn.Module):
    """`module` in eval mode inside, every submodule's own mode restored after (the ONNX exporter would leave
    every submodule in the top module's mode)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.train(training)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class BlockPools(torch.nn.Module):
    """The global-average-pooled output of every block of `backbone` (`backbones.block_outputs`), as a tuple."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        from edgexfer.backbones import block_outputs, pool

        return tuple(pool(o) for o in block_outputs(self.backbone, x))


class Features(torch.nn.Module):
    """An `EdgeNet`'s head input (`EdgeNet.features`: the backbone's pooled features, or its taps)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.features(x)
