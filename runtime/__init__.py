"""edgexfer.runtime — the part that ships to the device.

Needs only numpy, onnxruntime and Pillow. It owns the metadata contract that every edgexfer ONNX file
carries (`metadata.py`) and the preprocessing maths (`preprocess.py`); training and export import
these definitions instead of keeping copies, so the device sees exactly what training saw.

    from edgexfer.runtime import EdgeModel
    model = EdgeModel("runs/demo/model.int8.onnx")
    model.predict("cat.jpg")   # [{'label': ..., 'index': ..., 'score': ...}, ...]
"""
from edgexfer.runtime.errors import ImageError, MetadataError, RuntimeInputError
from edgexfer.runtime.metadata import META_KEY, META_SCHEMA, ModelMeta, Preprocessing
from edgexfer.runtime.model import EdgeModel

__all__ = [
    "EdgeModel",
    "ModelMeta",
    "Preprocessing",
    "META_KEY",
    "META_SCHEMA",
    "MetadataError",
    "ImageError",
    "RuntimeInputError",
]
