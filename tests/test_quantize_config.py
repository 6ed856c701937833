"""The quantize stage's settings are one typed section, `QuantizeConfig` (issue 25 item 3): config.json keeps it
(older files load through a migration), the EDGEXFER_* variables that change what quantize writes are applied
only where the CLI builds the config, and every one of its fields is part of the stage's provenance, so that
changing any of them marks the stage stale. Light: no model, no run."""
from __future__ import annotations

import dataclasses
import json

import pytest

from edgexfer.config import QUANTIZE_ENVIRONMENT, QuantizeConfig, RunConfig

# a value other than the default for every QuantizeConfig field
CHANGED = {"recipe": lambda r: dataclasses.replace(r, calibration_method="entropy"), "target": "arm64",
           "tuner": "builtin", "extra_formats": ("fp16",), "calibration": "train", "min_target_agreement": 0.5,
           "qat": "off", "guard_data": "/photos", "guard_images": 200, "guard_max_mb": 64.0, "rank_images": 16,
           "arm64_guard_samples": 8, "qat_epochs": 1, "qat_views": 16, "qat_max_images": 10, "qat_force": True, "search_unprovable": True,
           "min_speedup": 0.0}


def _changed(q: QuantizeConfig, name: str) -> QuantizeConfig:
    v = CHANGED[name]
    return dataclasses.replace(q, **{name: v(getattr(q, name)) if callable(v) else v})


def test_every_field_has_a_changed_value_here():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(QuantizeConfig)}


def test_config_json_round_trip_and_the_layout_before_the_section():
    cfg = RunConfig()
    for name in CHANGED:
        cfg.quantize = _changed(cfg.quantize, name)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert RunConfig.from_dict(d) == cfg
    # before QuantizeConfig: the recipe under "quantize", the other quantize settings at the top level
    old = {k: v for k, v in d.items() if k != "quantize"}
    old["quantize"] = d["quantize"]["recipe"]
    old.update(target="arm64", tuner="builtin", extra_formats=["fp16"], calibration="train",
               min_target_agreement=0.5, qat="off", guard_data="/photos")
    q = RunConfig.from_dict(old).quantize
    assert q.recipe == cfg.quantize.recipe and (q.target, q.tuner, q.extra_formats, q.qat) == \
        ("arm64", "builtin", ("fp16",), "off")
    assert q.guard_images == QuantizeConfig.guard_images  # not recorded then: the default


def test_a_moved_setting_cannot_be_set_on_the_run_config():
    with pytest.raises(AttributeError, match="RunConfig.quantize.tuner"):
        RunConfig().tuner = "builtin"


def test_the_environment_applies_only_where_the_cli_builds_the_config(monkeypatch):
    from edgexfer.cli import apply_quant_options

    env = {"EDGEXFER_GUARD_IMAGES": "120", "EDGEXFER_GUARD_MAX_MB": "64", "EDGEXFER_RANK_IMAGES": "16",
           "EDGEXFER_ARM64_GUARD_SAMPLES": "8", "EDGEXFER_QAT_EPOCHS": "1", "EDGEXFER_QAT_VIEWS": "16",
           "EDGEXFER_QAT_MAX_IMAGES": "10", "EDGEXFER_QAT_FORCE": "1", "EDGEXFER_MIN_SPEEDUP": "0",
           "EDGEXFER_SEARCH_UNPROVABLE": "1"}
    assert set(env) == {var for var, _ in QUANTIZE_ENVIRONMENT.values()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert QuantizeConfig() == QuantizeConfig(recipe=QuantizeConfig().recipe)  # the dataclass never reads it
    assert QuantizeConfig().guard_images == 1000 and not QuantizeConfig().qat_force
    assert not QuantizeConfig().search_unprovable
    cfg = apply_quant_options(RunConfig(), target="host", calibration_method="minmax", calibration_samples=200,
                              max_accuracy_drop=0.01, tuner="auto", fp16=False, dynamic=False)
    q = cfg.quantize
    assert (q.guard_images, q.guard_max_mb, q.rank_images, q.arm64_guard_samples) == (120, 64.0, 16, 8)
    assert (q.qat_epochs, q.qat_views, q.qat_max_images, q.qat_force, q.min_speedup) == (1, 16, 10, True, 0.0)
    assert q.search_unprovable and q.guard_max_bytes == 64 * 2**20
    assert q.with_environment({}) == q  # an empty environment keeps the values


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_changing_any_quantize_setting_marks_the_stage_stale(tmp_path, name):
    from edgexfer.runfolder import RunFolder

    run = RunFolder(tmp_path)
    cfg = RunConfig()
    run.write_config(cfg)
    run.mark_done("quantize", 1.0, cfg)
    assert run.why_stale("quantize", cfg) is None
    cfg.quantize = _changed(cfg.quantize, name)
    assert run.why_stale("quantize", cfg) == f"its settings changed since (quantize.{name})"
    assert run.why_stale("bench", cfg) == "not done"


def test_an_environment_variable_marks_the_stage_stale(tmp_path, monkeypatch):
    """The provenance hole of issue 25: EDGEXFER_GUARD_IMAGES changed what quantize wrote and nothing noticed."""
    from edgexfer.cli import apply_quant_options
    from edgexfer.runfolder import RunFolder

    opts = dict(target="host", calibration_method="minmax", calibration_samples=200, max_accuracy_drop=0.01,
                tuner="auto", fp16=False, dynamic=False)
    run = RunFolder(tmp_path)
    cfg = apply_quant_options(RunConfig(), **opts)
    run.mark_done("quantize", 1.0, cfg)
    assert run.why_stale("quantize", apply_quant_options(RunConfig(), **opts)) is None
    monkeypatch.setenv("EDGEXFER_GUARD_IMAGES", "200")
    assert run.why_stale("quantize", apply_quant_options(RunConfig(), **opts)) == \
        "its settings changed since (quantize.guard_images)"


def test_a_record_from_before_the_section_says_so(tmp_path):
    from edgexfer.runfolder import RunFolder

    run = RunFolder(tmp_path)
    cfg = RunConfig()
    run.mark_done("quantize", 1.0, cfg)
    rep = json.loads((tmp_path / "report.json").read_text())
    rep["stages"]["quantize"]["settings"] = {"quantize": "x", "max_accuracy_drop": "y", "target": "z"}
    (tmp_path / "report.json").write_text(json.dumps(rep))
    assert run.why_stale("quantize", cfg).startswith("recorded before edgexfer tracked each of its settings")


def test_the_cli_defaults_are_the_dataclasses():
    import click

    from edgexfer.cli import quant_options
    from edgexfer.exporters.quantize import Int8Recipe

    cmd = quant_options(click.command()(lambda **kw: None))
    d = {p.name: p.default for p in cmd.params}
    q, r = QuantizeConfig(), Int8Recipe()
    assert (d["target"], d["tuner"], d["calibration_data"], d["qat"], d["guard_data"], d["min_target_agreement"]) == \
        (q.target, q.tuner, q.calibration, q.qat, q.guard_data, q.min_target_agreement)
    assert (d["calibration_method"], d["calibration_samples"]) == (r.calibration_method, r.calibration_samples)
    assert d["max_accuracy_drop"] == RunConfig.max_accuracy_drop
