"""Read and write the runtime's metadata contract inside ONNX files (with the onnx package)."""
from __future__ import annotations

from pathlib import Path

import onnx

from edgexfer.runtime import atomic
from edgexfer.runtime.metadata import ModelMeta


def read_meta(path: str | Path) -> ModelMeta:
    m = onnx.load(str(path), load_external_data=False)
    return ModelMeta.from_props({p.key: p.value for p in m.metadata_props}, str(path))


def set_props(model: onnx.ModelProto, meta: ModelMeta) -> onnx.ModelProto:
    props = meta.to_props()
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    return model


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Save as one self-contained file, atomically."""
    with atomic.atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp))


def write_meta(path: str | Path, meta: ModelMeta, out: str | Path | None = None) -> None:
    """Store `meta` in the ONNX file at `path` (or a copy at `out`)."""
    m = onnx.load(str(path))
    save_model(set_props(m, meta), out or path)
