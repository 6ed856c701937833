"""Every augmentation edgexfer draws, in one module.

- `TrainAugment`: fine-tuning's, drawn anew every epoch (below);
- `flip_shift`: the small-image recipe (a flip and a shift of the preprocessed tensor), which
  `TrainAugment` applies to small images and QAT to its batches;
- `probe_view`: the cross-validated linear probe's augmented views (`edgexfer.probe`);
- `crop_flip_views`: the INT8 guard's seeded views of labelled images (`edgexfer.guard`), through the
  run's own preprocessing.

All of them crop with the same random resized crop (`crop_and_flip` for torchvision's; `CROP_AREA` of the
area) and a horizontal flip; each keeps its own seeding, so each draws what it drew before they shared
this module.

Fine-tuning's two recipes (torchvision.transforms.v2 on uint8 tensors), chosen from the training images
themselves (`TrainAugment.build`):

- photos (median shorter side at least `data.SMALL_IMAGE_SIDE`, the bound `--image-size auto` uses to
  tell photos from small images; flowers-dev's photos are ~224 px, so not "at least the input size",
  which would flip the recipe on a few pixels): every image is decoded once, to a uint8 tensor whose
  shorter side is about `DECODE_MARGIN` times the input size, and kept in memory; each time a batch is
  drawn, each image gets a RandomResizedCrop to the input size, a horizontal flip and, for colour
  images only, TrivialAugmentWide or a colour jitter (`TrainConfig.photo_augment`), then the backbone's
  scale/mean/std. The decode is paid once; what costs per epoch is a crop and a resize at ~1.15x.
- small images (Fashion-MNIST's 28 px upsampled to 96, digits): a random flip and a small
  shift of the preprocessed tensor (`flip_shift`), the recipe the demo was tuned with. A crop of
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

from edgexfer.config import PHOTO_AUGMENTS  # noqa: F401  (what colour photos get besides crop and flip)
from edgexfer.data import SMALL_IMAGE_SIDE
from edgexfer.runtime.metadata import Preprocessing

DECODE_MARGIN = 1.15     # decoded shorter side / input size: room for the crop, little memory
CROP_AREA = (0.35, 1.0)   # the probe's and the guard's random resized crop: fraction of the image's area
CROP_ASPECT = (3 / 4, 4 / 3)  # and its aspect ratio (torchvision's default)
PROBE_JITTER = (0.2, 0.2, 0.2)  # the probe's views: ColorJitter's brightness, contrast, saturation (colour only)
JITTER = dict(brightness=0.3, contrast=0.3, saturation=0.3)  # no hue: a flower's hue is its class


def _open(src: Any):
    """The image at `src` as an 8-bit PIL image (`runtime.preprocess`'s decoding)."""
    from edgexfer.runtime.preprocess import load_image, to_8bit

    return to_8bit(load_image(src))


def _shrink(img, side: int, resample):
    """`img` resized so that its shorter side is `side` when it is longer; else as it is."""
    short = min(img.size)
    if short > side:
        s = side / short
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), resample)
    return img


