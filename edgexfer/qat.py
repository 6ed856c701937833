"""Quantization-aware fine-tuning (QAT), for when no post-training INT8 file keeps the bound and the speed.

    student = fold BatchNorm into the convolutions of the run's checkpoint (torch.fx)
    fake-quantize it where ONNX Runtime's QDQ quantizer quantizes (torch.ao.quantization.FakeQuantize):
        weights per-channel symmetric int8 on the recipe's grid (127 levels a side, 64 with reduce_range),
        activations per-tensor (uint8 or int8, as the recipe says) at every Conv/Gemm input and Add,
        ranges set by min/max on the calibration images, then frozen
    fine-tune a few epochs: cross-entropy on the labelled training images + KL distillation from the FP32
        model (temperature 2) on them and on augmented views of them (unlabelled)
    bake the fake-quantized weights, export FP32 ONNX, quantize it with ONNX Runtime (the recipe, plain INT8)
    check that every Conv/Gemm has DequantizeLinear on its input and weight and that ONNX Runtime runs them
        as INT8 kernels (QLinearConv / QGemm)

Why ONNX Runtime writes the QDQ file instead of torch.onnx exporting the fake-quantized model: that works
(FakeQuantize exports as QuantizeLinear/DequantizeLinear) but the graph is not the one ONNX Runtime fuses
best: the Pad of TF-style "same" padding and the ReLU6 (Clip) stay in float between Q/DQ pairs, and on
EfficientNet-Lite0 it ran slower than the FP32 file, let alone the PTQ INT8 one. Re-quantizing the baked weights gives the same weight integers the model was trained with
(max-abs per channel: the baked maximum is exactly 127 (64) steps), and activation ranges from min/max on
the same calibration images the fake quantizers were set from. torch.ao's FX QAT entry points
(prepare_qat_fx) are deprecated in torch 2.14 in favour of torchao, which edgexfer does not depend on;
FakeQuantize and the fake_quantize_* ops used here are torch's own.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import operator
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgexfer.config import QuantizeConfig

log = logging.getLogger(__name__)

MIN_SPEEDUP = QuantizeConfig.min_speedup  # the default: QAT is tried when the PTQ choice keeps less of FP32's speed
MIN_GAIN = 0.05     # ...and ships only when faster than the PTQ choice by more than batch-1 timing noise
# epochs, views (unlabelled, for distillation), labelled images and forcing: QuantizeConfig.qat_*
LR, TEMPERATURE, ALPHA, BATCH = 3e-5, 2.0, 0.5, 32


class QatError(RuntimeError):
    """QAT could not make a verified INT8 file."""


# -- the student: BatchNorm folded, fake quantizers where ONNX Runtime quantizes --------------------------

def _owner(gm, target: str):
    *path, name = target.split(".")
    mod = gm
    for p in path:
        mod = getattr(mod, p)
    return mod, name


def fold_batchnorm(model):
    """A torch.fx copy of `model` (eval) with every BatchNorm2d that follows a convolution folded into it
    (F.conv2d of a module's weight, as EfficientNet-Lite's same-padding convs call it, or nn.Conv2d)."""
    import torch.nn.functional as F
    from torch import fx, nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_conv_bn_weights

    gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    mods = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src, bn = node.args[0], mods[node.target]
        if len(src.users) != 1:
            continue
        if src.op == "call_function" and src.target is F.conv2d and src.args[1].op == "get_attr":
            owner, name = _owner(gm, src.args[1].target)
            bias = src.args[2] if len(src.args) > 2 else None
            w, b = fuse_conv_bn_weights(getattr(owner, name), None if bias is None else _owner(gm, bias.target)[0].bias,
                                        bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
            owner.weight, owner.bias = w, b
            with gm.graph.inserting_before(src):
                bnode = gm.graph.get_attr(src.args[1].target.rsplit(".", 1)[0] + ".bias")
            src.args = (src.args[0], src.args[1], bnode, *src.args[3:])
        elif src.op == "call_module" and type(mods.get(src.target)) is nn.Conv2d:
            owner, name = _owner(gm, src.target)
            setattr(owner, name, fuse_conv_bn_eval(mods[src.target], bn))
        else:
            continue
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.folded_batchnorms = folded
    return gm


def _weighted_nodes(gm):
    """(node, weight owner module, weight attribute) of every Conv/Linear of the traced graph."""
    import torch.nn.functional as F
    from torch import nn

    mods = dict(gm.named_modules())
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (F.conv2d, F.linear) and n.args[1].op == "get_attr":
            yield n, *_owner(gm, n.args[1].target)
        elif n.op == "call_module" and isinstance(mods.get(n.target), (nn.Conv2d, nn.Linear)):
            yield n, mods[n.target], "weight"


def add_fake_quant(gm, recipe) -> dict:
    """Fake quantizers on `gm` in place: each Conv/Linear weight (a parametrization: per-channel symmetric,
    the recipe's grid) and each tensor entering a Conv/Linear/Add and leaving an Add (a call_module node
    `qat_act_N`, one per tensor). Returns {"act": [modules], "weights": [(owner, attr)]}."""
    import torch
    from torch import nn
    from torch.ao.quantization import FakeQuantize, MinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torch.nn.utils import parametrize

    a_min, a_max, a_dtype = (0, 255, torch.quint8) if recipe.activation_type == "uint8" else (-128, 127, torch.qint8)
    w_lim = 64 if recipe.reduce_range else 127  # onnxruntime's symmetric int8 weights: +-127, +-64 with reduce_range

    class WeightFQ(nn.Module):
        def __init__(self):
            super().__init__()
            # averaging_constant 1: the scale of the weights as they are now (max-abs per output channel)
            self.fq = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                   quant_min=-w_lim, quant_max=w_lim, dtype=torch.qint8,
                                   qscheme=torch.per_channel_symmetric, ch_axis=0)

        def forward(self, w):
            return self.fq(w)

    weights = []
    for _, owner, name in list(_weighted_nodes(gm)):
        if (owner, name) not in weights:
            parametrize.register_parametrization(owner, name, WeightFQ())
            weights.append((owner, name))
    act, done = [], {}

    def fq_of(t):
        if t not in done:
            mod = FakeQuantize(observer=MinMaxObserver, quant_min=a_min, quant_max=a_max, dtype=a_dtype,
                               qscheme=torch.per_tensor_affine)
            name = f"qat_act_{len(act)}"
            gm.add_module(name, mod)
            act.append(mod)
            with gm.graph.inserting_after(t):
                done[t] = gm.graph.call_module(name, (t,))
        return done[t]

    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.add)]
    for n in [w for w, *_ in _weighted_nodes(gm)] + adds:
        n.args = tuple(fq_of(a) if isinstance(a, torch.fx.Node) and i < (1 if n not in adds else 2) else a
                       for i, a in enumerate(n.args))
    for n in adds:
        users = list(n.users)
        q = fq_of(n)
        for u in users:
            if u is not q:
                u.replace_input_with(n, q)
    gm.recompile()
    return {"act": act, "weights": weights}


def bake(gm, fq: dict) -> None:
    """Remove the fake quantizers from `gm` in place, leaving each weight on its quantization grid
    (the scale of the weight as it is now) and the activations in float (ONNX Runtime quantizes them)."""
    import torch
    from torch.nn.utils import parametrize

    with torch.no_grad():
        for owner, name in fq["weights"]:
            p = owner.parametrizations[name][0].fq
            p.activation_post_process.reset_min_max_vals()
            p.enable_observer()
            parametrize.remove_parametrizations(owner, name, leave_parametrized=True)
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target.startswith("qat_act_"):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
    gm.delete_all_unused_submodules()
    gm.recompile()


# -- training ------------------------------------------------------------------------------------------

def _kl(student, teacher, t: float):
    import torch.nn.functional as F

    return sum(F.kl_div(F.log_softmax(s / t, 1), F.softmax(r / t, 1), reduction="batchmean") * t * t
               for s, r in zip(student, teacher))


def finetune_qat(teacher, recipe, x_lab: np.ndarray, y_lab: np.ndarray, x_unlab: np.ndarray, calib: np.ndarray,
                 *, epochs: int = QuantizeConfig.qat_epochs, seed: int = 0, threads: int = 2):
    """The baked student (a torch.fx GraphModule) and what its training did."""
    import torch

    from edgexfer.augment import flip_shift as augment
    from edgexfer.finetune import multitask_loss

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    teacher = teacher.eval()
    student = fold_batchnorm(teacher)
    fq = add_fake_quant(student, recipe)
    student.eval()
    with torch.no_grad():  # activation ranges: min/max on the calibration images (what ONNX Runtime will use)
        student.apply(torch.ao.quantization.disable_fake_quant)
        for i in range(0, len(calib), BATCH):
            student(torch.from_numpy(calib[i:i + BATCH]))
        student.apply(torch.ao.quantization.enable_fake_quant)
        for m in fq["act"]:
            m.disable_observer()
    x = torch.from_numpy(np.concatenate([x_lab, x_unlab]))
    y = torch.as_tensor(y_lab, dtype=torch.int64)
    y = torch.cat([y, torch.full((len(x_unlab), *y.shape[1:]), -1, dtype=torch.int64)])
    tasks = 1 if y.ndim == 1 else y.shape[1]
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, steps, losses = time.perf_counter(), 0, []
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            xb, yb = augment(x[idx], g), y[idx]
            with torch.no_grad():
                ref = teacher(xb)
            out = student(xb)
            loss = ALPHA * _kl(out, ref, TEMPERATURE)
            if (yb >= 0).any():
                loss = loss + (1 - ALPHA) * multitask_loss(out, yb, [None] * tasks, 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            steps += 1
        losses.append(total / len(x))
    student.eval()
    bake(student, fq)
    info = {"epochs": epochs, "steps": steps, "train_seconds": time.perf_counter() - t0, "loss_per_epoch": losses,
            "images": {"labelled": int(len(x_lab)), "unlabelled_views": int(len(x_unlab))},
            "loss": f"{1 - ALPHA:g} x cross-entropy on the labelled images + {ALPHA:g} x KL to the FP32 model's "
                    f"outputs at temperature {TEMPERATURE:g} on every image, flip-and-shift augmented each step",
            "optimizer": f"AdamW lr {LR:g}, batch {BATCH}", "folded_batchnorms": student.folded_batchnorms,
            "fake_quantizers": {"weights": len(fq["weights"]), "activations": len(fq["act"])},
            "weights": f"per-channel symmetric int8, +-{64 if recipe.reduce_range else 127} levels",
            "activations": f"per-tensor {recipe.activation_type}, min/max on {len(calib)} calibration images, frozen"}
    return student, info


# -- the file ------------------------------------------------------------------------------------------

def verify(path: str | Path, workdir: str | Path) -> dict:
    """Does ONNX Runtime run `path` with INT8 kernels? Every Conv/Gemm must read DequantizeLinear on its input
    and weight, and ONNX Runtime's optimised graph must hold them as QLinearConv/QGemm (none left float)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    prod = {o: n.op_type for n in m.graph.node for o in n.output}
    weighted = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    qdq = sum(all(prod.get(n.input[i]) == "DequantizeLinear" for i in (0, 1)) for n in weighted)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(Path(workdir) / "verify.opt.onnx")
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    sess.run(None, {sess.get_inputs()[0].name: np.zeros(shape, np.float32)})
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    int8 = sum(op in ("QLinearConv", "QGemm", "QLinearMatMul") for op in ops)
    out = {"weighted_layers": len(weighted), "with_qdq": int(qdq), "ort_int8_kernels": int(int8),
           "ort_float_weighted": int(sum(op in ("Conv", "Gemm", "FusedConv", "FusedGemm") for op in ops))}
    out["ok"] = bool(weighted) and qdq == len(weighted) and out["ort_float_weighted"] == 0
    return out


