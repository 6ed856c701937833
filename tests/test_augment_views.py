"""One augmentation module (issue 25 item 7): the INT8 guard's seeded crop-and-flip views, QAT's flip and shift
and the probe's views are edgexfer.augment's. (When they moved here, each was compared with the copy it replaced
at 4dbca5a, draw for draw: the same tensors, bit for bit.)"""
from __future__ import annotations

import numpy as np
import torch

from edgexfer import augment
from edgexfer.runtime.metadata import Preprocessing
from edgexfer.runtime.preprocess import preprocess

PP = Preprocessing(resize=40, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def _images(n=5, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (int(rng.integers(36, 90)), int(rng.integers(36, 90)), 3), dtype=np.uint8)
            for _ in range(n)]


def test_crop_flip_views_are_seeded_and_spread_evenly():
    imgs = _images()
    a = np.stack(list(augment.crop_flip_views(imgs, PP, 12, seed=3)))
    assert a.shape == (12, 3, 32, 32) and a.dtype == np.float32
    np.testing.assert_array_equal(a, np.stack(list(augment.crop_flip_views(imgs, PP, 12, seed=3))))
    assert not np.array_equal(a, np.stack(list(augment.crop_flip_views(imgs, PP, 12, seed=4))))
    assert augment.views_origin(12, 5).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert augment.views_origin(0, 0).tolist() == []
    # a view is a crop of its own image: the whole image (the crop can reach it) is within the same preprocessing
    assert all(np.isfinite(v).all() for v in a)
    assert "35%-100% of the area" in augment.describe_crop_flip_views("labelled", 3)


def test_flip_shift_is_seeded_by_its_generator_and_keeps_the_shape():
    x = torch.randn(6, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    a = augment.flip_shift(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape
    assert torch.equal(a, augment.flip_shift(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment.flip_shift(x, torch.Generator().manual_seed(2)))


def test_probe_view_at_full_scale_is_the_image_or_its_mirror(monkeypatch):
    """The probe's crop is the shared `crop_and_flip`: with the whole image as the crop and no jitter, a view is
    the runtime's preprocessing of a square image of the input size, or of its mirror image."""
    monkeypatch.setattr(augment, "CROP_AREA", (1.0, 1.0))
    monkeypatch.setattr(augment, "PROBE_JITTER", (0.0, 0.0, 0.0))
    img = _images(1)[0][:32, :32]
    pp = Preprocessing(resize=32, crop=32, mean=PP.mean, std=PP.std)
    ref = torch.from_numpy(preprocess(img, pp))
    for v in range(4):
        x = augment.probe_view([img], pp, v, seed=0)[0]
        assert torch.allclose(x, ref, atol=1e-5) or torch.allclose(x, ref.flip(2), atol=1e-5)
