"""Typed errors of the runtime. Each is a ValueError, so callers can catch user mistakes in one place."""


class MetadataError(ValueError):
    """The ONNX file carries no edgexfer metadata, or metadata this version cannot read."""


class ImageError(ValueError):
    """An image could not be read or decoded."""


class ImageTooLarge(ImageError):
    """An image whose decoded size is over the configured limit (HTTP 413)."""


class RuntimeInputError(ValueError):
    """An input of the wrong type, shape or dtype was given to the model."""


class ModelFileError(ValueError):
    """A file that is not a readable ONNX model: empty, truncated, not ONNX, or pointing outside its folder."""
