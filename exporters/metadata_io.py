"""Read and write the runtime's metadata contract inside ONNX files (with the onnx package)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx

from edgexfer.runtime import atomic
from edgexfer.runtime.metadata import META_KEY, ModelMeta


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


def content_sha256(path: str | Path) -> str:
    """sha256 of an ONNX file less its measured metrics: the graph, the weights and every metadata entry
    (edgexfer's without `metrics`), serialized canonically (entries sorted by key, edgexfer's metadata as
    the runtime reads it, JSON with sorted keys, deterministic protobuf).

    A derived file (INT8, FP16, dynamic) records this hash of its source as `source_content_sha256`, not
    the hash of the source's bytes: `evaluate` writes each file's own metrics into it after the derived
    files were made, which changes the source's bytes but not what they were derived from. Anything else
    changed in the source (a re-export, other labels or preprocessing) changes this hash."""
    m = onnx.load(str(path), load_external_data=False)
    props = sorted((p.key, p.value) for p in m.metadata_props)
    del m.metadata_props[:]
    for key, value in props:
        if key == META_KEY:
            try:  # as the runtime reads it (defaults filled in), so a rewrite by this version hashes the same
                d = ModelMeta.from_props({key: value}, str(path)).to_dict()
            except ValueError:  # MetadataError: not ours to judge here; hash its JSON as it is
                try:
                    d = json.loads(value)
                except ValueError:
                    d = None
            if isinstance(d, dict):
                d.pop("metrics", None)
                value = json.dumps(d, sort_keys=True, separators=(",", ":"))
        m.metadata_props.add(key=key, value=value)
    return hashlib.sha256(m.SerializeToString(deterministic=True)).hexdigest()
