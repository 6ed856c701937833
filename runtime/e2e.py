"""The end-to-end file (``model.e2e.onnx``: decoded uint8 image in, probabilities out; built by
`edgexfer.exporters.e2e`) read with ONNX Runtime alone: its names, whether it is current with its
source file, and how an image array is fed to it. Needs numpy, onnxruntime and Pillow only."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from edgexfer.runtime.metadata import META_KEY, ModelMeta
from edgexfer.runtime.preprocess import to_8bit

E2E_KEY = "edgexfer.e2e"
E2E_SCHEMA = "edgexfer.e2e/1"
LABELS_KEY = "labels"
INPUT_NAME = "image"
SUFFIX = ".e2e.onnx"


def e2e_path(path: str | Path) -> Path:
    """model.onnx -> model.e2e.onnx; model.int8.onnx -> model.int8.e2e.onnx."""
    p = Path(path)
    name = p.name[:-len(".onnx")] if p.name.endswith(".onnx") else p.name
    return p.with_name(name + SUFFIX)


def is_e2e(path: str | Path) -> bool:
    """An end-to-end file by its name (model files found in a folder leave these out: they take images,
    not the preprocessed tensor)."""
    return Path(path).name.endswith(SUFFIX)


def meta_key(meta_json: str) -> str:
    """sha256 of a file's edgexfer metadata less its metrics (canonical JSON). The end-to-end file
    records its source's as ``source_meta_sha256``; comparing the two tells a current end-to-end file from
    a stale one with ONNX Runtime alone. The metadata names the checkpoint and the export time
    (provenance) and, for a quantized file, its recipe, so a re-export or re-quantization changes it;
    `evaluate` writing a file's metrics does not."""
    d = ModelMeta.from_props({META_KEY: meta_json}).to_dict()
    d.pop("metrics", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def contract(props: dict[str, str]) -> dict | None:
    """The end-to-end contract in a file's metadata map, or None when it is no end-to-end file."""
    raw = props.get(E2E_KEY)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
    except ValueError:
        return None
    return d if isinstance(d, dict) and d.get("schema") == E2E_SCHEMA else None


def image_array(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as the end-to-end input: uint8 HWC, 3 channels (RGB) or 1 (grey). Other
    modes are converted as the Python preprocessing converts them (16-bit and float scaled by depth)."""
    if img.mode not in ("RGB", "L"):
        img = to_8bit(img)
        if img.mode not in ("RGB", "L"):
            img = img.convert("RGB")
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a
