"""Issue 28: the frozen backbone's features (the cross-validated probe's, its views', `--backbone auto`'s) come from
ONNX Runtime, exported once: the same features PyTorch computes, in eval mode whatever mode the model is in, the
model's modes left as they were, and PyTorch itself where the export fails."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch


def _tiny():
    from edgexfer.backbones import build_backbone, register_test_backbone

    register_test_backbone()
    return build_backbone("tiny_test", weights="imagenet", image_size=32)


def _reference(bb, x):
    from edgexfer.backbones import block_outputs, pool

    bb.eval()
    with torch.no_grad():
        return [pool(o) for o in block_outputs(bb, x)]


def test_block_features_equal_pytorch_in_eval_mode_and_modes_are_restored():
    from edgexfer.features import BlockPools, OnnxFeatures

    bb = _tiny()
    torch.manual_seed(1)
    x = torch.randn(11, 3, 32, 32)
    want = _reference(bb, x)
    bb.train()  # a model left in training mode: BatchNorm would use the batch's statistics
    bb.b1[1].eval()  # and one submodule in its own mode
    ext = OnnxFeatures(BlockPools(bb), 32)
    assert ext.engine == "onnxruntime", ext.why
    got = ext(x, batch_size=4)  # batches of 4, 4 and 3: a dynamic batch axis
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-5)
    assert bb.training and bb.stem.training and not bb.b1[1].training  # every mode as it was
    assert all(not g.requires_grad and not g.is_inference() for g in got)


def test_features_of_an_edgenet_with_taps():
    from edgexfer.features import Features, OnnxFeatures
    from edgexfer.model import EdgeNet

    model = EdgeNet(_tiny(), 16, {"label": 3}, taps=[1, 2]).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        want = model.features(x)
    (got,) = OnnxFeatures(Features(model), 32)(x)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    assert got.shape == (5, 32)


def test_empty_input_gives_empty_outputs_of_the_right_width():
    from edgexfer.features import BlockPools, OnnxFeatures

    got = OnnxFeatures(BlockPools(_tiny()), 32)(torch.zeros(0, 3, 32, 32))
    assert [tuple(g.shape) for g in got] == [(0, 8), (0, 16), (0, 16)]


class _Untraceable(torch.nn.Module):
    """Data-dependent Python control flow on a tensor's value: the tracer cannot export it faithfully, and this
    one refuses outright."""

    def forward(self, x):
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            raise RuntimeError("no export for this module")
        return x.mean((2, 3)) * 2


def test_a_module_that_does_not_export_falls_back_to_pytorch(caplog):
    from edgexfer.features import OnnxFeatures

    x = torch.randn(3, 3, 8, 8)
    with caplog.at_level(logging.INFO, logger="edgexfer.features"):
        ext = OnnxFeatures(_Untraceable(), 8, what="test features")
    assert ext.engine == "pytorch" and "no export for this module" in ext.why
    assert ext.described == f"pytorch ({ext.why})"
    assert "test features: PyTorch computes them" in caplog.text
    (got,) = ext(x)
    np.testing.assert_allclose(got.numpy(), (x.mean((2, 3)) * 2).numpy(), rtol=1e-6)


@pytest.mark.parametrize("taps", [True, False])
def test_the_cross_validated_probe_reads_onnx_runtime_features(taps, monkeypatch, caplog):
    """The engine fit_probe's cross-validated path builds once for the training, validation and view features (that
    fit_probe uses it: test_small_splits, probe_selection.features_by) gives what PyTorch gives."""
    from edgexfer import features, probe

    made = []
    real = features.OnnxFeatures

    class Counting(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(features, "OnnxFeatures", Counting)
    from edgexfer.model import EdgeNet

    model = EdgeNet(_tiny(), 16, {"label": 3})
    with caplog.at_level(logging.INFO, logger="edgexfer.probe"):
        ext = probe.features_engine(model, 32, 3, blocks=taps)
    assert made == [ext] and ext.engine == "onnxruntime"
    assert "features computed by onnxruntime" in caplog.text
    x = torch.randn(6, 3, 32, 32)
    if taps:
        got, want = probe.extract_block_features(model, x, ext=ext), probe.extract_block_features(model, x)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(probe.extract_features(model, x, ext=ext).numpy(),
                                   probe.extract_features(model, x).numpy(), rtol=1e-4, atol=1e-5)


class _TracedOtherwise(torch.nn.Module):
    """Traces without an error into a graph that computes something else (a branch taken at trace time)."""

    def forward(self, x):
        return x.mean((2, 3)) * (2 if torch.jit.is_tracing() else 1)


class _FrozenShape(torch.nn.Module):
    """Freezes the example's batch size into a reshape: the graph fails on any other batch."""

    def forward(self, x):
        return x.mean((2, 3)).reshape(2, -1) if torch.jit.is_tracing() else x.mean((2, 3))


@pytest.mark.parametrize("module, why", [(_TracedOtherwise, "disagrees with PyTorch"), (_FrozenShape, "Reshape")])
def test_a_graph_that_disagrees_with_pytorch_is_not_trusted(module, why):
    from edgexfer.features import OnnxFeatures

    ext = OnnxFeatures(module(), 8)
    assert ext.engine == "pytorch" and why in ext.why, ext.why
    x = torch.randn(5, 3, 8, 8)
    np.testing.assert_allclose(ext(x)[0].numpy(), x.mean((2, 3)).numpy(), rtol=1e-6)


def test_a_batch_onnx_runtime_fails_on_is_computed_by_pytorch():
    from edgexfer.features import BlockPools, OnnxFeatures

    bb = _tiny().eval()
    ext = OnnxFeatures(BlockPools(bb), 32)

    class Failing:
        def run(self, *a):
            raise RuntimeError("out of memory")

    ext.session = Failing()
    x = torch.randn(3, 3, 32, 32)
    got = ext(x)
    assert ext.engine == "pytorch" and ext.described == "onnxruntime, then pytorch (RuntimeError: out of memory)"
    for g, w in zip(got, _reference(bb, x)):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
