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
    backbone: str = "auto"        # a name (edgexfer/backbones.py), or auto: the select stage chooses (and the size)
    weights: str = "imagenet"     # imagenet | none | path to a checkpoint
    image_size: int | str = "auto"  # pixels, or auto: the backbone's pretraining size for photos (resolve_image_size)
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


# TrainConfig settings added after run folders were made, and the value such a folder's run had
TRAIN_BEFORE = {"probe_cv_repeats": 1}
PHOTO_AUGMENTS = ("trivial", "jitter", "none")   # what colour photos get besides crop and flip (edgexfer/augment.py)
STRATEGIES = ("auto", "linear", "partial", "finetune", "lpft")


@dataclass
class TrainConfig:
    """The finetune stage's settings (edgexfer/finetune.py); the CLI's training options take their defaults
    from here."""
    strategy: str = "auto"          # auto | linear | partial | finetune | lpft (finetune.choose_strategy)
    epochs: int = 8                 # fine-tuning epochs
    batch_size: int = 32
    lr: float = 3e-4                # head learning rate; the backbone's last block gets lr * backbone_lr_mult
    backbone_lr_mult: float = 1.0
    lr_decay: float = 1.0           # layer-wise: each earlier block gets this times the next block's rate
    unfreeze_blocks: int = 3        # partial: how many of the backbone's last blocks train
    freeze_bn: bool = True          # BatchNorm statistics stay as pretrained (eval mode) while fine-tuning
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1    # of all fine-tuning steps
    probe_steps: int = 300          # full-batch AdamW steps of the linear probe
    probe_lr: float = 3e-3
    augment: bool = True            # fine-tuning augmentation, drawn anew every epoch (edgexfer/augment.py)
    photo_augment: str = "trivial"  # photos, besides RandomResizedCrop and flip: trivial (TrivialAugmentWide) | jitter | none
    crop_scale: float = 0.35        # photos: RandomResizedCrop's smallest fraction of the image's area
    patience: int = 4               # early stopping on validation accuracy
    seed: int = 0
    scratch_baseline: bool = False  # also train the same network from random init, same budget
    adapt_bn: str | None = None     # folder of unlabelled target-domain images: AdaBN after training
    adapt_bn_force: bool = False    # keep AdaBN's statistics even when the label-free checks say it hurt
    source_bn: bool = False         # BatchNorm statistics from the training images, not the pretraining data
    calibrate: bool = True          # temperature scaling: a T per head fitted on held-out logits, folded in (temperature.py)
    probe_views: int = 4            # the cross-validated probe also fits this many augmented views of each image
    probe_cv_repeats: int = 3       # the cross-validated probe's k folds are drawn this many times (probe.cv_candidate)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1]; got {self.lr_decay}")
        if self.unfreeze_blocks < 1:
            raise ValueError(f"unfreeze_blocks must be at least 1; got {self.unfreeze_blocks}")
        if self.photo_augment not in PHOTO_AUGMENTS:
            raise ValueError(f"unknown photo_augment {self.photo_augment!r}; choose one of {PHOTO_AUGMENTS}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale must be in (0, 1]; got {self.crop_scale}")
        if not isinstance(self.probe_cv_repeats, int) or self.probe_cv_repeats < 1:
            raise ValueError(f"probe_cv_repeats must be an integer of at least 1; got {self.probe_cv_repeats!r}")


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
    "search_unprovable": ("EDGEXFER_SEARCH_UNPROVABLE", lambda v: v == "1"),
    "min_speedup": ("EDGEXFER_MIN_SPEEDUP", float),
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
    # search for an INT8 file within the bound even where the images that would certify it cannot prove any
    # (guard.unprovable): by default plain INT8 is written and measured instead, unproven (quantize_stage)
    search_unprovable: bool = False
    # INT8 worth shipping is at least this many times FP32's batch-1 speed, where this host is the target:
    # the guard's search leaves out candidates estimated slower, QAT is tried when the PTQ choice is slower and
    # sits out when plain INT8 is (0: the search tries every candidate, and QAT competes only where no PTQ
    # candidate is within the bound; benchmarks/bench_early_stop.py measures the estimate)
    min_speedup: float = 1.2

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
FORMATS = ("openvino", "executorch", "litert")  # what the convert stage writes besides ONNX (edgexfer/exporters/)

_MOVED_TO_QUANTIZE = ("target", "tuner", "extra_formats", "calibration", "min_target_agreement", "qat", "guard_data")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    max_accuracy_drop: float = 0.01  # the run's accuracy bound: the guard (quantize), evaluate and the report
    formats: tuple = ()  # besides ONNX, the formats the convert stage writes each model in (FORMATS)

    def __post_init__(self):
        self.formats = tuple(self.formats)
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format {unknown[0]!r}; choose from onnx, {', '.join(FORMATS)}")

    def __setattr__(self, name, value):
        if name in _MOVED_TO_QUANTIZE:  # an old name would be set and read by nobody
            raise AttributeError(f"RunConfig.{name} is RunConfig.quantize.{name}")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {"edgexfer": __version__, "data": asdict(self.data), "model": asdict(self.model),
                "train": asdict(self.train), "quantize": self.quantize.to_dict(), "bench": asdict(self.bench),
                "max_accuracy_drop": self.max_accuracy_drop, "formats": list(self.formats)}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        # a setting a config.json predates loads as the value its run had, not today's default, so that a run folder
        # made before it is resumed only under the key that made it (training_key)
        train = {**TRAIN_BEFORE, **d["train"]}
        return cls(data=DataConfig(**d["data"]), model=ModelConfig(**d["model"]), train=TrainConfig(**train),
                   quantize=QuantizeConfig.from_dict(d), bench=BenchConfig(**d["bench"]),
                   max_accuracy_drop=d.get("max_accuracy_drop", cls.max_accuracy_drop),
                   formats=tuple(d.get("formats", ())))

    def training_key(self) -> dict:
        """What determines the checkpoint: a run folder may be resumed only under the same key."""
        d = self.to_dict()
        d["model"].pop("image_size_reason", None)  # what the size is matters, not how it was worded
        return {k: d[k] for k in ("data", "model", "train")}


