"""edgexfer.exporters — ONNX export with parity validation, metadata embedding, and quantizers.

Depends on `edgexfer.runtime` for the metadata contract and preprocessing; never the other way.
"""
from edgexfer.exporters.errors import AgreementError, AtolError, ExportError, OutputNamesError, ShapeError
from edgexfer.exporters.metadata_io import read_meta, write_meta

__all__ = ["ExportError", "ShapeError", "AtolError", "AgreementError", "OutputNamesError", "read_meta", "write_meta"]
