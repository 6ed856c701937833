"""The runtime's Pillow + numpy preprocessing equals torchvision's pipeline (the one users know)."""
import zlib

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime.metadata import Preprocessing
from edgexfer.runtime.preprocess import preprocess

torch = pytest.importorskip("torch")
T = pytest.importorskip("torchvision.transforms")


def torchvision_pipeline(pp: Preprocessing):
    interp = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
              "nearest": T.InterpolationMode.NEAREST}[pp.interpolation]
    return T.Compose([T.Lambda(lambda im: im.convert(pp.color)), T.Resize(pp.resize, interpolation=interp),
                      T.CenterCrop(pp.crop), T.ToTensor(), T.Normalize(pp.mean, pp.std)])


@pytest.mark.parametrize("size", [(28, 28), (64, 48), (37, 91), (300, 200), (224, 224)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
@pytest.mark.parametrize("pp", [
    Preprocessing(resize=96, crop=96, mean=(0.498,) * 3, std=(0.502,) * 3),
    Preprocessing(resize=256, crop=224, interpolation="bicubic"),
    Preprocessing(resize=40, crop=32, interpolation="nearest"),
])
def test_matches_torchvision(size, mode, pp):
    # crc32, not hash(): str hashes change per process (PYTHONHASHSEED), so each run would test other pixels
    rng = np.random.default_rng(zlib.crc32(f"{size}-{mode}".encode()))
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(a[:, :, 0] if channels == 1 else a, mode)
    ours = preprocess(img, pp)
    ref = torchvision_pipeline(pp)(img).numpy()
    assert ours.shape == ref.shape == (3, pp.crop, pp.crop)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_sources_agree(tmp_path):
    """Path, bytes, PIL image and uint8 array of the same picture give the same tensor."""
    pp = Preprocessing(resize=32, crop=32)
    a = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    p = tmp_path / "x.png"
    Image.fromarray(a).save(p)
    outs = [preprocess(s, pp) for s in (p, str(p), p.read_bytes(), Image.fromarray(a), a)]
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
