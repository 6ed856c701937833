"""Defaults for a user's own photos (issue 12 items 1 and 5): the input size fits the images, every
labelled image is used, and the run is named after the data."""
from __future__ import annotations

import numpy as np
from PIL import Image

from edgexfer.cli import default_run_name
from edgexfer.config import build_config
from edgexfer.data import auto_image_size, auto_image_sizes, fixres_size
from tests.conftest import make_image_folder, run_cli

BASE = dict(test_size=2000, seed=0, strict=False, backbone="efficientnet_lite0", weights="imagenet",
            strategy="lpft", epochs=1, batch_size=8, lr=3e-4, threads=1)


def _photos(root, side=160, per_class=4):
    rng = np.random.default_rng(0)
    for c in ("daisy", "tulip"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (side, side * 4 // 3, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def test_auto_size_photos_get_the_pretraining_resolution(tmp_path):
    size, why = auto_image_size(str(_photos(tmp_path / "p")), 224)
    assert size == 224 and "160 px" in why and "pretraining resolution" in why
    assert auto_image_size(str(_photos(tmp_path / "q")), 260)[0] == 260  # Lite2's own resolution


def test_backbone_auto_also_tries_photos_at_fixres_size(tmp_path):
    """Under --backbone auto photos are compared at the pretraining size and at 1.15x it (FixRes); small
    images and Fashion-MNIST at their one size (upsampling them further adds time, not detail)."""
    assert [fixres_size(s) for s in (224, 240, 260)] == [256, 276, 300]
    photos = auto_image_sizes(str(_photos(tmp_path / "p")), 240)
    assert [s for s, _ in photos] == [240, 276]
    assert "pretraining resolution, 240 px" in photos[0][1] and "276 px, 1.15x" in photos[1][1] and "160 px" in photos[1][1]
    assert [s for s, _ in auto_image_sizes(str(make_image_folder(tmp_path / "s", per_class=3)), 224)] == [96]
    assert [s for s, _ in auto_image_sizes(None, 224)] == [96]
    (tmp_path / "empty" / "a").mkdir(parents=True)  # nothing to measure: the pretraining size alone
    assert [s for s, _ in auto_image_sizes(str(tmp_path / "empty"), 224)] == [224]


def test_auto_size_small_images_and_fashion_mnist(tmp_path):
    size, why = auto_image_size(str(make_image_folder(tmp_path / "s", per_class=3)), 224)  # 64x48 images
    assert size == 96 and "48 px" in why
    assert auto_image_size(None, 224)[0] == 96


def test_cli_defaults_for_own_data(tmp_path):
    data = _photos(tmp_path / "flowers")
    cfg = build_config(data=str(data), shots=None, all_labels=False, image_size="auto", **BASE)
    assert cfg.data.shots is None                        # every labelled image
    assert cfg.model.image_size == 224 and "photos" in cfg.model.image_size_reason
    assert build_config(data=None, shots=None, all_labels=False, image_size="auto", **BASE).data.shots == 100
    fixed = build_config(data=str(data), shots=5, all_labels=False, image_size=128, **BASE)
    assert fixed.data.shots == 5 and fixed.model.image_size == 128
    assert default_run_name(str(data)) == "flowers" and default_run_name(None) == "demo"
    (tmp_path / "labels.csv").write_text("path,label\n")
    assert default_run_name(str(tmp_path / "labels.csv")) == "labels"


def test_bad_image_size_is_one_line(tmp_path):
    p = run_cli("run", "--data", tmp_path, "--image-size", "tiny")
    assert p.returncode == 2 and "neither 'auto' nor an integer" in p.stderr and "Traceback" not in p.stderr


def test_report_and_card_say_why_the_size():
    from edgexfer.report import model_card, report_md

    rep = {"data": {"classes": ["a", "b"]}, "models": {},
           "backbone": {"name": "efficientnet_lite0", "image_size": 224, "strategy": "lpft",
                        "image_size_reason": "the median shorter side of 64 sampled images is 240 px: photos"}}
    assert "Input size 224 px: the median shorter side" in report_md(rep)
    assert "Input 224×224 px (the median shorter side" in model_card(rep)


def test_left_out_images_are_counted_and_reported(tmp_path):
    from edgexfer.data import load_image_folder
    from edgexfer.report import model_card, report_md

    data = make_image_folder(tmp_path / "s", per_class=10)
    assert load_image_folder(data, shots=None).left_out == 0
    ds = load_image_folder(data, shots=4)          # 10 per class: 2 test, 8 labelled, 4 of them used
    assert ds.left_out == 3 * (8 - 4) and ds.summary()["labelled_left_out"] == 12
    rep = {"data": ds.summary(), "backbone": {}, "models": {}}
    assert "12 labelled images left out" in report_md(rep) and "12 labelled images were left out" in model_card(rep)
