"""One source for every default: the CLI's training and quantize options read theirs from edgexfer/config.py's
dataclasses, and `build_config` with no options is the dataclasses' own RunConfig."""
from __future__ import annotations

import pytest

from edgexfer.config import (BenchConfig, DataConfig, ModelConfig, QuantizeConfig, RunConfig, TrainConfig,
                             build_config, resolve_image_size)

# option name -> (the config section's defaults, the field the option sets)
FIELDS = {
    "test_size": (DataConfig(), "test_size"), "seed": (DataConfig(), "seed"),
    "strict": (DataConfig(), "strict"), "follow_symlinks": (DataConfig(), "follow_symlinks"),
    "backbone": (ModelConfig(), "backbone"), "weights": (ModelConfig(), "weights"),
    "image_size": (ModelConfig(), "image_size"), "max_latency_ms": (ModelConfig(), "max_latency_ms"),
    "strategy": (TrainConfig(), "strategy"), "epochs": (TrainConfig(), "epochs"),
    "batch_size": (TrainConfig(), "batch_size"), "lr": (TrainConfig(), "lr"),
    "unfreeze_blocks": (TrainConfig(), "unfreeze_blocks"), "lr_decay": (TrainConfig(), "lr_decay"),
    "compare_scratch": (TrainConfig(), "scratch_baseline"), "adapt_bn": (TrainConfig(), "adapt_bn"),
    "threads": (BenchConfig(), "threads"),
    "target": (QuantizeConfig(), "target"), "tuner": (QuantizeConfig(), "tuner"),
    "calibration_data": (QuantizeConfig(), "calibration"), "qat": (QuantizeConfig(), "qat"),
    "min_target_agreement": (QuantizeConfig(), "min_target_agreement"), "guard_data": (QuantizeConfig(), "guard_data"),
    "calibration_method": (QuantizeConfig().recipe, "calibration_method"),
    "calibration_samples": (QuantizeConfig().recipe, "calibration_samples"),
    "max_accuracy_drop": (RunConfig(), "max_accuracy_drop"),
}


def _command(name):
    from edgexfer.cli import cli

    return cli.commands[name]


@pytest.mark.parametrize("command", ["run", "finetune"])
def test_cli_defaults_are_the_config_dataclasses(command):
    import click

    cmd = _command(command)
    ctx = click.Context(cmd)
    params = {p.name: p for p in cmd.params}
    checked = [n for n in FIELDS if n in params]
    assert {"backbone", "image_size", "strategy", "epochs", "lr", "seed"} <= set(checked)
    for name in checked:
        section, field = FIELDS[name]
        assert params[name].get_default(ctx) == getattr(section, field), f"--{name.replace('_', '-')} of `{command}`"


def test_build_config_without_options_is_the_dataclasses_config():
    assert build_config().to_dict() == resolve_image_size(RunConfig()).to_dict()
    assert RunConfig().model.backbone == "auto" and RunConfig().train.strategy == "auto"


def test_a_named_backbone_made_in_python_gets_its_auto_size_from_the_data():
    cfg = RunConfig(model=ModelConfig(backbone="efficientnet_lite0"))  # Fashion-MNIST: 28 px images
    assert resolve_image_size(cfg).model.image_size == 96 and "28x28" in cfg.model.image_size_reason
    assert resolve_image_size(RunConfig(model=ModelConfig(backbone="efficientnet_lite0", image_size=128))).model.image_size == 128
