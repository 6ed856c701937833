"""Model files other than ONNX, by suffix: OpenVINO IR (`.xml`, `openvino_backend`), ExecuTorch programs
(`.pte`, `executorch_backend`) and LiteRT files (`.tflite`, `litert_backend`), each opened as a session with the part of ONNX Runtime's `InferenceSession`
interface that `EdgeModel` and `edgexfer bench` use. Each runtime's package is imported only when a file of
its format is opened (the optional extras `[openvino]`, `[executorch]`, `[litert]`)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

SUFFIXES = {".xml": "openvino", ".pte": "executorch", ".tflite": "litert"}


def format_of(path) -> str | None:
    """"openvino", "executorch" or "litert" for such a file, None for ONNX (or bytes)."""
    if not isinstance(path, (str, Path)):
        return None
    return SUFFIXES.get(Path(path).suffix.lower())


def open_session(path, threads: int | None = None):
    """A session of a non-ONNX model file, with the metadata props it carries (empty when none)."""
    fmt = format_of(path)
    if fmt == "openvino":
        from edgexfer.runtime.openvino_backend import OpenVINOSession

        return OpenVINOSession(path, threads=threads)
    if fmt == "executorch":
        from edgexfer.runtime.executorch_backend import ExecuTorchSession

        return ExecuTorchSession(path, threads=threads)
    if fmt == "litert":
        from edgexfer.runtime.litert_backend import LiteRTSession

        return LiteRTSession(path, threads=threads)
    raise ValueError(f"not a non-ONNX model file: {path}")


def no_metadata(path) -> str:
    """Where a file of this format keeps edgexfer's metadata, for the one-line refusal when it has none."""
    where = {"openvino": "no 'edgexfer' rt_info", "executorch": "no 'edgexfer_meta' method",
             "litert": "no edgexfer_meta.json associated file"}[format_of(path)]
    return (f"{path} carries no edgexfer metadata ({where}); convert it with "
            f"`edgexfer export RUN --format {format_of(path)}`")


PACKAGES = {"openvino": "openvino", "executorch": "executorch", "litert": "ai-edge-litert"}  # format -> distribution


def package_version(fmt: str) -> str | None:
    """The installed version of the package that runs `fmt`'s files, None when it is not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version(PACKAGES[fmt])
    except importlib.metadata.PackageNotFoundError:
        return None


def runtime_version(path) -> str:
    fmt = format_of(path)
    return f"{fmt} {package_version(fmt) or '?'}"


class Session:
    """What every non-ONNX session shares: its input and output descriptions (`name`, `type` as ONNX Runtime spells
    it, `shape` with None for a dynamic size), the edgexfer metadata props it carries and the provider it names."""
    _inputs: list = []
    _outputs: list = []
    _props: dict = {}
    provider = "?"

    def get_inputs(self) -> list:
        return list(self._inputs)

    def get_outputs(self) -> list:
        return list(self._outputs)

    def get_modelmeta(self):
        return SimpleNamespace(custom_metadata_map=dict(self._props))

    def get_providers(self) -> list[str]:
        return [self.provider]