def make_qat_int8(checkpoint: str | Path, fp32_path: str | Path, out_path: str | Path, recipe, *,
                  x_lab: np.ndarray, y_lab: np.ndarray, x_unlab: np.ndarray, calib: np.ndarray,
                  epochs: int = QuantizeConfig.qat_epochs, seed: int = 0, threads: int = 2) -> dict:
    """Fine-tune `checkpoint` with fake quantization, and write the INT8 QDQ file to `out_path` with
    `fp32_path`'s metadata (`derived_meta`) and the recipe, its quantization marked "method": "qat".
    Temporaries go in a `.qat-` folder beside `out_path`. Raises QatError when the file is not verified."""
    import onnx

    from edgexfer.exporters.metadata_io import read_meta, save_model, set_props
    from edgexfer.exporters.onnx_export import export_onnx
    from edgexfer.exporters.quantize import derived_meta, quantize
    from edgexfer.model import load_checkpoint

    t0 = time.perf_counter()
    out_path = Path(out_path)
    teacher, _, _ = load_checkpoint(checkpoint)
    student, info = finetune_qat(teacher, recipe, x_lab, y_lab, x_unlab, calib, epochs=epochs, seed=seed,
                                 threads=threads)
    plain = dataclasses.replace(recipe, nodes_to_exclude=())
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".qat-") as td:
        fp32_qat, q = Path(td) / "qat.fp32.onnx", Path(td) / "qat.int8.onnx"
        export_onnx(student, dataclasses.replace(read_meta(fp32_path), metrics={}), fp32_qat, calib[:8])
        quantize(fp32_qat, q, calib, plain)
        info["verify"] = verify(q, td)
        if not info["verify"]["ok"]:
            raise QatError(f"the QAT file does not run as INT8 in ONNX Runtime: {info['verify']}")
        info["seconds"] = time.perf_counter() - t0
        meta = derived_meta(fp32_path, {**plain.to_dict(), "calibration_samples": int(min(len(calib), plain.calibration_samples)),
                                        "method": "qat", "qat": {k: info[k] for k in ("epochs", "steps", "images", "loss")}})
        save_model(set_props(onnx.load(str(q)), meta), out_path)
    return info


