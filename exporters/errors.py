"""Typed export errors (after optimum's exporters): each stops the stage; none is downgraded to a warning."""


class ExportError(ValueError):
    """An exported or quantized file does not reproduce its source."""


class OutputNamesError(ExportError):
    """The ONNX outputs are not the ones the source model produces."""


class ShapeError(ExportError):
    """An ONNX output has another shape than the source's."""


class AtolError(ExportError):
    """Outputs differ by more than the allowed absolute tolerance."""


class AgreementError(ExportError):
    """Top-1 predictions of the ONNX file and its source agree too rarely."""
