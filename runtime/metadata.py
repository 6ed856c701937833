"""The metadata contract every edgexfer ONNX file carries.

One JSON document under the ONNX `metadata_props` key ``edgexfer.meta`` (versioned by its "schema"
field). Like torchvision's `Weights.meta` and timm's `pretrained_cfg`, it makes the file
self-describing: labels, input tensor, preprocessing, provenance, measured metrics and, for
quantized files, the quantization recipe. The runtime reads only this; nothing downstream guesses.

The writer side is `ModelMeta.to_props()`; `edgexfer.exporters` stores the result with onnx.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from edgexfer.runtime.errors import MetadataError

META_KEY = "edgexfer.meta"
META_SCHEMA = "edgexfer.meta/1"

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
COLOR_MODES = ("RGB", "L")


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the input tensor (torchvision semantics, computed with Pillow + numpy).

    resize: shorter side is resized to this many pixels (torchvision `Resize(int)`), keeping aspect.
    crop: centre crop to crop x crop (torchvision `CenterCrop`).
    scale, mean, std: x = (pixel * scale - mean) / std, per channel, in float32.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise MetadataError(f"unknown interpolation {self.interpolation!r}; expected one of {INTERPOLATIONS}")
        if self.color not in COLOR_MODES:
            raise MetadataError(f"unknown colour mode {self.color!r}; expected one of {COLOR_MODES}")
        channels = 3 if self.color == "RGB" else 1
        if len(self.mean) != channels or len(self.std) != channels:
            raise MetadataError(f"mean/std must have {channels} values for colour mode {self.color}")
        if self.crop > self.resize:
            raise MetadataError(f"crop ({self.crop}) larger than resize ({self.resize})")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def channels(self) -> int:
        return 3 if self.color == "RGB" else 1


@dataclass(frozen=True)
class Task:
    """One output of the model: its tensor name and its ordered class labels."""

    name: str
    output: str
    labels: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))


@dataclass(frozen=True)
class InputSpec:
    name: str
    height: int
    width: int
    channels: int = 3
    layout: str = "NCHW"
    dtype: str = "float32"


@dataclass
class ModelMeta:
    tasks: list[Task]
    input: InputSpec
    preprocessing: Preprocessing
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None
    schema: str = META_SCHEMA

    # -- convenience -------------------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        """Labels of the first (for single-task models, the only) task."""
        return self.tasks[0].labels

    # -- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)  # flat copy for readers that only want the class names
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_props(self) -> dict[str, str]:
        """The ONNX metadata_props entries that carry this metadata."""
        return {META_KEY: self.to_json()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        schema = d.get("schema")
        if schema != META_SCHEMA:
            raise MetadataError(f"unsupported edgexfer metadata schema {schema!r} (this runtime reads {META_SCHEMA})")
        try:
            return cls(
                tasks=[Task(**t) for t in d["tasks"]],
                input=InputSpec(**d["input"]),
                preprocessing=Preprocessing(**d["preprocessing"]),
                provenance=dict(d.get("provenance") or {}),
                metrics=dict(d.get("metrics") or {}),
                quantization=d.get("quantization"),
                schema=schema,
            )
        except (KeyError, TypeError) as e:
            raise MetadataError(f"malformed edgexfer metadata: {e}") from None

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> "ModelMeta":
        raw = props.get(META_KEY)
        if raw is None:
            raise MetadataError(
                f"{source} carries no edgexfer metadata (no '{META_KEY}' in its ONNX metadata_props); "
                "export it with `edgexfer export`"
            )
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{source}: edgexfer metadata is not valid JSON ({e})") from None
        return cls.from_dict(d)
