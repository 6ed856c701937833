"""Fine-tuning's augmentation (edgexfer/augment.py): photos get a random resized crop, a flip and colour
augmentation drawn anew every epoch from the seed; small or grey images get no colour jitter; a resumed
run draws what an uninterrupted one would."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgexfer.augment import TrainAugment, flip_shift
from edgexfer.finetune import TrainConfig
from edgexfer.runtime.metadata import Preprocessing
from edgexfer.runtime.preprocess import preprocess

PP = Preprocessing(resize=64, crop=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def photos(n=6, size=(96, 80), grey=False, seed=0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        out.append(Image.fromarray(a[:, :, 0]) if grey else Image.fromarray(a))
    return out


def epoch_gen(epoch: int, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100003 + epoch)  # as finetune.train seeds each epoch


def test_photos_are_cropped_anew_every_epoch_and_deterministically():
    aug = TrainAugment.build(photos(), PP)
    assert aug.kind == "photo" and "RandomResizedCrop" in aug.ops[0] and "TrivialAugmentWide" in aug.ops
    assert TrainConfig().photo_augment == "trivial"
    idx = torch.tensor([3, 0, 5])
    e1, e2, e1_again = (aug.batch(idx, None, epoch_gen(e)) for e in (1, 2, 1))
    assert e1.shape == (3, 3, 64, 64) and e1.dtype == torch.float32
    assert not torch.allclose(e1, e2)             # a new crop of the same images next epoch
    assert torch.equal(e1, e1_again)              # and the same one again under the same seed and epoch
    assert not torch.equal(aug.batch(idx, None, epoch_gen(1, seed=1)), e1)
    state = torch.random.get_rng_state()
    aug.batch(idx, None, epoch_gen(3))
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator (dropout) is untouched


def test_photo_batch_is_normalised_like_the_runtime():
    """With the whole image as the crop (scale 1, a square image of the input size) and no colour op, the
    batch is the runtime's preprocessing of the image, or of its mirror image."""
    img = photos(1, size=(64, 64))[0]
    aug = TrainAugment.build([img], PP, "none", (1.0, 1.0))
    ref = torch.from_numpy(preprocess(img, PP))
    for e in range(1, 7):
        x = aug.batch(torch.tensor([0]), None, epoch_gen(e))[0]
        assert torch.allclose(x, ref, atol=1e-5) or torch.allclose(x, ref.flip(2), atol=1e-5)


@pytest.mark.parametrize("kind", ["jitter", "trivial"])
def test_grey_photos_get_no_colour_augmentation(kind):
    """Grey photos (an 'L' file, or an RGB file whose channels are equal) get the crop and the flip only."""
    for imgs in (photos(grey=True), [im.convert("RGB") for im in photos(grey=True)]):
        aug, plain = TrainAugment.build(imgs, PP, kind), TrainAugment.build(imgs, PP, "none")
        assert aug.kind == "photo" and not any("Jitter" in o or "Trivial" in o for o in aug.ops)
        idx = torch.arange(len(imgs))
        assert torch.equal(aug.batch(idx, None, epoch_gen(1)), plain.batch(idx, None, epoch_gen(1)))
    colour = TrainAugment.build(photos(), PP, kind)
    assert any("Jitter" in o or "Trivial" in o for o in colour.ops)


def test_small_images_keep_flip_and_shift():
    """Fashion-MNIST-like 28 px grey arrays, upsampled to the input: the demo's flip and shift of the
    preprocessed tensor, drawn from the same generator as before (no crop, no colour)."""
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(5)]
    pp = Preprocessing(resize=96, crop=96)
    aug = TrainAugment.build(imgs, pp, "jitter")
    assert aug.kind == "small" and aug.ops == ["horizontal flip", "shift"] and not aug.images
    x = torch.from_numpy(np.stack([preprocess(a, pp) for a in imgs]))
    idx = torch.tensor([4, 1, 2])
    assert torch.equal(aug.batch(idx, x, epoch_gen(1)), flip_shift(x[idx], epoch_gen(1)))


def test_config_rejects_unknown_recipes():
    with pytest.raises(ValueError, match="photo_augment"):
        TrainConfig(photo_augment="mixup")
    with pytest.raises(ValueError, match="crop_scale"):
        TrainConfig(crop_scale=0)


@pytest.mark.slow
def test_resumed_training_draws_the_crops_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """train() on photos: killed during epoch 2 and run again, it resumes after epoch 1 and its epoch-2
    batches are those of a run that was never interrupted; the result says which augmentation ran."""
    from edgexfer.data import Dataset, Split
    from edgexfer.finetune import train
    from edgexfer.model import build_model, model_config, preprocessing_of

    rng = np.random.default_rng(0)
    classes = ["a", "b"]
    imgs = [Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)) for _ in range(12)]
    labels = np.array([0, 1] * 6)
    ds = Dataset("synthetic", classes, Split(imgs[:8], labels[:8]), Split(imgs[8:], labels[8:]),
                 Split(imgs[8:], labels[8:]))
    mcfg = model_config(backbone="efficientnet_lite0", weights="imagenet", image_size=32, tasks=ds.tasks)
    cfg = TrainConfig(strategy="finetune", epochs=2, batch_size=4, patience=9, calibrate=False)

    drawn, real_batch = [], TrainAugment.batch

    def recording(self, idx, x, g):
        out = real_batch(self, idx, x, g)
        drawn.append(out)
        if len(drawn) == stop_at:
            raise KeyboardInterrupt  # killed mid-epoch
        return out

    monkeypatch.setattr(TrainAugment, "batch", recording)
    stop_at = -1
    res = train(build_model(mcfg), ds, preprocessing_of(mcfg), cfg, tmp_path / "a")
    assert res.augmentation["kind"] == "photo" and res.resumed_after_epoch is None
    full = list(drawn)
    assert len(full) == 4 and not torch.allclose(full[0], full[2])  # 2 steps an epoch; epochs differ

    drawn.clear()
    stop_at = 3  # the first batch of epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(build_model(mcfg), ds, preprocessing_of(mcfg), cfg, tmp_path / "b")
    drawn.clear()
    stop_at = -1
    res = train(build_model(mcfg), ds, preprocessing_of(mcfg), cfg, tmp_path / "b")
    assert res.resumed_after_epoch == 1 and [h["epoch"] for h in res.history] == [1, 2]
    assert len(drawn) == 2 and all(torch.equal(a, b) for a, b in zip(drawn, full[2:]))
