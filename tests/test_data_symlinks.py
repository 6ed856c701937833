"""Issue 26 item 4: data stays inside the data folder. Symbolic links (class folders or images) that lead out of
the data root are skipped and counted with the unreadable images; `--follow-symlinks` follows them; links that
stay inside are followed. The setting is recorded in config.json and in the finetune stage's provenance.

Fast: tiny generated image folders, no training (stages stubbed where a run is needed)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import make_image, make_image_folder
from tests.test_data_safety import all_images, fake_stages, tiny_model  # noqa: F401  (fixture)


@pytest.fixture
def outside(tmp_path):
    """A folder of 5 images outside any data folder (as /usr was in the probe)."""
    import numpy as np

    d = tmp_path / "system"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        make_image(0, rng).save(d / f"sys{i}.png")
    return d


def test_class_folder_linked_outside_is_skipped_and_counted(tmp_path, outside, caplog):
    from edgexfer.data import load_image_folder

    data = make_image_folder(tmp_path / "d", per_class=4)
    (data / "usr").symlink_to(outside, target_is_directory=True)
    ds = load_image_folder(data)
    assert ds.classes == ["blue_ring", "green_bar", "red_disc"]
    assert not any("sys" in p for p in all_images(ds)) and len(all_images(ds)) == 12
    assert ds.unreadable == [str(data / "usr")] and ds.summary()["skipped_unreadable"] == [str(data / "usr")]
    assert any("symbolic link out of the data folder" in r.getMessage() and f"to {outside}" in r.getMessage()
               for r in caplog.records)
    followed = load_image_folder(data, follow_symlinks=True)
    assert followed.classes == ["blue_ring", "green_bar", "red_disc", "usr"] and len(all_images(followed)) == 17
    assert followed.unreadable == []


def test_image_linked_outside_is_skipped_inside_is_followed(tmp_path, outside):
    from edgexfer.data import load_image_folder

    data = make_image_folder(tmp_path / "d", per_class=4)
    (data / "red_disc" / "away.png").symlink_to(outside / "sys0.png")
    (data / "red_disc" / "near.png").symlink_to(data / "green_bar" / "000.png")  # stays inside: fine
    (data / "alias").symlink_to(data / "blue_ring", target_is_directory=True)   # a class linked inside: fine
    ds = load_image_folder(data)
    imgs = all_images(ds)
    assert str(data / "red_disc" / "away.png") not in imgs and str(data / "red_disc" / "near.png") in imgs
    assert "alias" in ds.classes and ds.unreadable == [str(data / "red_disc" / "away.png")]
    assert str(data / "red_disc" / "away.png") in all_images(load_image_folder(data, follow_symlinks=True))


def test_a_data_folder_reached_through_a_link_is_still_inside(tmp_path):
    from edgexfer.data import load_image_folder

    data = make_image_folder(tmp_path / "d", per_class=4)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    ds = load_image_folder(tmp_path / "link")
    assert ds.unreadable == [] and len(all_images(ds)) == 12


def test_strict_refuses_a_link_outside_in_one_line(tmp_path, outside):
    from edgexfer.data import load_image_folder
    from edgexfer.errors import DataError

    data = make_image_folder(tmp_path / "d", per_class=4)
    (data / "usr").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match=rf"usr is a symbolic link out of the data folder \(to {outside}\); pass "
                                        r"--follow-symlinks to follow it, or drop --strict to skip it"):
        load_image_folder(data, strict=True)


def test_ready_made_splits_check_against_the_data_root(tmp_path, outside):
    from edgexfer.data import load_image_folder

    root = tmp_path / "d"
    for split in ("train", "test"):
        make_image_folder(root / split, per_class=4)
    (root / "test" / "red_disc").rename(tmp_path / "moved")
    (root / "test" / "red_disc").symlink_to(tmp_path / "moved", target_is_directory=True)
    (root / "train" / "red_disc" / "x.png").symlink_to(root / "test" / "green_bar" / "000.png")  # inside the root
    ds = load_image_folder(root)
    assert ds.unreadable == [str(root / "test" / "red_disc")]
    assert str(root / "train" / "red_disc" / "x.png") in all_images(ds)


def test_csv_rows_linked_out_of_its_folder_are_skipped(tmp_path, outside):
    from edgexfer.data import load_csv

    data = make_image_folder(tmp_path / "d", per_class=4)
    (data / "link.png").symlink_to(outside / "sys1.png")
    rows = ["path,label"] + [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.rglob("*/*.png"))]
    rows += ["link.png,red_disc", f"{outside / 'sys2.png'},red_disc"]  # a link; an explicit path elsewhere
    (data / "l.csv").write_text("\n".join(rows) + "\n")
    ds = load_csv(data / "l.csv")
    assert ds.unreadable == [str(data / "link.png")]
    assert str(outside / "sys2.png") in all_images(ds)
    assert load_csv(data / "l.csv", follow_symlinks=True).unreadable == []


def test_evaluate_data_skips_links_outside(tmp_path, outside):
    from edgexfer.evaluate import evaluate_folder, find_labelled_folder

    data = tmp_path / "eval"
    make_image_folder(data, per_class=2)
    (data / "red_disc").rename(data / "a")
    (data / "green_bar").rename(data / "b")
    import shutil

    shutil.rmtree(data / "blue_ring")
    (data / "a" / "away.png").symlink_to(outside / "sys0.png")
    folder = find_labelled_folder(data)
    assert [o["path"] for o in folder.outside] == [str(data / "a" / "away.png")]
    assert all("away" not in str(p) for ps in folder.images.values() for p in ps)
    doc = evaluate_folder({"fp32": tiny_model(tmp_path / "m.onnx")}, folder, threads=1)
    assert doc["data"]["skipped"][0]["path"] == str(data / "a" / "away.png") and doc["data"]["images"] == 4
    assert find_labelled_folder(data, follow_symlinks=True).outside == []


def test_follow_symlinks_is_an_option_wherever_data_is():
    from edgexfer import cli

    for cmd in (cli.run, cli.finetune, cli.curve, cli.rank, cli.evaluate):
        assert "follow_symlinks" in {p.name for p in cmd.params}, cmd.name


def test_the_setting_is_recorded_and_changing_it_is_another_configuration(tmp_path, fake_stages):  # noqa: F811
    from edgexfer import pipeline
    from edgexfer.config import build_config
    from edgexfer.errors import RunFolderError

    data = make_image_folder(tmp_path / "d", per_class=4)
    kw = dict(data=str(data), shots=None, all_labels=True, test_size=10, seed=0, strict=False,
              backbone="efficientnet_lite0", weights="imagenet", image_size=64, strategy="lpft", epochs=1,
              batch_size=8, lr=1e-3, threads=1)
    cfg = build_config(**kw, follow_symlinks=True)
    assert cfg.data.follow_symlinks is True and build_config(**kw).data.follow_symlinks is False
    run = tmp_path / "run"
    pipeline.run(run, cfg)
    assert json.loads((run / "config.json").read_text())["data"]["follow_symlinks"] is True
    rf = pipeline.RunFolder(run)
    assert rf.provenance("finetune", cfg)["settings"]["data"] != rf.provenance("finetune", build_config(**kw))["settings"]["data"]
    with pytest.raises(RunFolderError, match="holds a run made with another configuration"):
        pipeline.run(run, build_config(**kw))


def test_unlabelled_folders_stay_inside_too(tmp_path, caplog):
    """--adapt-bn and --guard-data folders (list_images): a symbolic link out of the folder is skipped and counted,
    unless follow_symlinks."""
    import logging

    from PIL import Image

    from edgexfer.data import list_images

    inside, outside = tmp_path / "target", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    for d, name in ((inside, "a.png"), (inside, "b.png"), (outside, "secret.png")):
        Image.new("RGB", (8, 8)).save(d / name)
    (inside / "c.png").symlink_to(outside / "secret.png")
    (inside / "d.png").symlink_to(inside / "a.png")  # stays inside: fine
    with caplog.at_level(logging.WARNING, logger="edgexfer.data"):
        files = list_images(inside)
    assert [p.rsplit("/", 1)[1] for p in files] == ["a.png", "b.png", "d.png"]
    assert "skipped 1 symbolic link(s) that lead out of the folder" in caplog.text
    assert len(list_images(inside, follow_symlinks=True)) == 4
