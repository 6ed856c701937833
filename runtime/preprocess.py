"""Image preprocessing with Pillow + numpy, numerically equal to the torchvision pipeline
``Resize(resize) -> CenterCrop(crop) -> ToTensor() -> Normalize(mean, std)`` on PIL images.

Training uses these very functions (see `edgexfer.data`), so the device sees what training saw;
`tests/test_preprocess.py` holds them against torchvision.

Untrusted images (`EdgeModel`, hence `predict` and both servers) are bounded by `ImageLimits`: the
size in an image's header is checked before its pixels are decoded (at most `max_pixels` decoded
pixels, `ImageTooLarge`; a longer side at most `max_aspect` times the shorter, `ImageError`), and the
resized image before it is made. 16-bit and float images are scaled to 8 bits by their depth, not
clipped.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgexfer.runtime.errors import ImageError, ImageTooLarge, RuntimeInputError
from edgexfer.runtime.metadata import Preprocessing

_PIL_INTERP = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


MAX_IMAGE_PIXELS = 40_000_000  # decoded pixels of one image (a 48 MP photo is 192 MB as RGB)
MAX_ASPECT_RATIO = 20.0        # longer side / shorter side


@dataclass(frozen=True)
class ImageLimits:
    """What one untrusted image may cost: decoded pixels (width x height, also after the resize) and the
    ratio of its longer side to its shorter side (a 1x40000 image resizes to millions of pixels)."""

    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect: float = MAX_ASPECT_RATIO

    def check(self, w: int, h: int, name: str = "image") -> None:
        if w < 1 or h < 1:
            raise ImageError(f"{name} has no pixels ({w}x{h})")
        if w * h > self.max_pixels:
            raise ImageTooLarge(f"{name} of {w}x{h} = {w * h} pixels is over the limit of {self.max_pixels} "
                                "pixels (--max-image-pixels)")
        if max(w, h) > self.max_aspect * min(w, h):
            raise ImageError(f"{name} of {w}x{h} pixels has an aspect ratio over {self.max_aspect:g}:1 "
                             "(--max-aspect-ratio)")


def _reason(e: Exception) -> str:
    """Pillow's message without the address of the in-memory file it names (`<_io.BytesIO object at 0x...>`),
    so that the same bad bytes get the same answer."""
    return re.sub(r"<[\w.]+ object at 0x[0-9a-fA-F]+>", "the data", str(e))


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files (by suffix) in `folder` and its subfolders, sorted; hidden files and folders left out."""
    root = Path(folder)
    return sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(root).parts) and f.is_file())


def load_image(src: Any, limits: ImageLimits | None = None) -> Image.Image:
    """Open a path, bytes, file object, PIL image or HWC/HW uint8 array as a PIL image. With `limits`,
    the size in the header is checked before the pixels are decoded. Anything Pillow cannot decode,
    including its decompression-bomb refusal, is an `ImageError`."""
    if isinstance(src, Image.Image):
        if limits is not None:
            limits.check(*src.size)
        return src
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise RuntimeInputError(
                f"an image array must be uint8 HxW or HxWxC (C in 1, 3, 4); got {src.dtype} {src.shape}. "
                "For an already preprocessed float tensor use EdgeModel.run()"
            )
        if limits is not None:
            limits.check(src.shape[1], src.shape[0])
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
        img = Image.open(fp)  # reads the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image {name} is too large to decode: {e}") from None
    except Exception as e:  # untrusted bytes: whatever Pillow raises, the image cannot be read
        raise ImageError(f"cannot decode image {name}: {_reason(e)}") from None
    try:
        if limits is not None:
            limits.check(*img.size, name=f"image {name}")
        img.load()
    except ImageError:
        img.close()
        raise
    except Image.DecompressionBombError as e:
        img.close()
        raise ImageTooLarge(f"image {name} is too large to decode: {e}") from None
    except Exception as e:
        img.close()
        raise ImageError(f"cannot decode image {name}: {_reason(e)}") from None
    return img


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image as 8-bit 'L', scaled by its depth (Pillow's own
    conversion clips: a 16-bit image turns white). 'I;16*': /257. 'I': as is when within 0..255,
    else as 16-bit. 'F': 0..1 scaled by 255, within 0..255 as is, else as 16-bit. Other modes unchanged."""
    mode = img.mode
    if not (mode.startswith("I") or mode == "F"):
        return img
    a = np.asarray(img)
    if mode.startswith("I;16"):
        a = a.astype(np.uint32)
    else:
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1.0:
            return Image.fromarray(np.rint(a * 255.0).astype(np.uint8))
        if lo >= 0 and hi <= 255:
            return Image.fromarray(np.rint(a).astype(np.uint8))
        a = np.rint(np.clip(a, 0, 65535)).astype(np.uint32)
    return Image.fromarray(((a + 128) // 257).astype(np.uint8))


def resize_crop(img: Image.Image, pp: Preprocessing, limits: ImageLimits | None = None) -> Image.Image:
    """Colour conversion, shorter-side resize and centre crop (torchvision semantics). With `limits`,
    the resized image must fit them too."""
    if img.mode != pp.color:
        img = to_8bit(img)
        if img.mode != pp.color:
            img = img.convert(pp.color)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short != pp.resize:
        new_short, new_long = pp.resize, int(pp.resize * long / short)
        if limits is not None and new_short * new_long > limits.max_pixels:
            raise ImageTooLarge(f"image of {w}x{h} pixels resizes to {new_short}x{new_long}, over the limit of "
                                f"{limits.max_pixels} pixels (--max-image-pixels)")
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


def preprocess(src: Any, pp: Preprocessing, limits: ImageLimits | None = None) -> np.ndarray:
    """One image (path, bytes, file, PIL image or uint8 array) -> float32 (C, H, W). `limits` bound
    what an untrusted image may cost (`EdgeModel` passes its own); without them only Pillow's
    decompression-bomb check applies (training on one's own images)."""
    return normalize(resize_crop(load_image(src, limits), pp, limits), pp)


def preprocess_batch(srcs, pp: Preprocessing, limits: ImageLimits | None = None) -> np.ndarray:
    """Several images -> float32 (N, C, H, W)."""
    return np.stack([preprocess(s, pp, limits) for s in srcs])
