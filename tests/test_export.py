"""Export validation fails loudly, with a typed error, when the graph does not reproduce PyTorch."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgexfer.exporters import AgreementError, AtolError, OutputNamesError, ShapeError
from edgexfer.exporters.onnx_export import validate

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def reference(tiny_run):
    from edgexfer.model import load_checkpoint

    model, _, _ = load_checkpoint(tiny_run / "checkpoint.pt")
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = [o.numpy() for o in model(torch.from_numpy(x))]
    return x, ref


def test_exported_file_validates(tiny_run, reference):
    x, ref = reference
    rep = validate(ref, tiny_run / "model.onnx", x, ["logits"], atol=1e-3, min_agreement=0.99)
    assert rep["max_abs_diff"] < 1e-3 and rep["top1_agreement"] == 1.0


def test_corrupted_weights_raise(tiny_run, reference, tmp_path):
    x, ref = reference
    m = onnx.load(str(tiny_run / "model.onnx"))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the biggest weight tensor
    w = numpy_helper.to_array(init).copy()
    w *= -1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(AtolError):
        validate(ref, tmp_path / "bad.onnx", x, ["logits"], atol=1e-3, min_agreement=0.99)


def test_wrong_names_shapes_agreement(tiny_run, reference):
    x, ref = reference
    with pytest.raises(OutputNamesError):
        validate(ref, tiny_run / "model.onnx", x, ["scores"], atol=1e-3, min_agreement=0.99)
    with pytest.raises(ShapeError):
        validate([ref[0][:, :2]], tiny_run / "model.onnx", x, ["logits"], atol=1e-3, min_agreement=0.99)
    swapped = np.roll(ref[0], 1, axis=1)  # same values, every argmax moved by one
    with pytest.raises(AgreementError):
        validate([swapped], tiny_run / "model.onnx", x, ["logits"], atol=1e9, min_agreement=0.99)


def test_nan_output_fails_the_atol_check(tiny_run, reference):
    x, ref = reference
    nan = ref[0].copy()
    nan[0, 0] = np.nan  # `diff > atol` is False for NaN: the check must be written so that NaN fails it
    with pytest.raises(AtolError):
        validate([nan], tiny_run / "model.onnx", x, ["logits"], atol=1e9, min_agreement=0.0)


def test_failed_export_leaves_no_file_and_is_a_user_error(tiny_run, reference, tmp_path, monkeypatch):
    """An exporter that writes a wrong graph stops the stage with a typed error that the CLI prints as
    one line (no traceback), and neither the output file nor the temporary folder is left behind."""
    from edgexfer.cli import _user_errors
    from edgexfer.exporters import onnx_export
    from edgexfer.model import load_checkpoint
    from edgexfer.runtime.metadata import ModelMeta

    real = onnx_export._torch_export

    def wrong_export(model, dummy, path, meta, names, opset):
        real(model, dummy, path, meta, names, opset)
        m = onnx.load(str(path))
        init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
        onnx.save(m, str(path))

    monkeypatch.setattr(onnx_export, "_torch_export", wrong_export)
    model, _, _ = load_checkpoint(tiny_run / "checkpoint.pt")
    meta = ModelMeta.from_props({p.key: p.value for p in onnx.load(str(tiny_run / "model.onnx")).metadata_props})
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(AtolError) as e:
        onnx_export.export_onnx(model, meta, out, reference[0][:8], atol=1e-3)
    assert isinstance(e.value, _user_errors())
    assert "exceeds atol" in str(e.value) and "\n" not in str(e.value)
    assert list(out.parent.iterdir()) == []  # no model.onnx, no .export-* folder
