"""report.json's contract: `edgexfer.report/2`, the JSON Schema shipped in edgexfer/schemas/report.schema.json,
and the sections as TypedDicts for the code that writes them.

    from edgexfer.report_schema import Check, validate
    validate(report)             # raises ReportSchemaError naming the first field that breaks the schema

The writer (RunFolder.update_report) validates every report before it writes it, so a run folder never holds
a report.json that does not match. /2 keeps every field name of /1: readers (report.py, runtime/bundle.py,
inspect, compare) read both, and `is_report` accepts either. The schema allows sections and fields it does
not name (other stages and later versions add them); the ones it names must have its types.
Validation needs `jsonschema` (the [train] extra, which every command that writes a report needs); the
runtime install reads reports without it.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypedDict, Union

from edgexfer.errors import EdgexferError

SCHEMA_ID = "edgexfer.report/2"
READABLE = ("edgexfer.report/1", SCHEMA_ID)  # what readers accept: /1 run folders keep working
SCHEMA_FILE = Path(__file__).with_name("schemas") / "report.schema.json"


class ReportSchemaError(EdgexferError):
    """A report does not match edgexfer.report/2: a bug in the code that wrote it, not a user mistake."""


# -- the sections, as the code writes them (total=False: a section is written field by field, stage by stage)

class Stage(TypedDict, total=False):
    done: bool
    seconds: float
    at: str
    settings: dict[str, str]  # sha256 of each config.json entry the stage read (runfolder.STAGE_SETTINGS)
    inputs: dict[str, str]    # sha256 of each file it read (an ONNX file's content less its metrics)


class Latency(TypedDict, total=False):
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    std: float
    min: float
    max: float
    n: int


class Throughput(TypedDict):
    batch: int
    images_per_s: float


class Timing(TypedDict, total=False):
    threads: int
    batch: int
    latency_ms: Latency
    throughput: Throughput


class Model(Timing, total=False):
    file: str
    size_bytes: int
    accuracy: float | None
    macro_f1: float | None
    n: int
    seconds: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    tasks: dict[str, Any]


class Bench(TypedDict, total=False):
    threads: int
    iters: int
    warmup: int
    interleaved: bool
    onnxruntime_spinning: bool
    block_calls: int
    not_measured: Any
    input_shape: Any


class ClassesLosing(TypedDict):
    points: float
    classes: list[str]


class QuantizationImpact(TypedDict, total=False):
    accuracy_drop: float
    within_bound: bool
    max_accuracy_drop: float
    top1_agreement_int8_vs_fp32: float
    size_ratio: float
    recall_delta_points: dict[str, float]
    worst_class: str | None
    worst_delta_points: float | None
    classes_losing_more_than: ClassesLosing


class Check(TypedDict, total=False):
    """One headline figure against its bound; `ok` None: not measurable on this host."""
    name: str
    value: Union[float, str, list, bool, None]
    kind: str  # how to format value: pct, ratio, points, accuracy, accuracy_delta (runtime/fmt.py)
    bound: str
    ok: bool | None
    note: str | None


class Recommendation(TypedDict, total=False):
    """The file to ship on this host, chosen on validation-side evidence only; `test_accuracy` is reported."""
    model: str
    file: str
    p50_ms: float
    size_bytes: int
    why: str
    decided_on: str
    test_accuracy: float | None
    int8_speedup: float
    note: str
    outside_bound: list[str]
    not_checked: list[str]
    test_disagrees: str


class ConversionCheck(TypedDict, total=False):
    images: int
    top1_agreement_with_source: float | None
    top1_agreement_with_fp32: float | None
    disagreement_upper95: float | None
    max_abs_prob_diff_vs_source: float | None


class ConvertedFile(TypedDict, total=False):
    format: str
    precision: str
    file: str
    weights: str
    size_bytes: int
    source: str
    runtime: str
    check: ConversionCheck
    test: ConversionCheck | None
    shippable: bool
    why: str


class Formats(TypedDict, total=False):
    checked_on: str
    unseen: bool
    min_agreement_fp32: float | None
    files: list[ConvertedFile]


class Adaptation(TypedDict, total=False):
    kept: bool
    forced: bool
    reasons: list[str]


class Report(TypedDict, total=False):
    """The top level. Sections typed `dict` here are described field by field in the JSON Schema."""
    schema: Literal["edgexfer.report/2"]
    edgexfer_version: str
    updated: str
    stages: dict[str, Stage]
    data: dict[str, Any]
    backbone: dict[str, Any]
    training: dict[str, Any]
    calibration: dict[str, Any]
    adaptation: Adaptation
    transfer: dict[str, Any]
    export: dict[str, Any]
    quantize: dict[str, Any]
    formats: Formats
    models: dict[str, Model]
    reference: dict[str, Timing]
    quantization_impact: QuantizationImpact
    machine: dict[str, Any]
    bench: Bench
    recommendation: Recommendation | None
    checks: list[Check]


# -- the schema and validation ------------------------------------------------------------------------

@lru_cache(maxsize=1)
def schema() -> dict:
    """The JSON Schema of edgexfer.report/2 (package data)."""
    return json.loads(SCHEMA_FILE.read_text())


@lru_cache(maxsize=1)
def _validator():
    try:
        from jsonschema import Draft202012Validator
    except ImportError:  # the runtime install: it reads reports, it never writes one
        return None
    return Draft202012Validator(schema())


def errors(report: dict) -> list[str]:
    """Every place `report` breaks the schema, as 'path: message' (empty: it matches). Needs jsonschema."""
    v = _validator()
    if v is None:
        raise ReportSchemaError("validating report.json needs jsonschema: pip install 'edgexfer[train]'")
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message}"
            for e in sorted(v.iter_errors(report), key=lambda e: list(map(str, e.absolute_path)))]


def validate(report: dict, *, where: str = "report.json") -> None:
    """Raise ReportSchemaError (one line: the first failing field) unless `report` matches edgexfer.report/2.
    Without jsonschema installed it checks only the schema id."""
    if _validator() is None:
        if report.get("schema") != SCHEMA_ID:
            raise ReportSchemaError(f"{where}: schema is {report.get('schema')!r}, not {SCHEMA_ID!r}")
        return
    errs = errors(report)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise ReportSchemaError(f"{where} does not match {SCHEMA_ID} at {errs[0]}{more}: this is a bug in "
                                "edgexfer, please report it")


def is_report(d: object) -> bool:
    """Is `d` a report a reader understands (edgexfer.report/1 or /2)?"""
    return isinstance(d, dict) and d.get("schema") in READABLE
