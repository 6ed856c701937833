"""Training augmentation, drawn anew every epoch (torchvision.transforms.v2 on uint8 tensors).

Two recipes, chosen from the training images themselves (`TrainAugment.build`):

- photos (median shorter side at least `data.SMALL_IMAGE_SIDE`, the bound `--image-size auto` uses to
  tell photos from small images; flowers-dev's photos are ~224 px, so not "at least the input size",
  which would flip the recipe on a few pixels): every image is decoded once, to a uint8 tensor whose
  shorter side is about `DECODE_MARGIN` times the input size, and kept in memory; each time a batch is
  drawn, each image gets a RandomResizedCrop to the input size, a horizontal flip and, for colour
  images only, TrivialAugmentWide or a colour jitter (`TrainConfig.photo_augment`), then the backbone's
  scale/mean/std. The decode is paid once; what costs per epoch is a crop and a resize at ~1.15x.
- small images (Fashion-MNIST's 28 px upsampled to 96, digits): a random flip and a small
  shift of the preprocessed tensor (`finetune.augment`), the recipe the demo was tuned with. A crop of
  an upsampled 28-pixel image adds no detail, and grayscale images get no colour jitter.

Determinism: v2 draws from torch's global generator, so each batch seeds it from the epoch's own
`torch.Generator` (seeded by the config's seed and the epoch) inside `torch.random.fork_rng`: the
crops depend on (seed, epoch, batch) only, a resumed run draws exactly what an uninterrupted one
would, and the global generator (dropout) is left as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from edgexfer.data import SMALL_IMAGE_SIDE
from edgexfer.runtime.metadata import Preprocessing

DECODE_MARGIN = 1.15     # decoded shorter side / input size: room for the crop, little memory
PHOTO_AUGMENTS = ("trivial", "jitter", "none")   # what colour photos get besides crop and flip
JITTER = dict(brightness=0.3, contrast=0.3, saturation=0.3)  # no hue: a flower's hue is its class


def _decode(src: Any, pp: Preprocessing, side: int) -> tuple[torch.Tensor, int, bool]:
    """(uint8 (C, H, W) with its shorter side at most `side`, the original shorter side, colour?)."""
    from PIL import Image

    from edgexfer.runtime.preprocess import _PIL_INTERP, load_image, to_8bit

    img = to_8bit(load_image(src))
    short = min(img.size)
    colour = img.mode not in ("L", "LA", "1", "I", "F") and not img.mode.startswith("I;16")
    if img.mode != pp.color:
        img = img.convert(pp.color)
    if short > side:
        s = side / short
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), _PIL_INTERP[pp.interpolation])
    a = np.array(img)  # a writable copy
    t = torch.from_numpy(a[:, :, None] if a.ndim == 2 else a).permute(2, 0, 1).contiguous()
    if colour and t.shape[0] == 3:  # an RGB file of a grey picture is grey: nothing to jitter
        colour = not (torch.equal(t[0], t[1]) and torch.equal(t[1], t[2]))
    return t, short, colour


@dataclass
class TrainAugment:
    """The training set's augmentation; `batch(idx, x, g)` returns the augmented, normalised batch."""

    kind: str                        # "photo" | "small"
    ops: list[str]
    reason: str
    images: list[torch.Tensor] = field(default_factory=list, repr=False)   # photo: decoded uint8 (C, H, W)
    pp: Preprocessing | None = field(default=None, repr=False)
    tf: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, images: list, pp: Preprocessing, photo_augment: str = "trivial",
              crop_scale: tuple[float, float] = (0.35, 1.0)) -> "TrainAugment":
        if photo_augment not in PHOTO_AUGMENTS:
            raise ValueError(f"unknown photo_augment {photo_augment!r}; choose one of {PHOTO_AUGMENTS}")
        side = max(pp.crop, round(pp.crop * DECODE_MARGIN))
        decoded = [_decode(src, pp, side) for src in images]
        if not decoded:
            return cls("small", ["none"], "no training images")
        short = int(np.median([d[1] for d in decoded]))
        colour = sum(d[2] for d in decoded) * 2 > len(decoded)
        if short < SMALL_IMAGE_SIDE:
            return cls("small", ["horizontal flip", "shift"],
                       f"the median training image's shorter side is {short} px (< {SMALL_IMAGE_SIDE}): small images, "
                       f"upsampled to {pp.crop}; a random crop of them adds no detail (flip and shift of the input)")
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import v2 as T

        # tensors resize with these three only; the others (Pillow's) come nearest as bilinear
        interp = InterpolationMode(pp.interpolation if pp.interpolation in ("nearest", "bilinear", "bicubic")
                                   else "bilinear")
        tfs = [T.RandomResizedCrop(pp.crop, scale=crop_scale, interpolation=interp, antialias=True),
               T.RandomHorizontalFlip()]
        ops = [f"RandomResizedCrop({pp.crop}, scale={tuple(crop_scale)})", "RandomHorizontalFlip"]
        if colour and photo_augment == "trivial":
            tfs.append(T.TrivialAugmentWide())  # on uint8 (posterize needs integers)
            ops.append("TrivialAugmentWide")
        tfs.append(T.ToDtype(torch.float32, scale=True))  # [0, 1]
        if colour and photo_augment == "jitter":
            tfs.append(T.ColorJitter(**JITTER))  # on floats: no uint8 round trip per op (faster)
            ops.append("ColorJitter(" + ", ".join(f"{k}={v}" for k, v in JITTER.items()) + ")")
        why = (f"photos: the median training image's shorter side is {short} px (>= {SMALL_IMAGE_SIDE}); "
               f"decoded once at shorter side {side} px, cropped anew every epoch"
               + ("" if colour else "; grey images: no colour augmentation"))
        return cls("photo", ops, why, [d[0] for d in decoded], pp, T.Compose(tfs))

    def describe(self) -> dict:
        return {"kind": self.kind, "ops": list(self.ops), "reason": self.reason}

    def batch(self, idx: torch.Tensor, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The augmented batch of training images `idx`; `x` holds their preprocessed tensors (N, C, H, W)."""
        if self.kind == "small":
            from edgexfer.finetune import augment

            return augment(x[idx], g)
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            x01 = torch.stack([self.tf(self.images[int(i)]) for i in idx])  # (B, C, crop, crop) in [0, 1]
        return normalise(x01, self.pp)


def normalise(x01: torch.Tensor, pp: Preprocessing) -> torch.Tensor:
    """float (B, C, H, W) pixels / 255 -> float32 (pixel * scale - mean) / std, as runtime.preprocess."""
    mean = torch.tensor(pp.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(pp.std, dtype=torch.float32)[:, None, None]
    return (x01.to(torch.float32) * np.float32(255 * pp.scale) - mean) / std
