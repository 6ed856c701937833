"""Issue 26 item 1: labels are data, not markup. A class name with a control character is refused where data
loads (one line, nothing written); every other name is accepted and escaped wherever it is written
(report.md and model_card.md tables and text, labels.txt, Triton's label files, the confusion matrix).

Fast: no training; a two-layer ONNX model with edgexfer metadata stands in for a trained one."""
from __future__ import annotations

import json
import re

import pytest

from tests.conftest import make_image_folder, run_cli
from tests.test_errors import assert_user_error
from tests.test_data_safety import tiny_model

HOSTILE = ["a|b", "<img src=x onerror=alert(1)>", "x`y`z", "Ünï 猫", "back\\slash", "*bold* [l](http://e) _u_ a&amp;"]


def cells(row: str) -> list[str]:
    """A Markdown table row's cells, split at the pipes that are not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


@pytest.mark.parametrize("bad,code", [("a\nb", "U+000A"), ("tab\there", "U+0009"), ("cr\rx", "U+000D"),
                                      ("esc\x1b[31m", "U+001B"), ("c1\x85x", "U+0085"), ("ls\u2028x", "U+2028")])
def test_control_character_in_class_folder_is_refused(tmp_path, bad, code):
    from edgexfer.data import load_dataset
    from edgexfer.errors import DataError

    data = make_image_folder(tmp_path / "d", per_class=3)
    (data / "red_disc").rename(data / bad)
    with pytest.raises(DataError) as e:
        load_dataset(str(data), shots=None)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"{bad!r} holds a control character ({code})" in msg
    assert f"class folder in {data}" in msg


def test_newline_class_folder_run_is_one_line_and_writes_nothing(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=3)
    (data / "red_disc").rename(data / "red\ndisc")
    p = run_cli("run", "--data", data, "--runs", tmp_path / "runs", "--name", "x", "--backbone", "efficientnet_lite0",
                "--image-size", "32", "--epochs", "1")
    assert_user_error(p, "'red\\ndisc' holds a control character (U+000A)")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


@pytest.mark.parametrize("cell", ['"two\nlines"', '"nul\x00"', '"tab\tx"'])
def test_control_character_in_csv_label_is_refused_naming_the_row(tmp_path, cell):
    from edgexfer.data import load_csv
    from edgexfer.errors import DataError

    data = make_image_folder(tmp_path / "d", per_class=3)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    rows[4] = rows[4].split(",")[0] + "," + cell
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"l\.csv: row 5, column 'label': .* holds a control character \(U\+00"):
        load_csv(tmp_path / "l.csv")


def test_metadata_with_a_newline_label_is_refused():
    from edgexfer.runtime.errors import MetadataError
    from edgexfer.runtime.metadata import ModelMeta

    d = json.loads(_meta(["a", "b"]).to_json())
    ModelMeta.from_dict(d)  # as written: fine
    d["tasks"][0]["labels"] = ["a\nb", "c"]
    with pytest.raises(MetadataError, match=r"tasks\[0\]\.labels\[0\] 'a\\nb' holds a control character \(U\+000A\)"):
        ModelMeta.from_dict(d)


def _meta(labels):
    from edgexfer.runtime.metadata import InputSpec, ModelMeta, Preprocessing, Task

    return ModelMeta(tasks=[Task("label", "logits", list(labels))], input=InputSpec("input", 32, 32),
                     preprocessing=Preprocessing(resize=32, crop=32))


def test_bundle_of_a_model_with_a_newline_label_is_one_line(tmp_path):
    """A file made elsewhere (or by an older edgexfer) with a line break in a label: refused, nothing written."""
    m = tiny_model(tmp_path / "m.onnx", labels=("a\nb", "c", "d"))
    p = run_cli("bundle", m, tmp_path / "out")
    assert_user_error(p, "holds a control character (U+000A)")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.onnx"]


def test_labels_txt_and_triton_label_files_round_trip(tmp_path):
    from edgexfer.exporters.triton import write_triton_repo
    from edgexfer.runtime.bundle import bundle
    from edgexfer.runtime.labels import read_lines

    m = tiny_model(tmp_path / "m.onnx", labels=HOSTILE)
    bundle(m, tmp_path / "out")
    assert read_lines((tmp_path / "out" / "labels.txt").read_text(encoding="utf-8")) == HOSTILE
    dest = write_triton_repo(m, tmp_path / "repo", "m")
    assert read_lines((dest / "labels_logits.txt").read_text(encoding="utf-8")) == HOSTILE
    # a run folder's name is the Triton model's name: quoted as protobuf text, a quote in it cannot end the string
    dest = write_triton_repo(m, tmp_path / "repo", 'say "hi" \\o')
    assert (dest / "config.pbtxt").read_text().startswith('name: "say \\"hi\\" \\\\o"\n')


def _rep(classes) -> dict:
    per_class = {c: {"support": 10, "precision": 0.9, "recall": 0.5 + 0.05 * i} for i, c in enumerate(classes)}
    q = {c: {"support": 10, "precision": 0.9, "recall": 0.4} for c in classes}
    return {
        "data": {"source": "/data/wei`rd", "classes": list(classes), "train": 30, "val": 9, "test": 30,
                 "train_per_class": {c: 5 for c in classes}},
        "backbone": {"name": "efficientnet_lite0", "weights": "imagenet", "strategy": "lpft", "image_size": 64},
        "models": {"fp32": {"file": "model.onnx", "size_bytes": 4_000_000, "accuracy": 0.9, "macro_f1": 0.9,
                            "per_class": per_class},
                   "int8": {"file": "model.int8.onnx", "size_bytes": 1_000_000, "accuracy": 0.8, "macro_f1": 0.8,
                            "per_class": q}},
        "quantization_impact": {"accuracy_drop": 0.1, "top1_agreement_int8_vs_fp32": 0.9,
                                "recall_delta_points": {c: -10.0 - i for i, c in enumerate(classes)},
                                "classes_losing_more_than": {"points": 3.0, "classes": list(classes)}},
    }


def test_report_and_model_card_escape_labels():
    from edgexfer.report import checks, model_card, report_md

    rep = _rep(HOSTILE)
    rep["checks"] = checks(rep, 0.01)
    for text in (report_md(rep), model_card(rep)):
        assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
        assert "*bold*" not in text and "[l](" not in text and not re.search(r"a&amp;(?!amp;)", text)
        table = text[text.index("## Per class"):].split("\n\n")[1].splitlines()
        assert len(table) == 2 + len(HOSTILE)
        assert all(len(cells(r)) == 6 for r in table), table
        assert [cells(r)[0] for r in table[2:]] == [
            "a\\|b", "&lt;img src=x onerror=alert(1)&gt;", "x\\`y\\`z", "Ünï 猫", "back\\\\slash",
            "\\*bold\\* \\[l\\](http://e) \\_u\\_ a&amp;amp;"]
    md = report_md(rep)
    check_row = next(r for r in md.splitlines() if r.startswith("| classes losing"))
    assert len(cells(check_row)) == 4 and "a\\|b" in check_row
    assert "Data: `` /data/wei`rd `` —" in md
    card = model_card(rep)
    assert "classes: a\\|b, &lt;img" in card and "Served worst: a\\|b (recall" in card


def test_confusion_matrix_draws_dollar_labels(tmp_path):
    pytest.importorskip("matplotlib")
    from edgexfer.plots import confusion_matrix

    classes = ["$x^$", "5$ and $\\frac{", "plain"]
    models = {"fp32": {"file": "model.onnx", "confusion_matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}}
    confusion_matrix(tmp_path / "cm.png", models, classes)
    assert (tmp_path / "cm.png").stat().st_size > 0
