"""A run's configuration: what `config.json` in a run folder holds (`RunConfig.to_dict`), by section."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from edgexfer import __version__


@dataclass
class DataConfig:
    source: str | None = None     # None: the offline Fashion-MNIST default; else an ImageFolder path
    shots: int | None = 100       # labelled images per class, validation included (None: all; the CLI's
                                  # default with --data: a user's own images are all used)
    val_fraction: float = 0.2
    test_size: int | None = 2000  # Fashion-MNIST: test images (stratified); None: all 10,000
    test_fraction: float = 0.2    # ImageFolder without ready-made splits
    seed: int = 0
    strict: bool = False          # refuse corrupt images instead of skipping them
    follow_symlinks: bool = False  # follow symbolic links out of the data folder (else skipped and counted)


@dataclass
class ModelConfig:
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"     # imagenet | none | path to a checkpoint
    image_size: int = 96
    dropout: float = 0.2
    image_size_reason: str | None = None  # why --image-size auto chose image_size
    requested_backbone: str | None = None  # "auto": backbone and image_size were chosen (backbone_selection.json)
    max_latency_ms: float | None = None    # --backbone auto: only backbones this fast at batch 1 on this host


@dataclass
class BenchConfig:
    threads: int = 2
    iters: int = 200
    warmup: int = 20
    batch: int = 32
    pytorch_reference: bool = True


# The environment variables that change what the quantize stage writes, and the QuantizeConfig field each
# sets. They are read once, where the CLI builds the config (`QuantizeConfig.with_environment`), never at import
# time, so config.json records them and changing one marks the quantize stage stale.
QUANTIZE_ENVIRONMENT = {
    "guard_images": ("EDGEXFER_GUARD_IMAGES", int),
    "guard_max_mb": ("EDGEXFER_GUARD_MAX_MB", float),
    "rank_images": ("EDGEXFER_RANK_IMAGES", int),
    "arm64_guard_samples": ("EDGEXFER_ARM64_GUARD_SAMPLES", int),
    "qat_epochs": ("EDGEXFER_QAT_EPOCHS", int),
    "qat_views": ("EDGEXFER_QAT_VIEWS", int),
    "qat_max_images": ("EDGEXFER_QAT_MAX_IMAGES", int),
    "qat_force": ("EDGEXFER_QAT_FORCE", lambda v: v == "1"),
}


@dataclass
class QuantizeConfig:
    """The quantize stage's settings: the INT8 recipe, the accuracy guard's and QAT's. The CLI's quantize
    options take their defaults from here (edgexfer/cli.py `quant_options`)."""
    recipe: Any = None              # exporters.quantize.Int8Recipe (imported lazily)
    target: str = "host"            # host | avx2 | avx512 | avx512_vnni | arm64 (the INT8 recipe)
    tuner: str = "auto"             # auto | inc | builtin: who searches for an INT8 file within the bound
    extra_formats: tuple = ()       # also write "fp16" and/or "int8_dynamic"
    calibration: str = "auto"       # auto | train | adapt-bn: which images set the INT8 ranges
    min_target_agreement: float = 0.90  # with --adapt-bn: INT8/FP32 top-1 agreement on the target images
    qat: str = "auto"               # auto | off: quantization-aware fine-tuning when PTQ misses (edgexfer/qat.py)
    guard_data: str | None = None   # unlabelled images of the domain the INT8 guard measures on (edgexfer/guard.py)
    # what EDGEXFER_* variables set (QUANTIZE_ENVIRONMENT)
    guard_images: int = 1000        # the guard's agreement set: at least this many images (augmented views fill it)
    guard_max_mb: float = 768.0     # ...held in memory in at most this many MiB of float32
    rank_images: int = 128          # calibration images the sensitivity ranking measures each layer on
    arm64_guard_samples: int = 100  # validation images the emulated arm64 guard scores (emulation is ~250x slower)
    qat_epochs: int = 2             # quantization-aware fine-tuning epochs
    qat_views: int = 256            # augmented views (unlabelled) QAT distils on
    qat_max_images: int = 1024      # labelled images QAT trains on (a seeded sample beyond)
    qat_force: bool = False         # try QAT whatever the post-training choice (tests, benchmarks)

    def __post_init__(self):
        if self.recipe is None:
            from edgexfer.exporters.quantize import Int8Recipe
            self.recipe = Int8Recipe()
        self.extra_formats = tuple(self.extra_formats)

    @property
    def guard_max_bytes(self) -> int:
        return int(self.guard_max_mb * 2**20)

    def with_environment(self, environ: Mapping[str, str] | None = None) -> "QuantizeConfig":
        """This config with the EDGEXFER_* variables of `environ` (default: os.environ) that are set applied
        (QUANTIZE_ENVIRONMENT); the others keep this config's values."""
        environ = os.environ if environ is None else environ
        return replace(self, **{k: parse(environ[var]) for k, (var, parse) in QUANTIZE_ENVIRONMENT.items()
                                if environ.get(var) not in (None, "")})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "recipe": self.recipe.to_dict(), "extra_formats": list(self.extra_formats)}

    @classmethod
    def from_dict(cls, run: dict) -> "QuantizeConfig":
        """The section of a config.json (`run`, the whole file). Before this section, config.json held the INT8
        recipe under "quantize" and the other quantize settings at its top level: those files load too, with
        the environment's settings at their defaults (which is what they were unless a variable was set)."""
        from edgexfer.exporters.quantize import Int8Recipe

        q = dict(run.get("quantize") or {})
        if "recipe" not in q:  # the layout before QuantizeConfig
            q = {"recipe": q, **{k: run[k] for k in ("target", "tuner", "extra_formats", "calibration",
                                                      "min_target_agreement", "qat", "guard_data") if k in run}}
        r = dict(q.pop("recipe"))
        r["nodes_to_exclude"] = tuple(r.get("nodes_to_exclude", ()))
        r["extra_options"] = tuple(r.get("extra_options", {}).items())
        return cls(recipe=Int8Recipe(**r), **q)


# quantize settings that were RunConfig's own before QuantizeConfig: now under RunConfig.quantize
_MOVED_TO_QUANTIZE = ("target", "tuner", "extra_formats", "calibration", "min_target_agreement", "qat", "guard_data")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: Any = None             # finetune.TrainConfig (imported lazily: torch)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    max_accuracy_drop: float = 0.01  # the run's accuracy bound: the guard (quantize), evaluate and the report

    def __post_init__(self):
        if self.train is None:
            from edgexfer.finetune import TrainConfig
            self.train = TrainConfig()

    def __setattr__(self, name, value):
        if name in _MOVED_TO_QUANTIZE:  # an old name would be set and read by nobody
            raise AttributeError(f"RunConfig.{name} is RunConfig.quantize.{name}")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {"edgexfer": __version__, "data": asdict(self.data), "model": asdict(self.model),
                "train": asdict(self.train), "quantize": self.quantize.to_dict(), "bench": asdict(self.bench),
                "max_accuracy_drop": self.max_accuracy_drop}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        from edgexfer.finetune import TrainConfig

        return cls(data=DataConfig(**d["data"]), model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]),
                   quantize=QuantizeConfig.from_dict(d), bench=BenchConfig(**d["bench"]),
                   max_accuracy_drop=d.get("max_accuracy_drop", cls.max_accuracy_drop))

    def training_key(self) -> dict:
        """What determines the checkpoint: a run folder may be resumed only under the same key."""
        d = self.to_dict()
        d["model"].pop("image_size_reason", None)  # what the size is matters, not how it was worded
        return {k: d[k] for k in ("data", "model", "train")}
