"""The embedding example `edgexfer bundle` ships beside a model (runtime/app.py): classify images and folders, one
JSON line each; an unreadable image is a line with its error, not a crash. Fast tier: in this process on a tiny
ONNX model (the bundle's own run in a fresh venv is a system test, test_bundle.py)."""
from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from tests._onnx_model import good_meta, onnx_bytes


@pytest.fixture
def app():
    path = list(sys.path)
    from edgexfer.runtime import app as module  # it puts its own folder first on sys.path, as a bundle needs

    sys.path[:] = path  # here that folder would shadow packages (multipart, ...) for the tests after this one
    return module


def test_classifies_files_and_folders(app, tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(onnx_bytes(good_meta(classes=4), classes=4))
    (tmp_path / "imgs").mkdir()
    for i, colour in enumerate(((250, 0, 0), (0, 250, 0))):
        Image.new("RGB", (12, 9), colour).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    code = app.main([str(model), str(tmp_path / "imgs"), str(tmp_path / "bad.png"), "--top-k", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # one image failed
    assert [line["image"].rsplit("/", 1)[-1] for line in lines] == ["0.png", "1.png", "bad.png"]
    assert all(len(line["predictions"]) == 2 and line["predictions"][0]["label"] in {"c0", "c1", "c2", "c3"}
               for line in lines[:2])
    assert "error" in lines[2] and "predictions" not in lines[2]
    assert app.main([str(model), str(tmp_path / "imgs" / "0.png")]) == 0


def test_a_missing_model_is_one_line(app, tmp_path, capsys):
    assert app.main([str(tmp_path / "nope.onnx"), "x.png"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