# -- the competition with the post-training candidates (the quantize stage's policy) -----------------------

LATENCY_ITERS = 60


def _latency(paths: dict, threads: int) -> dict[str, float]:
    """Batch-1 p50 milliseconds of each file, interleaved, after warm-up."""
    from edgexfer.exporters.metadata_io import read_meta
    from edgexfer.runtime.bench import interleaved, onnx_candidate

    i = read_meta(next(iter(paths.values()))).input
    x = np.random.default_rng(0).standard_normal((1, i.channels, i.height, i.width)).astype(np.float32)
    lat = interleaved([onnx_candidate(k, p, threads) for k, p in paths.items()], x, warmup=5, iters=LATENCY_ITERS)
    return {k: v["p50"] for k, v in lat.items()}


def training_images(cfg, ws, adapted: bool = False, distil_on: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What QAT trains on: the labelled training images (a seeded sample beyond `cfg.quantize.qat_max_images`)
    and `qat_views` augmented views of them for distillation (unlabelled). `adapted` (--adapt-bn kept: the model
    is for the target domain, and the source's labels no longer describe what it should do there): no labelled
    images, distillation only, on the target images and `qat_views` augmented views of them; `distil_on`: only
    on these of them (indices into the folder's image files: the guard's search half, so that the other half,
    which judges and certifies the QAT file, is images it never saw)."""
    from edgexfer.augment import crop_flip_views

    most, n_views = cfg.quantize.qat_max_images, cfg.quantize.qat_views

    if adapted:
        from edgexfer.data import list_images
        from edgexfer.quantize_stage import target_images, target_order

        x = target_images(cfg, ws, most)
        files = list_images(cfg.train.adapt_bn, follow_symlinks=cfg.data.follow_symlinks)
        if distil_on is not None:  # row i of x is file target_order[i]
            x = x[np.isin(target_order(cfg, len(files))[:len(x)], distil_on)]
            files = [files[i] for i in np.sort(np.asarray(distil_on, np.int64))]
        views = list(crop_flip_views(files, ws.preprocessing, n_views, cfg.data.seed + 1))
        y0 = ws.tensors("train")[1][:0]
        return x[:0], y0, np.concatenate([x, np.stack(views)]) if views else x
    xt, yt = ws.tensors("train")
    if len(xt) > most:
        keep = np.sort(np.random.default_rng(cfg.data.seed).choice(len(xt), most, replace=False))
        xt, yt = xt[keep], yt[keep]
    views = list(crop_flip_views(list(ws.dataset.train.images), ws.preprocessing, n_views, cfg.data.seed + 1))
    return xt, yt, (np.stack(views) if views else np.zeros((0, *xt.shape[1:]), np.float32))


def plain_speedup(guard: dict) -> float | None:
    """FP32's batch-1 latency over plain INT8's, as the guard's latency model measured them on this host, where
    this host is the target (`guard["host_is_target"]`: its speed is the target's); None otherwise or unmeasured."""
    lat = (guard.get("sensitivity") or {}).get("latency_ms") or {}
    if not guard.get("host_is_target") or not lat.get("int8_plain") or not lat.get("fp32"):
        return None
    return lat["fp32"] / lat["int8_plain"]


def compete(run, cfg, ws, fp32: Path, recipe, calib: np.ndarray, guard: dict, judge, adapted: bool = False,
            no_proof: dict | None = None, proves: Callable[[Path], bool] | None = None,
            distil_on: np.ndarray | None = None) -> tuple[dict, dict | None]:
    """Try QAT when the post-training choice (the run's model.int8.onnx, described by `guard`) misses the bound
    or keeps less than `QuantizeConfig.min_speedup` of FP32's batch-1 speed, unless plain INT8 itself (the graph
    a QAT file has) is under it where this host is the target (`plain_speedup`); judge its file as the post-training candidates are
    (`judge`, an `edgexfer.guard.Judge`: `judge(path)` is the candidate's row) and ship it (replace
    model.int8.onnx) when it is within the bound and either no PTQ candidate is or it is faster than the PTQ
    choice by MIN_GAIN. Returns guard.qat and, when it shipped, the new quantize record.
    Nor is it tried where no file could be proven on the images that would certify it (`no_proof`,
    `guard.unprovable`: even a QAT file that never disagreed with FP32 there would be over the bound at 95%): asked
    first where the post-training search was not run for that reason (`guard["search_skipped"]`), else last.
    `cfg.quantize.qat_force` (EDGEXFER_QAT_FORCE=1) tries it whatever the PTQ choice (tests, benchmarks).
    `proves` (given where the PTQ choice is proven: `guard.proven`'s test on the images that would certify a QAT
    file): a QAT file it does not prove never replaces that proven file, however fast. `distil_on`: after a kept
    --adapt-bn, the target images it may distil on (`training_images`)."""
    from edgexfer.exporters.metadata_io import read_meta
    from edgexfer.runfolder import FILES

    int8 = run.file(FILES["int8"])
    if cfg.quantize.qat == "off":
        return {"tried": False, "reason": "--qat off"}, None
    if not run.file("checkpoint.pt").is_file():
        return {"tried": False, "reason": "no checkpoint.pt in the run folder (QAT fine-tunes the PyTorch model)"}, None
    xt, yt = ws.tensors("train")
    if not len(xt):
        return {"tried": False, "reason": "no labelled training images"}, None
    within, kept = bool(guard.get("within_bound")), int(guard.get("chosen_fp32_layers") or 0)
    min_speedup = cfg.quantize.min_speedup
    entry: dict = {"tried": False, "min_speedup": min_speedup}
    if "estimated_speedup" in guard:
        entry["ptq_estimated_speedup"] = guard["estimated_speedup"]
    if cfg.quantize.qat_force:
        entry["reason"] = "forced (EDGEXFER_QAT_FORCE=1)"
    elif no_proof and guard.get("search_skipped"):  # the post-training search sat out for the same reason
        return {**entry, "unprovable": no_proof,
                "reason": f"no QAT file could be proven within the bound on the {no_proof['images']} images that "
                          f"would certify it (nor was the post-training search run): {no_proof['why']}"}, None
    elif within and kept == 0:
        return {**entry, "reason": "plain INT8 (every weighted layer) met the bound: a QAT file has the same INT8 "
                                   "graph, so it cannot be faster"}, None
    elif plain_speedup(guard) is not None and plain_speedup(guard) < min_speedup:
        return {**entry, "plain_int8_speedup": plain_speedup(guard),
                "reason": f"plain INT8, the graph a QAT file has, measured {plain_speedup(guard):.2f}x FP32's batch-1 "
                          f"speed on this host (the guard's latency model), under {min_speedup:g}x: QAT cannot make an "
                          "INT8 file worth shipping here"}, None
    else:
        lat = _latency({"fp32": fp32, "ptq": int8}, cfg.bench.threads)
        entry["ptq_speedup"] = lat["fp32"] / lat["ptq"]
        if within and entry["ptq_speedup"] >= min_speedup:
            return {**entry, "reason": f"the PTQ choice ({kept} layers in FP32) keeps {entry['ptq_speedup']:.2f}x of "
                                       f"FP32's batch-1 speed, at least {min_speedup:g}x"}, None
        if no_proof:
            return {**entry, "unprovable": no_proof,
                    "reason": f"no QAT file could be proven within the bound on the {no_proof['images']} images "
                              f"that would certify it: {no_proof['why']}"}, None
        entry["reason"] = ("no post-training candidate within the bound" if not within else
                           f"the PTQ choice ({kept} layers in FP32) keeps only {entry['ptq_speedup']:.2f}x of FP32's "
                           f"batch-1 speed, under {min_speedup:g}x")
    # not on the --adapt-bn images where the adaptation was not kept: the guard measures and certifies on them
    xt, yt, x_unlab = training_images(cfg, ws, adapted, distil_on=distil_on)
    log.info("QAT: %s; fine-tuning with fake quantization on %d labelled images and %d unlabelled views",
             entry["reason"], len(xt), len(x_unlab))
    entry["tried"] = True
    with tempfile.TemporaryDirectory(dir=run.path, prefix=".qat-") as td:
        q = Path(td) / "model.qat.int8.onnx"
        try:
            info = make_qat_int8(run.file("checkpoint.pt"), fp32, q, recipe, x_lab=xt, y_lab=yt, x_unlab=x_unlab,
                                 calib=calib, epochs=cfg.quantize.qat_epochs, seed=cfg.data.seed,
                                 threads=cfg.bench.threads)
        except QatError as e:
            return {**entry, "chosen": False, "why": str(e)}, None
        entry.update(info)
        row = judge(q)
        entry.update(agreement=row["guard_accuracy"], within_bound=row["within_bound"], row=row)
        lat = _latency({"fp32": fp32, "ptq": int8, "qat": q}, cfg.bench.threads)
        entry["latency_ms"] = {**lat, "batch": 1, "threads": cfg.bench.threads}
        entry["speedup"] = {"ptq": lat["fp32"] / lat["ptq"], "qat": lat["fp32"] / lat["qat"]}
        if not row["within_bound"]:
            entry.update(chosen=False, why=f"misses the bound: {row.get('decision') or 'agreement %.2f%%' % (100 * row['guard_accuracy'])}")
        elif not within:
            entry.update(chosen=True, why="within the bound, where no post-training candidate was")
        elif lat["qat"] < lat["ptq"] * (1 - MIN_GAIN) and proves is not None and not proves(q):
            entry.update(chosen=False, why=f"within the bound and {lat['ptq'] / lat['qat']:.2f}x faster than the PTQ "
                                            "choice, but its certificate does not prove it where the PTQ choice's "
                                            "proves that one: a proven file is not replaced by an unproven one")
        elif lat["qat"] < lat["ptq"] * (1 - MIN_GAIN):
            entry.update(chosen=True, why=f"within the bound and {lat['ptq'] / lat['qat']:.2f}x faster than the PTQ choice")
        else:
            entry.update(chosen=False, why=f"within the bound but not faster than the PTQ choice by {MIN_GAIN:.0%} "
                                           f"({lat['qat']:.3g} ms against {lat['ptq']:.3g} ms)")
        log.info("QAT: agreement %.4f, %.2fx FP32's speed (PTQ %.2fx): %s", row["guard_accuracy"],
                 entry["speedup"]["qat"], entry["speedup"]["ptq"], entry["why"])
        if not entry["chosen"]:
            return entry, None
        os.replace(q, int8)
    return entry, dict(read_meta(int8).quantization)