_D, _M, _T, _B = DataConfig(), ModelConfig(), TrainConfig(), BenchConfig()


def build_config(*, data: str | None = _D.source, shots: int | None = None, all_labels: bool = False,
                 test_size: int | None = _D.test_size, seed: int = _D.seed, strict: bool = _D.strict,
                 follow_symlinks: bool = _D.follow_symlinks, backbone: str = _M.backbone, weights: str = _M.weights,
                 image_size: int | str = _M.image_size, max_latency_ms: float | None = _M.max_latency_ms,
                 strategy: str = _T.strategy, epochs: int = _T.epochs, batch_size: int = _T.batch_size,
                 lr: float = _T.lr, unfreeze_blocks: int = _T.unfreeze_blocks, lr_decay: float = _T.lr_decay,
                 compare_scratch: bool = _T.scratch_baseline, adapt_bn: str | None = _T.adapt_bn,
                 adapt_bn_force: bool = _T.adapt_bn_force, no_calibrate: bool = not _T.calibrate,
                 threads: int = _B.threads) -> RunConfig:
    """The RunConfig of the training options (`edgexfer run/finetune/curve`; their defaults are this module's):
    checked before anything is read or written, paths made absolute, `--image-size auto` resolved for a named
    backbone (`resolve_image_size`; with `--backbone auto` the select stage sizes each candidate)."""
    from pathlib import Path

    from edgexfer.backbones import get_backbone_info
    from edgexfer.errors import EdgexferError

    if backbone != "auto":
        info = get_backbone_info(backbone)  # unknown names fail here, before any data is read
        if weights == "imagenet" and not info.offline():  # weights not in the cache: the backbone's own error
            from edgexfer.backbones import build_backbone  # (naming the file and the folder), before anything

            build_backbone(backbone, weights="imagenet")  # is written (it downloads them where it can)
        if max_latency_ms is not None:
            raise EdgexferError("--max-latency-ms goes with --backbone auto")
    elif weights != "imagenet":
        raise EdgexferError(f"--backbone auto compares ImageNet-pretrained backbones; with --weights {weights}, name "
                            "the backbone they belong to (--backbone NAME)")
    if adapt_bn_force and not adapt_bn:
        raise EdgexferError("--adapt-bn-force goes with --adapt-bn DIR")
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise EdgexferError(f"weights file not found: {weights}")
    if data is not None and not Path(data).is_dir():
        if not Path(data).is_file():
            raise EdgexferError(f"data folder or CSV file not found: {data}")
        if not data.lower().endswith(".csv"):
            raise EdgexferError(f"--data takes a folder or a .csv file; got {data}")
    if all_labels or (shots is None and data is not None):
        shots = None   # a user's own labelled images: every one of them
    elif shots is None:
        shots = _D.shots  # the Fashion-MNIST demo: 100 labels per class
    cfg = RunConfig(
        data=DataConfig(source=str(Path(data).resolve()) if data else None, shots=shots,
                        test_size=test_size, seed=seed, strict=strict, follow_symlinks=follow_symlinks),
        model=ModelConfig(backbone=backbone, weights=str(Path(weights).resolve()) if weights not in ("imagenet", "none") else weights,
                          image_size=image_size, max_latency_ms=max_latency_ms,
                          image_size_reason=None if image_size == "auto" else f"--image-size {image_size}"),
        train=TrainConfig(strategy=strategy, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                          scratch_baseline=compare_scratch, unfreeze_blocks=unfreeze_blocks, lr_decay=lr_decay,
                          adapt_bn=str(Path(adapt_bn).resolve()) if adapt_bn else None, source_bn=bool(adapt_bn),
                          adapt_bn_force=adapt_bn_force, calibrate=not no_calibrate),
        bench=BenchConfig(threads=threads),
    )
    return resolve_image_size(cfg)


def resolve_image_size(cfg: RunConfig) -> RunConfig:
    """`--image-size auto` with a named backbone: its pretraining size for photos, smaller for small images (the
    headers of a seeded sample of the data: `data.auto_image_size`); with `--backbone auto` the select stage sizes
    each candidate and this only records why. A config whose size is a number is returned as it is."""
    m = cfg.model
    if m.image_size == "auto" and m.backbone == "auto":
        m.image_size_reason = "chosen with the backbone (--backbone auto)"
    elif m.image_size == "auto":
        from edgexfer.backbones import get_backbone_info
        from edgexfer.data import auto_image_size

        m.image_size, m.image_size_reason = auto_image_size(cfg.data.source, get_backbone_info(m.backbone).default_size,
                                                            seed=cfg.data.seed, follow_symlinks=cfg.data.follow_symlinks)
    return cfg
