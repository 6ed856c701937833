"""A run's configuration: what `config.json` in a run folder holds (`RunConfig.to_dict`), by section."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: Any = None             # finetune.TrainConfig (imported lazily: torch)
    quantize: Any = None          # exporters.quantize.Int8Recipe
    bench: BenchConfig = field(default_factory=BenchConfig)
    max_accuracy_drop: float = 0.01
    target: str = "host"            # host | avx2 | avx512 | avx512_vnni | arm64 (the INT8 recipe)
    tuner: str = "auto"             # auto | inc | builtin: who searches for an INT8 file within the bound
    extra_formats: tuple = ()       # also write "fp16" and/or "int8_dynamic"
    calibration: str = "auto"       # auto | train | adapt-bn: which images set the INT8 ranges
    min_target_agreement: float = 0.90  # with --adapt-bn: INT8/FP32 top-1 agreement on the target images
    qat: str = "auto"               # auto | off: quantization-aware fine-tuning when PTQ misses (edgexfer/qat.py)
    guard_data: str | None = None   # unlabelled images of the domain the INT8 guard measures on (edgexfer/guard.py)

    def __post_init__(self):
        if self.train is None:
            from edgexfer.finetune import TrainConfig
            self.train = TrainConfig()
        if self.quantize is None:
            from edgexfer.exporters.quantize import Int8Recipe
            self.quantize = Int8Recipe()

    def to_dict(self) -> dict:
        return {"edgexfer": __version__, "data": asdict(self.data), "model": asdict(self.model),
                "train": asdict(self.train), "quantize": self.quantize.to_dict(), "bench": asdict(self.bench),
                "max_accuracy_drop": self.max_accuracy_drop, "target": self.target, "tuner": self.tuner,
                "extra_formats": list(self.extra_formats), "calibration": self.calibration,
                "min_target_agreement": self.min_target_agreement, "qat": self.qat, "guard_data": self.guard_data}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        from edgexfer.exporters.quantize import Int8Recipe
        from edgexfer.finetune import TrainConfig

        q = dict(d["quantize"])
        q["nodes_to_exclude"] = tuple(q.get("nodes_to_exclude", ()))
        q["extra_options"] = tuple(q.get("extra_options", {}).items())
        return cls(DataConfig(**d["data"]), ModelConfig(**d["model"]), TrainConfig(**d["train"]),
                   Int8Recipe(**q), BenchConfig(**d["bench"]), d.get("max_accuracy_drop", 0.01),
                   d.get("target", "host"), d.get("tuner", "auto"), tuple(d.get("extra_formats", ())),
                   d.get("calibration", "auto"), d.get("min_target_agreement", 0.90), d.get("qat", "auto"),
                   d.get("guard_data"))

    def training_key(self) -> dict:
        """What determines the checkpoint: a run folder may be resumed only under the same key."""
        d = self.to_dict()
        d["model"].pop("image_size_reason", None)  # what the size is matters, not how it was worded
        return {k: d[k] for k in ("data", "model", "train")}
