"""Very few labels (issue 13 item 7): `--shots 2` must leave a validation image per class, and a run
with no validation split must record no accuracy rather than a negative loss, and still quantize."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgexfer.data import split_labelled, stratified_split
from tests.conftest import make_image_folder, run_cli


def test_two_shots_leave_one_validation_image_per_class():
    labels = np.repeat(np.arange(4), 10)
    tr, va = split_labelled(labels, 2, 0.2, np.random.default_rng(0))
    assert np.bincount(labels[tr], minlength=4).tolist() == [1, 1, 1, 1]
    assert np.bincount(labels[va], minlength=4).tolist() == [1, 1, 1, 1]
    # three parts from three items: one each; larger classes keep their fractions
    parts = stratified_split(np.zeros(3, np.int64), (0.8, 0.1, 0.1), np.random.default_rng(0))
    assert [len(p) for p in parts] == [1, 1, 1]
    parts = stratified_split(np.zeros(100, np.int64), (0.8, 0.2), np.random.default_rng(0))
    assert [len(p) for p in parts] == [80, 20]


def test_empty_validation_split_records_no_accuracy(tmp_path):
    import torch

    from edgexfer.finetune import TrainConfig, tensorize, train
    from edgexfer.model import build_model, model_config, preprocessing_of
    from edgexfer.data import load_image_folder

    ds = load_image_folder(make_image_folder(tmp_path / "d", per_class=6), shots=4, val_fraction=0.0)
    assert len(ds.val) == 0
    mcfg = model_config(backbone="efficientnet_lite0", weights="imagenet", image_size=32, tasks=ds.tasks)
    pp = preprocessing_of(mcfg)
    x, y = tensorize(ds.val, pp)
    assert tuple(x.shape) == (0, 3, 32, 32) and len(y) == 0
    torch.manual_seed(0)
    res = train(build_model(mcfg), ds, pp, TrainConfig(strategy="lpft", epochs=1, batch_size=8, probe_steps=20),
                tmp_path / "w")
    assert res.val_accuracy is None and res.probe_val_accuracy is None
    assert all(h["val_accuracy"] is None for h in res.history)


@pytest.mark.slow
def test_run_with_two_shots_quantizes(tmp_path):
    data = make_image_folder(tmp_path / "shapes", per_class=8)
    p = run_cli("run", "--data", data, "--runs", tmp_path / "runs", "--name", "two", "--shots", "2",
                "--image-size", "32", "--epochs", "1", "--calibration-samples", "8", "--bench-iters", "3")
    assert p.returncode == 0, p.stderr[-2000:]
    rep = json.loads((tmp_path / "runs" / "two" / "report.json").read_text())
    assert rep["data"]["val"] == 3
    t = rep["training"]  # 3 validation images choose nothing: the probe's strength is cross-validated over all 6
    sel = t["probe_selection"]
    assert t["strategy"] == "linear" and sel["images"] == rep["data"]["train"] + rep["data"]["val"] == 6
    assert t["val_accuracy"] == sel["cv_accuracy"] >= 0.5  # the reported figure is the CV's; the shapes are easy
    assert (tmp_path / "runs" / "two" / "model.int8.onnx").is_file()


def test_small_validation_cross_validates_the_probe(tmp_path):
    """30 validation images cannot choose the probe's strength: k-fold CV does, and the linear probe is then
    refitted on train + val; the report gets the method, the folds, C and the CV accuracy with its error."""
    import torch

    from edgexfer.data import load_image_folder
    from edgexfer.finetune import TrainConfig, train
    from edgexfer.model import build_model, model_config, preprocessing_of

    ds = load_image_folder(make_image_folder(tmp_path / "d", per_class=12), shots=None)
    assert len(ds.val) < 50
    mcfg = model_config(backbone="efficientnet_lite0", weights="imagenet", image_size=32, tasks=ds.tasks)
    torch.manual_seed(0)
    res = train(build_model(mcfg), ds, preprocessing_of(mcfg), TrainConfig(strategy="linear"), tmp_path / "w")
    sel = res.probe_selection
    assert sel and sel["refit_on"] == "train + val" and sel["images"] == len(ds.train) + len(ds.val)
    assert sel["C_range"][0] <= sel["C"] <= sel["C_range"][1] and sel["folds"] == 5 and sel["cv_stderr"] >= 0
    assert sel["cv_accuracy"] >= 0.8  # the shapes are easy for ImageNet features
    assert res.val_accuracy == sel["cv_accuracy"] and "validation images" in sel["reason"]
    assert sel["features_by"] == "onnxruntime"  # the frozen backbone's features, every view's: edgexfer.features


def test_cv_probe_two_classes_matches_scikit_learn():
    import torch
    from sklearn.linear_model import LogisticRegression

    from edgexfer.probe import cv_probe

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20)
    f = rng.normal(size=(40, 6)) + y[:, None] * 0.8
    head = torch.nn.Linear(6, 2)
    sel = cv_probe(head, torch.as_tensor(f, dtype=torch.float32), torch.as_tensor(y), False, 0)
    ref = LogisticRegression(C=sel["C"], max_iter=2000).fit(f, y)
    with torch.no_grad():
        ours = head(torch.as_tensor(f, dtype=torch.float32)).argmax(1).numpy()
    assert (ours == ref.predict(f)).mean() >= 0.95
    # a class with a single image: nothing to cross-validate, the caller falls back to its own probe
    assert cv_probe(torch.nn.Linear(6, 2), torch.zeros(3, 6), torch.as_tensor([0, 0, 1]), False, 0) is None
