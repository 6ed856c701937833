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
import math
from dataclasses import dataclass, field
from typing import Any

from edgexfer.runtime.errors import MetadataError
from edgexfer.runtime.labels import refusal

META_KEY = "edgexfer.meta"
META_SCHEMA = "edgexfer.meta/1"

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
COLOR_MODES = ("RGB", "L")
MAX_SIDE = 4096  # the largest resize, crop, input height or width a reader accepts


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
        """The metadata of a file, checked: every field of the right type and within bounds, and the
        input tensor what the preprocessing makes (a model that loads can be served). `MetadataError`,
        one line, otherwise."""
        if not isinstance(d, dict):
            raise MetadataError(f"malformed edgexfer metadata: a JSON object expected, got {type(d).__name__}")
        schema = d.get("schema")
        if schema != META_SCHEMA:
            raise MetadataError(f"unsupported edgexfer metadata schema {schema!r} (this runtime reads {META_SCHEMA})")
        try:
            check_dict(d)
            meta = cls(
                tasks=[Task(**t) for t in d["tasks"]],
                input=InputSpec(**d["input"]),
                preprocessing=Preprocessing(**d["preprocessing"]),
                provenance=_finite(dict(d.get("provenance") or {})),
                metrics=_finite(dict(d.get("metrics") or {})),
                quantization=_finite(d.get("quantization")),
                schema=schema,
            )
        except (KeyError, TypeError, ValueError) as e:  # MetadataError is a ValueError
            if isinstance(e, MetadataError):
                raise
            raise MetadataError(f"malformed edgexfer metadata: {_one_line(e)}") from None
        i, pp = meta.input, meta.preprocessing
        if (i.channels, i.height, i.width) != (pp.channels, pp.crop, pp.crop):
            raise MetadataError(f"edgexfer metadata: the input is {i.channels}x{i.height}x{i.width} but the "
                                f"preprocessing makes {pp.channels}x{pp.crop}x{pp.crop}")
        return meta

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
        except RecursionError:
            raise MetadataError(f"{source}: edgexfer metadata is nested too deeply") from None
        try:
            return cls.from_dict(d)
        except MetadataError as e:
            raise MetadataError(f"{source}: {e}") from None


def _one_line(e: BaseException) -> str:
    s = str(e)
    return (s.splitlines()[0] if s else type(e).__name__)[:300]


def _finite(v):
    """A JSON value with NaN and infinities (which JSON cannot carry) replaced by None."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _int(v, what: str, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise MetadataError(f"malformed edgexfer metadata: {what} must be an integer in {lo}..{hi}, got {v!r}")


def _numbers(v, what: str, n: int, positive: bool = False) -> None:
    ok = isinstance(v, (list, tuple)) and len(v) == n and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
        for x in v)
    if not ok:
        raise MetadataError(f"malformed edgexfer metadata: {what} must be {n} finite{' positive' if positive else ''} "
                            f"numbers, got {str(v)[:100]}")


def check_dict(d: dict) -> None:
    """Types and bounds of a metadata document (as JSON), before it becomes a ModelMeta."""
    def obj(v, what):
        if not isinstance(v, dict):
            raise MetadataError(f"malformed edgexfer metadata: {what} must be a JSON object, got {str(v)[:100]}")
        return v

    def text(v, what):
        if not isinstance(v, str) or not v:
            raise MetadataError(f"malformed edgexfer metadata: {what} must be a non-empty string, got {str(v)[:100]}")

    tasks = d.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise MetadataError(f"malformed edgexfer metadata: tasks must be a non-empty list, got {str(tasks)[:100]}")
    for k, t in enumerate(tasks):
        obj(t, f"tasks[{k}]")
        text(t.get("name"), f"tasks[{k}].name")
        text(t.get("output"), f"tasks[{k}].output")
        labels = t.get("labels")
        if (not isinstance(labels, list) or not labels
                or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in labels)):
            raise MetadataError(f"malformed edgexfer metadata: tasks[{k}].labels must be a non-empty list of names, "
                                f"got {str(labels)[:100]}")
        for j, x in enumerate(labels):  # each format that lists labels one per line must read them back
            why = refusal(str(x))
            if why:
                raise MetadataError(f"malformed edgexfer metadata: tasks[{k}].labels[{j}] {why}"[:300])
    for key in ("name", "output"):
        values = [t[key] for t in tasks]
        if len(set(values)) != len(values):
            raise MetadataError(f"malformed edgexfer metadata: two tasks with the same {key}")
    i = obj(d.get("input"), "input")
    text(i.get("name"), "input.name")
    _int(i.get("height"), "input.height", 1, MAX_SIDE)
    _int(i.get("width"), "input.width", 1, MAX_SIDE)
    _int(i.get("channels", 3), "input.channels", 1, 3)
    if i.get("layout", "NCHW") != "NCHW" or i.get("dtype", "float32") != "float32":
        raise MetadataError("malformed edgexfer metadata: the input must be NCHW float32")
    p = obj(d.get("preprocessing"), "preprocessing")
    _int(p.get("resize"), "preprocessing.resize", 1, MAX_SIDE)
    _int(p.get("crop"), "preprocessing.crop", 1, MAX_SIDE)
    for key in ("interpolation", "color"):
        if key in p and not isinstance(p[key], str):
            raise MetadataError(f"malformed edgexfer metadata: preprocessing.{key} must be a string")
    channels = 1 if p.get("color") == "L" else 3
    _numbers([p.get("scale", 1.0)], "preprocessing.scale", 1, positive=True)
    _numbers(p.get("mean", [0.0] * channels), "preprocessing.mean", channels)
    _numbers(p.get("std", [1.0] * channels), "preprocessing.std", channels, positive=True)
    for key in ("provenance", "metrics", "quantization"):
        if d.get(key) is not None:
            obj(d[key], key)
