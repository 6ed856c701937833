"""Image preprocessing with Pillow + numpy, numerically equal to the torchvision pipeline
``Resize(resize) -> CenterCrop(crop) -> ToTensor() -> Normalize(mean, std)`` on PIL images.

Training uses these very functions (see `edgexfer.data`), so the device sees what training saw;
`tests/test_preprocess.py` holds them against torchvision.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from edgexfer.runtime.errors import ImageError, RuntimeInputError
from edgexfer.runtime.metadata import Preprocessing

_PIL_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def load_image(src: Any) -> Image.Image:
    """Open a path, bytes, file object, PIL image or HWC/HW uint8 array as a PIL image."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise RuntimeInputError(
                f"an image array must be uint8 HxW or HxWxC (C in 1, 3, 4); got {src.dtype} {src.shape}. "
                "For an already preprocessed float tensor use EdgeModel.run()"
            )
        return Image.fromarray(src[:, :, 0] if src.ndim == 3 and src.shape[2] == 1 else src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        fp, name = io.BytesIO(bytes(src)), "<bytes>"
    elif isinstance(src, (str, os.PathLike)):
        if not Path(src).is_file():
            raise ImageError(f"image not found: {src}")
        fp, name = src, str(src)
    elif hasattr(src, "read"):
        fp, name = src, getattr(src, "name", "<file>")
    else:
        raise RuntimeInputError(f"cannot read an image from {type(src).__name__}")
    try:
        img = Image.open(fp)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode image {name}: {e}") from None
    return img


def resize_crop(img: Image.Image, pp: Preprocessing) -> Image.Image:
    """Colour conversion, shorter-side resize and centre crop (torchvision semantics)."""
    if img.mode != pp.color:
        img = img.convert(pp.color)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != pp.resize:
        new_short, new_long = pp.resize, int(pp.resize * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        img = img.resize(size, _PIL_INTERP[pp.interpolation])
    w, h = img.size
    c = pp.crop
    if (w, h) != (c, c):
        if w < c or h < c:
            raise ImageError(f"image of {w}x{h} is smaller than the crop {c}")
        top = int(round((h - c) / 2.0))
        left = int(round((w - c) / 2.0))
        img = img.crop((left, top, left + c, top + c))
    return img


def normalize(img: Image.Image, pp: Preprocessing) -> np.ndarray:
    """PIL image (already resized and cropped) -> float32 CHW, (x * scale - mean) / std."""
    a = np.asarray(img, dtype=np.float32)  # (H, W) or (H, W, C)
    if a.ndim == 2:
        a = a[:, :, None]
    a = a * np.float32(pp.scale)
    a = (a - np.asarray(pp.mean, np.float32)) / np.asarray(pp.std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))  # (C, H, W)


def preprocess(src: Any, pp: Preprocessing) -> np.ndarray:
    """One image (path, bytes, file, PIL image or uint8 array) -> float32 (C, H, W)."""
    return normalize(resize_crop(load_image(src), pp), pp)


def preprocess_batch(srcs, pp: Preprocessing) -> np.ndarray:
    """Several images -> float32 (N, C, H, W)."""
    return np.stack([preprocess(s, pp) for s in srcs])
