"""`edgexfer evaluate RUN|MODEL --data DIR`: any labelled folder scored by a tiny ONNX model whose answer is
the brightest colour channel (red, green, blue), so every prediction is known before it is made."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._onnx_model import good_meta, onnx_bytes

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def colour_model(path: Path) -> Path:
    """input -> channel means -> identity: class k is the brightest channel k. Labels red, green, blue."""
    import onnx
    from onnx import numpy_helper

    meta = good_meta(classes=3, side=8)
    meta["tasks"][0]["labels"] = list(COLOURS)
    m = onnx.load_from_string(onnx_bytes(meta, classes=3, side=8))
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.eye(3, dtype=np.float32), "w"))
    path.write_bytes(m.SerializeToString())
    return path


def solid(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), COLOURS[colour]).save(path)


@pytest.fixture
def data(tmp_path) -> Path:
    """red/: 3 red + 1 blue (a mistake: red -> blue); green/: 2 green; blue/: 2 blue."""
    root = tmp_path / "photos"
    for i in range(3):
        solid(root / "red" / f"r{i}.png", "red")
    solid(root / "red" / "odd.png", "blue")
    for i in range(2):
        solid(root / "green" / f"g{i}.png", "green")
        solid(root / "blue" / f"b{i}.png", "blue")
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    colour_model(run / "model.onnx")
    (run / "model.int8.onnx").write_bytes((run / "model.onnx").read_bytes())
    (run / "report.json").write_text('{"schema": "edgexfer.report/1"}\n')
    return run


def cli(capsys, *args) -> tuple[int, str, str]:
    """`edgexfer ARGS` in this process: (exit code, stdout, stderr)."""
    from edgexfer.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_metrics_and_misclassified(data, run_dir, capsys):
    code, out, err = cli(capsys, "evaluate", run_dir, "--data", data, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "edgexfer.evaluation/1" and set(doc["models"]) == {"fp32", "int8"}
    m = doc["models"]["fp32"]
    assert m["n"] == 8 and m["accuracy"] == pytest.approx(7 / 8)
    assert m["accuracy_se"] == pytest.approx(np.sqrt(7 / 8 * 1 / 8 / 8))
    pc = m["per_class"]
    assert pc["red"]["recall"] == pytest.approx(3 / 4) and pc["red"]["precision"] == 1.0
    assert pc["blue"]["precision"] == pytest.approx(2 / 3) and pc["blue"]["recall"] == 1.0
    assert pc["green"]["f1"] == 1.0 and pc["red"]["support"] == 4
    assert m["confusion_matrix"] == [[3, 0, 1], [0, 2, 0], [0, 0, 2]]  # rows true, columns predicted
    assert [(Path(r["path"]).name, r["true"], r["predicted"]) for r in m["misclassified"]] == [("odd.png", "red", "blue")]
    assert 0.5 < m["misclassified"][0]["score"] <= 1
    assert doc["agreement_with_fp32"]["int8"]["top1_agreement"] == 1.0

    out_dir = run_dir / "evaluations" / "photos"
    assert json.loads((out_dir / "evaluation.json").read_text())["models"]["int8"]["accuracy"] == pytest.approx(7 / 8)
    rows = list(csv.DictReader((out_dir / "misclassified.csv").open()))
    assert [(Path(r["path"]).name, r["true"], r["predicted"], r["file"]) for r in rows] == [
        ("odd.png", "red", "blue", "model.onnx"), ("odd.png", "red", "blue", "model.int8.onnx")]
    with Image.open(out_dir / "misclassified.png") as im:
        im.load()
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    assert (run_dir / "report.json").read_text() == '{"schema": "edgexfer.report/1"}\n'  # the run's report untouched


def test_table_and_model_file(data, tmp_path, capsys):
    model = colour_model(tmp_path / "colours.onnx")
    code, out, err = cli(capsys, "evaluate", model, "--data", data)
    assert code == 0, err
    assert "accuracy 0.8750" in out and "confusion matrix" in out
    assert (tmp_path / "evaluations" / "photos-colours" / "misclassified.png").is_file()  # beside the model


def test_test_subfolder_and_corrupt_image(data, tmp_path, capsys):
    tree = tmp_path / "tree"
    tree.mkdir()
    data.rename(tree / "test")
    solid(tree / "train" / "red" / "t.png", "blue")  # never scored
    (tree / "test" / "green" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    code, out, err = cli(capsys, "evaluate", colour_model(tmp_path / "m.onnx"), "--data", tree, "--out",
                         tmp_path / "o", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["data"]["used_test_subfolder"] and "test/ folder" in err
    assert doc["data"]["skipped_corrupt"] == 1 and doc["models"]["m"]["n"] == 8


def test_unknown_class_is_one_line(data, run_dir, capsys):
    solid(data / "purple" / "p.png", "red")
    code, out, err = cli(capsys, "evaluate", run_dir, "--data", data)
    assert code == 1 and err.count("\n") == 1 and "purple" in err and "Traceback" not in err
    assert not (run_dir / "evaluations").exists()
    code, out, err = cli(capsys, "evaluate", run_dir, "--data", data, "--skip-unknown", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["data"]["skipped_unknown_classes"] == {"purple": 1} and doc["models"]["fp32"]["n"] == 8


def test_empty_folder_is_one_line(tmp_path, run_dir, capsys):
    (tmp_path / "empty" / "red").mkdir(parents=True)
    code, out, err = cli(capsys, "evaluate", run_dir, "--data", tmp_path / "empty")
    assert code == 1 and err.count("\n") == 1 and "no images" in err


def test_never_overwrites_a_user_file(data, run_dir, tmp_path, capsys):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "misclassified.png").write_bytes(b"my own picture")
    code, out, err = cli(capsys, "evaluate", run_dir, "--data", data, "--out", out_dir)
    assert code == 1 and err.count("\n") == 1 and "misclassified.png" in err
    assert (out_dir / "misclassified.png").read_bytes() == b"my own picture"
    assert not (out_dir / "evaluation.json").exists()
    # its own earlier evaluation is updated in place
    again = tmp_path / "again"
    assert cli(capsys, "evaluate", run_dir, "--data", data, "--out", again)[0] == 0
    assert cli(capsys, "evaluate", run_dir, "--data", data, "--out", again)[0] == 0


def test_without_data_a_model_file_is_one_line(run_dir, capsys):
    code, out, err = cli(capsys, "evaluate", run_dir / "model.onnx")
    assert code == 1 and err.count("\n") == 1 and "--data" in err


def test_model_inside_the_data_folder(data, capsys):
    """The default output beside a model kept in the data folder is not read back as a class."""
    model = colour_model(data / "colours.onnx")
    assert cli(capsys, "evaluate", model, "--data", data)[0] == 0
    code, out, err = cli(capsys, "evaluate", model, "--data", data, "--json")
    assert code == 0, err
    assert json.loads(out)["models"]["colours"]["n"] == 8
