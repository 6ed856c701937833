"""The quantize stage: model.onnx -> model.int8.onnx under the accuracy guard, and the policy around it
(which images calibrate, which score, the arm64 emulation, Intel Neural Compressor)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from edgexfer.bounds import within
from edgexfer.config import RunConfig
from edgexfer.errors import RunFolderError
from edgexfer.guard import (Judge, Scorer, agreement_judge, guard_decision, guarded_quantize, images_needed,
                            shipped_row, unprovable, verdict)
from edgexfer.runfolder import FILES, RunFolder, Stage, Workspace, stage

log = logging.getLogger(__name__)


@stage("quantize")
def quantize(st: Stage) -> dict:
    """The quantize stage, `quantize(run_dir, cfg=None, ws=None)` (`runfolder.stage`; `pipeline.quantize` runs it
    on a disk with room for it). model.onnx -> model.int8.onnx: static INT8 QDQ calibrated on training images,
    under the accuracy guard.

    The guard (`edgexfer.guard`) keeps the layers INT8 hurts most in FP32 until INT8 gives FP32's top-1 on all but
    `max_accuracy_drop` of an agreement set of images the model was not fitted on (`guard.agreement_set`: the
    labelled images out of fold when the cross-validated probe was refitted on all of them, else the validation
    split; --guard-data and --adapt-bn images; augmented views of those): an accuracy drop cannot exceed the
    disagreement rate. Half of those images choose among the candidates, the other half certify the choice
    (`guard.search_and_certify`). The labelled images' paired drop is recorded beside it and rejects a candidate
    only when significant; the record says whether the rate's 95% upper bound proves the bound (`guard.proven`)
    and whether the file ships (`guard.shippable`, `guard.verdict`: what `recommend` and `bundle` read).
    """
    from edgexfer.exporters.quantize import convert_fp16, quantize, quantize_dynamic_int8, recipe_for
    from edgexfer.exporters import e2e as _e2e
    from edgexfer.data import list_images
    from edgexfer.guard import (Agreement, agreement_set, describe, fp32_stability, search_and_certify, summarize,
                                target_set)

    run, cfg, ws = st.run, st.cfg, st.ws
    qc = cfg.quantize
    fp32 = run.require(FILES["fp32"], "export")
    recipe, target = recipe_for(qc.target, qc.recipe)
    emulated = _arm64_emulation(target)
    if target.get("warning"):
        log.warning("target %s: %s", target["target"], target["warning"])
    st.begin()
    calib, calibrated_on = calibration_set(cfg, ws, recipe.calibration_samples)
    xv, yv = ws.tensors("val")
    # with --adapt-bn the model is for the target domain, which has no labels: how often INT8 gives FP32's
    # top-1 on its unlabelled images is checked (by the guard, then for the record)
    agree = agreement_with(fp32, target_images(cfg, ws), cfg.bench.threads) if cfg.train.adapt_bn else None
    if len(yv) and emulated:  # the target's own figure decides (a labelled sample: emulation is slow)
        rec = _arm64_guard(cfg, fp32, run.file(FILES["int8"]), recipe, calib, xv, yv)
    elif len(ws.dataset.train) + len(yv):
        adapted = bool(cfg.train.adapt_bn and (run.report().get("adaptation") or {}).get("kept"))
        folds = None if adapted else probe_folds(run)
        if adapted:  # the model is for the target domain now: its images decide, the source's labels do not
            files = list_images(cfg.train.adapt_bn, follow_symlinks=cfg.data.follow_symlinks)
            xg, rows, info = target_set(target_images(cfg, ws, qc.guard_images), files, ws.preprocessing,
                                        seed=cfg.data.seed, order=target_order(cfg, len(files)),
                                        min_images=qc.guard_images, max_bytes=qc.guard_max_bytes)
        else:
            unlabelled, sources = unlabelled_images(cfg, ws)
            xg, rows, info = agreement_set(ws, unlabelled, seed=cfg.data.seed, out_of_fold=folds is not None,
                                           min_images=qc.guard_images, max_bytes=qc.guard_max_bytes)
            info["unlabelled_from"] = sources
        labels = np.concatenate([ws.tensors("train")[1], yv])
        # the search chooses on some images, the chosen file is certified on the others (guard.search_and_certify)
        split = search_and_certify(rows, len(labels) if not adapted else 0, seed=cfg.data.seed)
        def scorer(m):  # FP32 scores 1.0 against its own top-1
            return Agreement(fp32, xg if m is None else xg[m], rows if m is None else rows[m], labels=labels,
                             threads=cfg.bench.threads, **(folds or {}))

        full = scorer(None)
        # the search chooses among files one of which should ship: where even a file that never disagrees with
        # FP32 could not be proven on the images that would certify its choice, none can, so there is no search;
        # plain INT8 alone is written, and with no choice to bias it, every unseen image measures and certifies it
        skip = None if qc.search_unprovable else search_skipped(len(split[1]) if split else full.images, full.images,
                                                                cfg, info, adapted)
        if split and not skip:  # FP32's outputs on each half are sliced from the whole set's, not run again
            agreement, certify = (full.only(fp32, ids) for ids in split)
        else:
            agreement = certify = full
        stability = fp32_stability(fp32, xg, ws.preprocessing, cfg.bench.threads, seed=cfg.data.seed, ref=full.top1)
        info["certified"] = bool(split) and not skip
        info["certified_on"] = (f"{certify.images} of the {full.images} images, held out of the search that chose "
                                f"among the candidates on the other {agreement.images}" if info["certified"] else
                                f"all {full.images} images: no search chose among files (none could be proven), "
                                f"so none is held out" if skip else
                                "the images the search chose on (too few to hold some out): biased low")
        del full
        del xg
        held_out = info["labelled"] if info["labelled_from"] in ("out-of-fold", "validation") else 0
        evidence = agreement.evidence if held_out and agreement.labelled().any() else None
        # INC tunes one accuracy only, so with a second bound it sits this out
        at_least = ("target_agreement", agree, qc.min_target_agreement) if agree else None
        judge = agreement_judge(agreement, cfg.max_accuracy_drop, evidence=evidence, target=at_least)
        rec = (_inc_quantize(run, cfg, fp32, recipe, calib, agreement.x, judge)
               if qc.tuner != "builtin" and at_least is None and not skip else None)
        if skip:
            rec = guarded_quantize(fp32, run.file(FILES["int8"]), calib, recipe, judge, fallback="none")
            # the advice, now that plain INT8's rate on these images is known
            skip = search_skipped(skip["images"], certify.images, cfg, info, adapted,
                                  rate=certify.detail(run.file(FILES["int8"]))["rate"])
            log.warning("accuracy guard: %s", skip["why"])
            rec["guard"].update(tuner="none: plain INT8, not searched", search_skipped=skip)
        elif rec is None or not rec["guard"]["within_bound"]:
            inc = rec["guard"].get("inc") if rec else None
            # where this host is the target (its speed is the target's), candidates too slow to be worth shipping
            # are not tried
            rec = guarded_quantize(fp32, run.file(FILES["int8"]), calib, recipe, judge, rank_images=qc.rank_images,
                                   stop_below=qc.min_speedup if target["target"] == target["host"] and qc.min_speedup > 0
                                   else None)
            rec["guard"]["tuner"] = "built-in: the layers INT8 hurts most kept in FP32"
            if inc:
                rec["guard"]["inc"] = inc
        g = rec["guard"]
        g["host_is_target"] = target["target"] == target["host"]  # QAT reads it: may this host's speed decide?
        # QAT trains on the train split: it is judged (and certified) on the images it did not train on. After a
        # kept --adapt-bn it distils on the search half's target images only, and the certify half judges it
        distil_on = None
        if not adapted:
            trained = np.arange(len(ws.tensors("train")[0]))
            qat_agreement = agreement.without(fp32, trained) if agreement.out_of_fold else agreement
            qat_certify = certify
            if certify.out_of_fold:  # a QAT file is certified on the certify images it did not train on (those
                qat_certify = certify.without(fp32, trained)  # of the search set where none is left)
                qat_certify = qat_certify if qat_certify is not None else qat_agreement
        elif split:
            distil_on = split[0]
            qat_agreement = qat_certify = certify if not skip else certify.only(fp32, split[1])
        else:  # every target image would be one it distilled on: none is left to judge it
            qat_agreement = qat_certify = None
        # where even a QAT file that never disagrees with FP32 could not be proven on the images that would
        # certify it, QAT (minutes of training) cannot make an INT8 file worth shipping
        no_proof = unprovable(qat_certify.images if qat_certify is not None else 0, cfg.max_accuracy_drop,
                              fitted=bool(info.get("fitted")))
        # a proven post-training file is replaced only by a QAT file that its own certificate proves too
        ptq_proven = (bool(g["within_bound"]) and not info.get("fitted")
                      and within(certify.detail(run.file(FILES["int8"]))["upper95"], cfg.max_accuracy_drop))
        proves = ((lambda path: qat_certify is not None
                   and within(qat_certify.detail(path)["upper95"], cfg.max_accuracy_drop)) if ptq_proven else None)
        rec, shipped_qat = _qat(run, cfg, ws, fp32, recipe, calib, rec, qat_agreement, at_least, adapted,
                                no_proof=no_proof, proves=proves, distil_on=distil_on)
        if shipped_qat and (certify.out_of_fold or adapted):
            certify = qat_certify
            info = {**info, "qat_judged_on": f"{certify.images} images QAT did not train on"}
        held = int(certify.labelled().sum()) if held_out else 0
        fp32_val = certify.fp32_accuracy() if held else None
        shipped = {**shipped_row(g), **(certify.evidence(run.file(FILES["int8"])) if held else {})}
        g["guard_set"] = describe(info) + " (top-1 agreement with FP32)"
        g["host_measures_faithfully"] = target["host_measures_faithfully"]
        g["fp32_stability"] = stability
        summarize(g, info, certify.detail(run.file(FILES["int8"])), held, fp32_val, shipped,
                  **({"no_labelled": "the labelled images are of the source domain, which the adapted model is no "
                                     "longer for: not used"} if adapted else {}))
        if stability["agreement"] < 1 - cfg.max_accuracy_drop:
            note = (f"FP32 itself gives its own top-1 again on only {stability['agreement']:.1%} of these images when "
                    f"every pixel moves by up to half a level: below the {1 - cfg.max_accuracy_drop:.0%} agreement "
                    f"the bound asks, so the bound asks INT8 to reproduce differences smaller than a decoder's rounding")
            g["confidence"] += " " + note[0].upper() + note[1:] + "."
            # near-ties decide those answers, in FP32 too; an adapted model's statistics can make many of them
            (log.warning if adapted else log.info)("%s%s", note, " (the adapted BatchNorm statistics amplify "
                                                                 "sub-level differences)" if adapted else "")
        log.info("accuracy guard (%s): %d of %d weighted layers kept in FP32; %s", g["tuner"], g["chosen_fp32_layers"],
                 g["quantizable_layers"], g["confidence"])
    else:
        log.warning("no labelled images: quantizing without the accuracy guard")
        rec = quantize(fp32, run.file(FILES["int8"]), calib, recipe)
    if rec.get("guard"):  # the guard's last word, written once: recommend and bundle read it
        rec["guard"].update(verdict(rec["guard"]))
    rec["calibrated_on"] = calibrated_on
    if agree:
        rec["target_agreement"] = target_agreement(cfg, agree, len(target_images(cfg, ws)), run.file(FILES["int8"]))
    rec["target"] = target
    rec["e2e"] = _e2e.write_beside(run.file(FILES["int8"]))  # model.int8.e2e.onnx: preprocessing in the graph
    out = {"quantize": rec}
    if "fp16" in qc.extra_formats:
        out["quantize_fp16"] = convert_fp16(fp32, run.file(FILES["fp16"]))
    if "int8_dynamic" in qc.extra_formats:
        out["quantize_dynamic"] = quantize_dynamic_int8(fp32, run.file(FILES["int8_dynamic"]))
    st.report(**out)
    return rec


def search_skipped(certify: int, unseen: int, cfg: RunConfig, info: dict, adapted: bool = False,
                   rate: float | None = None) -> dict | None:
    """Why the guard's search for an INT8 file within the bound is not run (None: it is): `guard.unprovable` of
    the `certify` images that would certify the file it chose (half the `unseen` ones, `guard.search_and_certify`,
    or all of them where too few to split). Without a search plain INT8 is certified on all `unseen` images.
    The record says about how many more unseen images would let a file be proven, from plain INT8's measured
    disagreement `rate` over them once known (None: before, as if it disagreed on none): within the bound, the
    certificate that rate needs (`guard.images_needed`); over it, the images a search needs for its choice to be
    provable on the half that certifies it (about twice as many); and whether the guard's limits hold that many
    (`info`: the agreement set's, `guard.agreement_set`/`target_set`). EDGEXFER_SEARCH_UNPROVABLE=1
    (`QuantizeConfig.search_unprovable`) runs the search anyway."""
    from edgexfer.guard import CERTIFY_SHARE

    bound = cfg.max_accuracy_drop
    no = unprovable(certify, bound, fitted=bool(info.get("fitted")))
    if not no:
        return None
    where = "in the --adapt-bn folder" if adapted else "of the domain (--guard-data DIR)"
    need, what = no.get("images_needed"), "plain INT8 be proven, if it disagrees with FP32 on none of them"
    if rate is not None and rate > 0 and need:
        if within(rate, bound):
            need, what = images_needed(rate, bound, unseen), f"plain INT8 be proven at the rate it measured ({rate:.1%})"
        else:  # a search must keep layers in FP32, and half the images certify its choice (each half rounds)
            need = int(np.ceil(need / CERTIFY_SHARE)) + 2
            what = (f"the search run (plain INT8 disagrees with FP32 on {rate:.1%} of them, over the bound) and its "
                    f"choice be proven, if that disagrees on none of the half that certifies it")
    more = max(0, need - unseen) if need and not info.get("fitted") else None
    how = (f"about {more} more unlabelled photos {where} would let {what}" if more else
           "they prove plain INT8" if more == 0 else f"unlabelled photos {where} would let a file be proven")
    per_image = info.get("bytes", 0) / max(info.get("images", 0), 1)
    room = min(int(info.get("labelled") or 0) + cfg.quantize.guard_images,
               int(info["max_bytes"] // per_image) if per_image and info.get("max_bytes") else 10**9)
    if more and need > room:
        how += (f" (the guard holds at most {room} unseen images at these settings: EDGEXFER_GUARD_IMAGES and "
                f"EDGEXFER_GUARD_MAX_MB raise that)")
    return {**no, "unseen": int(unseen), "more_images_needed": more, "plain_int8_rate": rate,
            "short": f"not searched: no INT8 file can be proven on the {certify} images that would certify a search's "
                     f"choice; {how}",
            "why": f"no INT8 file can be proven within the {bound:.1%} bound on the {certify} images that would "
                   f"certify a search's choice ({no['why']}), so the search among INT8 candidates was not run: plain "
                   f"INT8 was written and measured on all {unseen} unseen images, unproven unless they prove it; "
                   f"{how} (EDGEXFER_SEARCH_UNPROVABLE=1 searches anyway)"}


def _qat(run, cfg, ws, fp32, recipe, calib, rec, agreement, at_least, adapted: bool = False,
         no_proof: dict | None = None, proves: Callable[[Path], bool] | None = None,
         distil_on: np.ndarray | None = None) -> tuple[dict, bool]:
    """Quantization-aware fine-tuning as one more candidate (edgexfer/qat.py: when it runs and when it ships),
    judged like the post-training ones (`guard.agreement_judge`) on `agreement` (a `guard.Agreement` over images
    QAT does not train on, or None when there is none); records guard.qat and returns the quantize record of what
    ships, and whether QAT shipped. `no_proof`: `guard.unprovable` of the images a QAT file would be certified on
    (`qat.compete`'s last reason not to train); `proves`: where the post-training file is proven, whether a QAT
    file's own certificate proves it (one that does not, does not replace it)."""
    from edgexfer.qat import compete

    g = rec["guard"]
    if agreement is None:
        g["qat"] = {"tried": False, "reason": "every target image the guard measures on would be one QAT distils on "
                                              "(too few to hold some out): none left to judge it on; more images in "
                                              "the --adapt-bn folder give some" if adapted else
                                              "every image the guard measures on is one QAT would train on (the "
                                              "out-of-fold training images): none left to judge it on; --guard-data "
                                              "DIR gives some"}
        return rec, False
    evidence = agreement.evidence if agreement.labelled().any() else None
    judge = agreement_judge(agreement, cfg.max_accuracy_drop, evidence=evidence, target=at_least)
    g["qat"], shipped = compete(run, cfg, ws, fp32, recipe, calib, g, judge, adapted=adapted, no_proof=no_proof,
                                proves=proves, distil_on=distil_on)
    if shipped is None:
        return rec, False
    row = g["qat"]["row"]
    g.update(tuner=g.get("tuner", "") + "; then quantization-aware fine-tuning (shipped)", within_bound=True,
             shipped_accuracy=row["guard_accuracy"], chosen_fp32_layers=0, layers_kept_fp32=[],
             decision=row.get("decision"))
    return {**shipped, "guard": g}, True


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


def probe_folds(run: RunFolder) -> dict | None:
    """The cross-validated probe's fold heads and the refitted head they stand in for, from the checkpoint
    ({"folds", "head"} for `guard.Agreement`), or None (no cross-validated probe; fine-tuned; adapted)."""
    import torch

    payload = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    folds = payload.get("probe_folds")
    if not folds:
        return None
    task = next(iter(payload["model_config"]["tasks"]))
    sd = payload["state_dict"]
    return {"folds": {k: v.numpy().astype(np.float64) if v.is_floating_point() else v.numpy()
                      for k, v in folds.items()},
            "head": (sd[f"heads.{task}.weight"].double().numpy(), sd[f"heads.{task}.bias"].double().numpy())}


def unlabelled_images(cfg: RunConfig, ws: Workspace) -> tuple[np.ndarray | None, list[str]]:
    """The images of the domain that no stage fitted, besides the labelled splits, preprocessed, and where they
    came from: --guard-data's, the labelled images --shots left out (their labels unused), each a seeded sample
    of up to `QuantizeConfig.guard_images` in all, and --adapt-bn's when the adaptation was not kept; (None, [])
    when there are none."""
    from edgexfer.data import list_images
    from edgexfer.runtime.preprocess import preprocess

    parts, sources = [], []

    def sample(images: list, what: str) -> None:
        order = np.random.default_rng(cfg.data.seed).permutation(len(images))[:cfg.quantize.guard_images - sum(map(len, parts))]
        if len(order):
            parts.append(np.stack([preprocess(images[i], ws.preprocessing) for i in order]))
            sources.append(f"{len(order)} {what}")

    if cfg.quantize.guard_data:
        files = list_images(cfg.quantize.guard_data, follow_symlinks=cfg.data.follow_symlinks)
        if not files:
            raise RunFolderError(f"--guard-data {cfg.quantize.guard_data}: no images found")
        sample(files, "from --guard-data")
    unused = ws.dataset.unused
    if unused is not None and len(unused):
        sample(list(unused.images), "left out by --shots")
    if cfg.train.adapt_bn:
        parts.append(target_images(cfg, ws))
        sources.append(f"{len(parts[-1])} from --adapt-bn")
    return (np.concatenate(parts) if parts else None), sources


TARGET_IMAGES = 500  # of the --adapt-bn folder, for the agreement check


def target_order(cfg: RunConfig, n: int) -> np.ndarray:
    """The seeded order in which the --adapt-bn folder's `n` image files are taken."""
    return np.random.default_rng(cfg.data.seed).permutation(n)


def target_images(cfg: RunConfig, ws: Workspace, limit: int = TARGET_IMAGES) -> np.ndarray:
    """Up to `limit` of the run's --adapt-bn images in a seeded random order, preprocessed (once per run)."""
    from edgexfer.data import list_images
    from edgexfer.runtime.preprocess import preprocess

    def load() -> tuple[np.ndarray, bool]:  # the images, and whether they are all of the folder's
        files = list_images(cfg.train.adapt_bn, follow_symlinks=cfg.data.follow_symlinks)
        order = target_order(cfg, len(files))[:max(limit, TARGET_IMAGES)]
        return np.stack([preprocess(files[i], ws.preprocessing) for i in order]), len(order) == len(files)

    have, _ = ws.cached(("target_images", cfg.train.adapt_bn, *ws.model_key), load,
                        enough=lambda kept: len(kept[0]) >= limit or kept[1])
    return have[:limit]


def calibration_set(cfg: RunConfig, ws: Workspace, limit: int) -> tuple[np.ndarray, str]:
    """The images that set the INT8 activation ranges, and what they were. They should be what the model
    will see: after --adapt-bn that is the target domain (its unlabelled images, whose BatchNorm statistics
    the model now carries), else the training images. The accuracy guard measures on other images: those the
    model was not fitted on (`guard.agreement_set`)."""
    folder = cfg.train.adapt_bn
    how = cfg.quantize.calibration
    if how == "adapt-bn" or (how == "auto" and folder):
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
    label-free check of quantization where the model will run, beside the guard's own set (which holds the
    target's images only when the adaptation was kept: an adapted model can lose far more to INT8 there)."""
    out = {"images": images, "top1_agreement": agree(int8), "warn_below": cfg.quantize.min_target_agreement}
    if out["top1_agreement"] < cfg.quantize.min_target_agreement:
        log.warning("INT8 gives FP32's top-1 on only %.1f%% of %d target-domain images (%s): check INT8 on "
                    "labelled target images, or ship FP32 there", 100 * out["top1_agreement"], images,
                    cfg.train.adapt_bn)
    return out


def _arm64_guard(cfg, fp32: Path, out: Path, recipe, calib, xv, yv) -> dict:
    """The accuracy guard on arm64's own figure: each candidate scored by the aarch64 onnxruntime under
    qemu on a seeded sample of the validation split (emulation is ~250x slower), with this host's
    accuracy on the same sample recorded beside it. INC is not used: it tunes on this host's accuracy."""
    from edgexfer.evaluate import mean_task_accuracy, onnx_logits
    from edgexfer.exporters.quantize import emulated_logits
    from edgexfer.runtime.verify import sample

    idx = sample(len(yv), cfg.quantize.arm64_guard_samples, seed=cfg.data.seed)
    xs, ys = xv[idx], yv[idx]
    arm64_logits = emulated_logits(xs)

    def arm64_accuracy(path) -> float:
        return mean_task_accuracy(arm64_logits(path), ys)

    def host_accuracy(path) -> float:
        return mean_task_accuracy(onnx_logits(path, xs, threads=cfg.bench.threads), ys)

    fp32_acc = arm64_accuracy(fp32)
    judge = Judge([Scorer("guard_accuracy", arm64_accuracy, "decides", fp32_acc, measured_on="arm64 (emulated)"),
                   Scorer("host_accuracy", host_accuracy)], cfg.max_accuracy_drop)
    rec = guarded_quantize(fp32, out, calib, recipe, judge, rank_images=cfg.quantize.rank_images)
    g = rec["guard"]
    g["tuner"] = "built-in: the layers INT8 hurts most kept in FP32, scored on arm64 (INC tunes on this host's accuracy)"
    g["guard_set"] = f"{len(ys)} validation images (seeded sample), scored by the arm64 runtime under qemu"
    g["fp32_host_accuracy"] = host_accuracy(fp32)
    g["shipped_host_accuracy"] = shipped_row(g)["host_accuracy"]
    g["host_measures_faithfully"] = False
    log.info("accuracy guard on arm64 (emulated, %d validation images): %d of %d weighted layers kept in FP32; "
             "arm64 accuracy %.4f (this host %.4f) vs FP32 %.4f (bound %.3f)", len(ys), g["chosen_fp32_layers"],
             g["quantizable_layers"], g["shipped_accuracy"], g["shipped_host_accuracy"], fp32_acc, g["max_accuracy_drop"])
    return rec


def _inc_quantize(run, cfg, fp32, recipe, calib, xg, judge: Judge) -> dict | None:
    """Intel Neural Compressor's accuracy-driven tuning (isolated interpreter) on the agreement set `xg`,
    with FP32's own top-1 as the labels (FP32 scores 1.0); the pick is re-measured here with ONNX Runtime
    and judged by the guard's `judge` (its agreement and labelled evidence, `guard_decision`). None when INC is
    not available."""
    import tempfile

    from edgexfer.exporters.inc import inc_python, inc_tune
    from edgexfer.exporters.quantize import finish_tuned, quantizable_nodes

    from edgexfer.exporters.metadata_io import read_meta

    if len(read_meta(fp32).tasks) > 1:
        log.info("accuracy guard: several tasks; using the built-in search (INC tunes one task's accuracy)")
        return None
    if inc_python() is None:
        if cfg.quantize.tuner == "inc":
            log.warning("--tuner inc: onnx-neural-compressor is not available (make inc); using the built-in search")
        return None
    log.info("accuracy guard: tuning with Intel Neural Compressor on %d images", len(xg))
    yg = judge.main.fn.top1[0]  # the agreement's FP32 answers
    with tempfile.TemporaryDirectory(dir=run.path, prefix=".inc-") as td:
        tuned = Path(td) / "tuned.onnx"
        res = inc_tune(fp32, tuned, calib, xg, yg, input_name="input", recipe=recipe, fp32_accuracy=1.0,
                       max_drop=cfg.max_accuracy_drop)
        guard = {"tuner": "Intel Neural Compressor (onnx-neural-compressor autotune)", "inc": res,
                 "fp32_accuracy": 1.0, "max_accuracy_drop": cfg.max_accuracy_drop, "within_bound": False,
                 "candidates": [{"inc_trial": i, "guard_accuracy": a, "drop": 1.0 - a,
                                 "within_bound": within(1.0 - a, cfg.max_accuracy_drop)}
                                for i, a in enumerate(res.get("trial_accuracies", [])[1:])]}
        if not res["tuned"]:
            log.info("INC: %s", res.get("reason"))
            return {"guard": guard}
        final = Path(td) / "final.onnx"

        def finish(requantize: bool):
            finish_tuned(tuned, fp32, final, recipe, res, requantize_residuals=requantize)
            row = judge(final)  # what counts: ONNX Runtime, here, on the file that ships
            acc = row["guard_accuracy"]
            shipped = {"agreement": acc, **{k: row[k] for k in ("val_accuracy", "val_drop", "val_drop_se") if k in row}}
            fixed = read_meta(final).quantization.get("residual_adds_requantized", 0)
            return (acc, shipped, *guard_decision(1.0 - acc, cfg.max_accuracy_drop, shipped.get("val_drop"),
                                                  shipped.get("val_drop_se")), fixed)

        # INC's residual Adds fed quantized values (faster: ONNX Runtime fuses them); INC's file as it is when
        # that moves it outside the bound
        acc, shipped, ok, why, fixed = finish(True)
        if fixed and not ok:
            log.info("INC's pick with its residual Adds quantized: %s; scoring it as INC wrote it", why)
            acc, shipped, ok, why, fixed = finish(False)
        guard["residual_adds_requantized"] = fixed
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
