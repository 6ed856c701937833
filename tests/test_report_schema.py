"""report.json is edgexfer.report/2, described by the JSON Schema shipped in the package (issue 14 item 3):
the writer validates before it writes, the TypedDicts and the schema name the same fields, /1 reports stay
readable. (tests/conftest.py validates every report the suite's runs write.)"""
import json
import tomllib
import typing
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from edgexfer import report_schema as rs
from edgexfer.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def test_the_schema_is_a_valid_json_schema_shipped_as_package_data():
    s = rs.schema()
    Draft202012Validator.check_schema(s)
    assert s["properties"]["schema"]["const"] == rs.SCHEMA_ID == "edgexfer.report/2"
    assert s["additionalProperties"] is True  # other stages may add sections without breaking the schema
    pp = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = pp["tool"]["setuptools"]
    assert "edgexfer.schemas" in st["packages"] and "*.json" in st["package-data"]["edgexfer.schemas"]
    assert any("jsonschema" in d for d in pp["project"]["optional-dependencies"]["train"])
    assert not any("jsonschema" in d for d in pp["project"]["dependencies"])  # the runtime install does without


GOOD = {"schema": "edgexfer.report/2", "edgexfer_version": "0", "updated": "2026-01-01T00:00:00+00:00",
        "stages": {"finetune": {"done": True, "seconds": 1.5, "at": "x"}},
        "models": {"fp32": {"file": "model.onnx", "size_bytes": 10, "accuracy": 0.9, "confusion_matrix": [[1, 0], [0, 1]],
                            "latency_ms": {"p50": 1.0, "n": 3}, "throughput": {"batch": 8, "images_per_s": 100.0}}},
        "checks": [{"name": "x", "value": 0.5, "kind": "ratio", "bound": "<= 1", "ok": None}],
        "recommendation": {"model": "fp32", "file": "model.onnx", "why": "fastest", "test_accuracy": 0.9},
        "some_new_section": {"anything": [1, "a"]}}


@pytest.mark.parametrize("path, value", [
    (("models", "fp32", "accuracy"), "high"),
    (("models", "fp32", "accuracy"), 1.5),
    (("checks", 0, "ok"), "yes"),
    (("stages", "finetune", "done"), None),
    (("recommendation", "file"), 3),
    (("schema",), "edgexfer.report/1"),
])
def test_validate_names_the_field_that_breaks_the_schema(path, value):
    rs.validate(json.loads(json.dumps(GOOD)))
    bad = json.loads(json.dumps(GOOD))
    d = bad
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    with pytest.raises(rs.ReportSchemaError, match=".".join(map(str, path)).replace(".", r"\.") if len(path) > 1 else "schema"):
        rs.validate(bad)


def test_a_missing_required_field_is_refused():
    bad = json.loads(json.dumps(GOOD))
    del bad["checks"][0]["ok"]
    with pytest.raises(rs.ReportSchemaError, match="'ok' is a required property"):
        rs.validate(bad)


def test_the_writer_validates_before_it_writes(tmp_path):
    run = RunFolder(tmp_path)
    rep = run.update_report(models={"fp32": {"file": "model.onnx", "accuracy": 0.5}})
    assert rep["schema"] == "edgexfer.report/2"
    before = (tmp_path / "report.json").read_text()
    with pytest.raises(rs.ReportSchemaError, match=r"models\.fp32\.accuracy"):
        run.update_report(models={"fp32": {"accuracy": "0.5"}})
    assert (tmp_path / "report.json").read_text() == before  # nothing written


def test_a_v1_report_stays_readable_and_is_upgraded_on_the_next_write(tmp_path):
    from edgexfer.report import recommend, report_md

    v1 = {"schema": "edgexfer.report/1", "edgexfer_version": "0.0.9", "updated": "x",
          "data": {"source": "s", "classes": ["a", "b"], "train": 4, "val": 2, "test": 2},
          "backbone": {"name": "efficientnet_lite0", "weights": "imagenet", "strategy": "linear", "image_size": 96},
          "models": {"fp32": {"file": "model.onnx", "size_bytes": 10, "accuracy": 0.5,
                              "latency_ms": {"p50": 1.0}, "throughput": {"batch": 8, "images_per_s": 1.0}}}}
    assert rs.is_report(v1)
    assert "efficientnet_lite0" in report_md(v1)
    assert recommend(v1, 0.01)["model"] == "fp32"
    (tmp_path / "report.json").write_text(json.dumps(v1))
    rep = RunFolder(tmp_path).update_report(checks=[])
    assert rep["schema"] == "edgexfer.report/2" and rep["models"] == v1["models"]


def _keys(td) -> set[str]:
    return set(typing.get_type_hints(td))


@pytest.mark.parametrize("td, where", [
    (rs.Report, ()), (rs.Check, ("$defs", "check")), (rs.Recommendation, ("properties", "recommendation")),
    (rs.Stage, ("$defs", "stage")), (rs.Latency, ("$defs", "latency")), (rs.Model, ("$defs", "model")),
    (rs.Bench, ("properties", "bench")), (rs.QuantizationImpact, ("properties", "quantization_impact")),
    (rs.Adaptation, ("properties", "adaptation")),
])
def test_the_typed_sections_and_the_schema_name_the_same_fields(td, where):
    node = rs.schema()
    for k in where:
        node = node[k]
    props = set(node["properties"])
    if td is rs.Model:
        props |= set(rs.schema()["$defs"]["timing"]["properties"])
    assert _keys(td) <= props, _keys(td) - props
    if td is not rs.Model:
        assert props <= _keys(td), props - _keys(td)