def crop_and_flip(size: int, scale: tuple[float, float], interpolation: Any = None) -> list:
    """torchvision v2's RandomResizedCrop to `size` (`scale` of the area, aspect 3/4-4/3) and a horizontal flip
    half of the time: the crop fine-tuning and the probe's views share (interpolation: bilinear by default)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    return [T.RandomResizedCrop(size, scale=scale, interpolation=interpolation or InterpolationMode.BILINEAR,
                                antialias=True), T.RandomHorizontalFlip()]


def _decode(src: Any, pp: Preprocessing, side: int) -> tuple[torch.Tensor, int, bool]:
    """(uint8 (C, H, W) with its shorter side at most `side`, the original shorter side, colour?)."""
    from edgexfer.runtime.preprocess import _PIL_INTERP

    img = _open(src)
    short = min(img.size)
    colour = img.mode not in ("L", "LA", "1", "I", "F") and not img.mode.startswith("I;16")
    if img.mode != pp.color:
        img = img.convert(pp.color)
    img = _shrink(img, side, _PIL_INTERP[pp.interpolation])
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
        tfs = crop_and_flip(pp.crop, crop_scale, interp)
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
            return flip_shift(x[idx], g)
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


def flip_shift(x: torch.Tensor, g: torch.Generator, pad_frac: float = 0.08) -> torch.Tensor:
    """Small-image augmentation on a normalized batch: random horizontal flip and random shift (what
    `TrainAugment` applies to small images, e.g. Fashion-MNIST upsampled; photos get crops)."""
    import torch.nn.functional as F

    b, _, h, w = x.shape
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    p = max(1, int(round(pad_frac * h)))
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
    return torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def probe_view(images: list, pp: Preprocessing, view: int, seed: int) -> torch.Tensor:
    """One augmented view of every image of `images` as the model's input (N, C, H, W): a random resized
    crop (`CROP_AREA` of the area) at the input size, a horizontal flip, and for colour images a mild colour
    jitter (torchvision.transforms.v2), seeded by (seed, view). What the probe sees besides the centre crop:
    a few views per image are cheap more data when labels are few (the features are computed once). Drawn
    inside `torch.random.fork_rng`: the global generator is left as it was."""
    from PIL import Image
    from torchvision.transforms import v2 as T

    ops = crop_and_flip(pp.crop, CROP_AREA)
    if pp.color == "RGB":
        ops.append(T.ColorJitter(*PROBE_JITTER))
    tf = T.Compose([*ops, T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(pp.mean, pp.std)])
    side = max(pp.crop * 3 // 2, 1)  # decode once, then crop from a modest size: the crop is resized anyway
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + view)
        for src in images:
            img = _open(src)
            img = img.convert(pp.color) if img.mode != pp.color else img
            out.append(tf(_shrink(img, side, Image.BILINEAR)))
    return torch.stack(out)


def crop_flip_views(images: list, pp: Preprocessing, n: int, seed: int):
    """Yield `n` augmented views (C, H, W) float32 of `images` (paths or uint8 arrays), spread evenly over
    them in order (`views_origin`), each image decoded once: a random resized crop (`CROP_AREA` of the area,
    aspect `CROP_ASPECT`) and a horizontal flip half of the time, drawn from numpy's generator seeded by
    `seed`, then the run's own preprocessing (`resize_crop`, `normalize`). The INT8 guard's views."""
    from PIL import Image

    from edgexfer.runtime.preprocess import load_image, normalize, resize_crop

    rng = np.random.default_rng(seed)
    m = len(images)
    for i, src in enumerate(images):
        count = n // m + (i < n % m)
        if not count:
            continue
        img = load_image(src)
        img.load()
        w, h = img.size
        for _ in range(count):
            area = w * h * rng.uniform(*CROP_AREA)
            aspect = np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1])))
            cw = int(round(min(w, max(1, np.sqrt(area * aspect)))))
            ch = int(round(min(h, max(1, np.sqrt(area / aspect)))))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            view = img.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            yield normalize(resize_crop(view, pp), pp)


def views_origin(n: int, m: int) -> np.ndarray:
    """Which of `m` images each of `n` views from `crop_flip_views` shows (it spreads them evenly, in order)."""
    return np.repeat(np.arange(m), [n // m + (i < n % m) for i in range(m)]) if m else np.zeros(0, np.int64)


def describe_crop_flip_views(of: str, seed: int) -> str:
    """What `crop_flip_views` does, in words (the guard's record): views of the `of` images."""
    return (f"random resized crop ({CROP_AREA[0]:.0%}-{CROP_AREA[1]:.0%} of the area, aspect {CROP_ASPECT[0]:.2f}-"
            f"{CROP_ASPECT[1]:.2f}) and horizontal flip of the {of} images, seed {seed}, through the run's preprocessing")
