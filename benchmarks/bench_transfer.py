"""Transfer learning, measured on the default task (Fashion-MNIST from the Debian package, 96x96,
EfficientNet-Lite0, 2,000 held-out test images): what the pretrained start buys.

    python benchmarks/bench_transfer.py                 # every section; finished sections are kept
    python benchmarks/bench_transfer.py --only curve    # one section (curve, probe, strategies, rank, adabn)
    python benchmarks/bench_transfer.py --fresh         # start over

Sections (results in benchmarks/results/transfer.json, tables in transfer.md):
- curve:      accuracy vs labels per class (1, 5, 10, 50, 100), pretrained (--strategy auto) vs the same
              network from random init with the same budget. Bound: >= 15 points at 10 labels.
- probe:      linear probe on cached features vs full fine-tuning, same data (100 labels/class), one run:
              wall time to the accuracy each reaches. Bound: probe >= 10x faster.
- strategies: linear / partial / LP-FT (and LP-FT with layer-wise LR decay) at 10, 20, 50, 100 labels
              per class: where --strategy auto's bounds come from.
- rank:       LogME of 4 candidates (Lite0/1/2 ImageNet, Lite0 random init) in seconds, against each
              one's fine-tuned test accuracy (default LP-FT, 100 labels/class): Kendall's tau.
- adabn:      a fine-tuned Lite0 on shifted test images (inverted; low contrast), before and after
              re-estimating BatchNorm statistics (AdaBN) on unlabelled shifted images that are not
              the test images.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does (edgexfer/entry.py): no spinning on shared cores
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "transfer.json"
SECTIONS = ("curve", "probe", "strategies", "rank", "adabn")
IMAGE_SIZE = 96


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load(shots: int):
    from edgexfer.data import load_fashion_mnist

    return load_fashion_mnist(shots=shots, val_fraction=0.2, test_size=2000, seed=0)


def tensors(ds, backbone="efficientnet_lite0"):
    from edgexfer.backbones import preprocessing_for
    from edgexfer.finetune import tensorize

    pp = preprocessing_for(backbone, IMAGE_SIZE)
    return pp, tensorize(ds.test, pp, "preprocess test")


def fit(ds, pp, test, *, strategy="lpft", backbone="efficientnet_lite0", weights="imagenet", **train_kw):
    from edgexfer.finetune import TrainConfig
    from edgexfer.transfer import fit_and_score

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as td:
        acc, info = fit_and_score(ds, pp, test, backbone=backbone, weights=weights, image_size=IMAGE_SIZE,
                                  train_cfg=TrainConfig(strategy=strategy, **train_kw), work_dir=Path(td) / "w")
    info["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return acc, info


def section_curve() -> dict:
    from edgexfer.finetune import TrainConfig
    from edgexfer.pipeline import DataConfig, ModelConfig, RunConfig
    from edgexfer.transfer import curve

    cfg = RunConfig(DataConfig(test_size=2000), ModelConfig(backbone="efficientnet_lite0", image_size=IMAGE_SIZE),
                    TrainConfig(strategy="auto"))
    with tempfile.TemporaryDirectory() as td:
        res = curve(cfg, [1, 5, 10, 50, 100], td,
                    on_point=lambda p: print(f"  curve {p['labels_per_class']}: {p['pretrained']['test_accuracy']:.4f} "
                                             f"vs scratch {p['scratch']['test_accuracy']:.4f}", flush=True))
        png = Path(td) / "curve.png"
        if png.is_file():
            (ROOT / "benchmarks" / "results" / "curve.png").write_bytes(png.read_bytes())
    res.pop("key", None)
    g10 = res["points"]["10"]["gain_points"]
    res["bound"] = {"gain_at_10_labels_points": g10, "required": ">= 15", "ok": g10 >= 15}
    return res


def section_probe() -> dict:
    ds = load(100)
    pp, test = tensors(ds)
    acc_lp, lp = fit(ds, pp, test, strategy="linear")
    acc_ft, ft = fit(ds, pp, test, strategy="finetune")
    for d in (lp, ft):
        d.pop("model")
    ratio = ft["train_seconds"] / lp["train_seconds"]  # time to the accuracy each reaches (scoring the test set excluded)
    return {"labels_per_class": 100, "linear_probe": {"test_accuracy": acc_lp, **lp},
            "full_finetune": {"test_accuracy": acc_ft, **ft},
            "speedup_probe_over_finetune": round(ratio, 1),
            "bound": {"required": ">= 10x", "ok": ratio >= 10}}


def section_strategies() -> dict:
    rows = []
    for shots in (10, 20, 50, 100):
        ds = load(shots)
        pp, test = tensors(ds)
        variants = [("linear", {}), ("partial", {}), ("lpft", {})]
        if shots == 100:
            variants.append(("lpft", {"lr_decay": 0.8}))
        for strategy, kw in variants:
            acc, info = fit(ds, pp, test, strategy=strategy, **kw)
            info.pop("model")
            rows.append({"labels_per_class": shots, "train_per_class": len(ds.train) // 10, "strategy": strategy,
                         **kw, "test_accuracy": acc, **info})
            print(f"  strategies {shots}: {strategy} {kw} {acc:.4f} ({info['wall_seconds']:.0f} s)", flush=True)
    return {"rows": rows}


def section_rank() -> dict:
    from edgexfer.transfer import kendall_tau, rank

    ds = load(100)
    cands = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite0@none"]
    res = rank(ds, cands, image_size=IMAGE_SIZE)
    pp, test = tensors(ds)
    for r in res["candidates"]:
        acc, info = fit(ds, pp, test, backbone=r["backbone"], weights=r["weights"],
                        strategy="lpft" if r["weights"] != "none" else "finetune",
                        **({} if r["weights"] != "none" else {"freeze_bn": False, "lr": 1e-3}))
        info.pop("model")
        r["finetuned_test_accuracy"] = acc
        r["finetune"] = info
        print(f"  rank {r['candidate']}: LogME {r['logme']:.4f}, fine-tuned {acc:.4f}", flush=True)
    res["kendall_tau"] = kendall_tau([r["logme"] for r in res["candidates"]],
                                     [r["finetuned_test_accuracy"] for r in res["candidates"]])
    res["finetune_seconds_total"] = round(sum(r["finetune"]["wall_seconds"] for r in res["candidates"]), 1)
    return res


def section_adabn() -> dict:
    from edgexfer.data import Split, load_fashion_mnist
    from edgexfer.finetune import adapt_batchnorm, predict_logits, tensorize

    ds = load(100)
    pp, (xt, yt) = tensors(ds)
    # unlabelled target-domain images: 1,000 training images that are neither labelled nor test images
    pool = load_fashion_mnist(shots=None, val_fraction=0.0, test_size=10, seed=1)
    used = {a.tobytes() for s in (ds.train, ds.val, ds.test) for a in s.images}
    rng = np.random.default_rng(3)
    idx = rng.permutation(len(pool.train))
    unl = [a for a in (pool.train.images[i] for i in idx) if a.tobytes() not in used][:1000]
    shifts = {"inverted": lambda a: 255 - a, "low_contrast": lambda a: (96 + a.astype(np.float32) * 0.35).astype(np.uint8)}
    shifted = {name: (tensorize(Split([fn(a) for a in ds.test.images], ds.test.labels), pp, name)[0],
                      tensorize(Split([fn(a) for a in unl], np.zeros(len(unl), np.int64)), pp, name)[0])
               for name, fn in shifts.items()}
    out = {"unlabelled_images": len(unl), "variants": {}}
    # BatchNorm statistics during training: the pretraining data's (the default, frozen), or the training
    # images' (source_bn, what --adapt-bn sets): AdaBN assumes the latter.
    for variant, source_bn in (("pretraining statistics (default)", False), ("source statistics (--adapt-bn)", True)):
        acc, info = fit(ds, pp, (xt, yt), strategy="lpft", source_bn=source_bn)
        model = info.pop("model")
        state = {k: v.clone() for k, v in model.state_dict().items()}
        v = out["variants"][variant] = {"source_bn": source_bn, "test_accuracy_clean": acc, "shifts": {}}
        for name, (xs, xu) in shifted.items():
            model.load_state_dict(state)
            before = float((predict_logits(model, xs).argmax(1) == yt).float().mean())
            t0 = time.perf_counter()
            adapt_batchnorm(model, xu)
            secs = time.perf_counter() - t0
            after = float((predict_logits(model, xs).argmax(1) == yt).float().mean())
            v["shifts"][name] = {"before": before, "after": after, "gain_points": round(100 * (after - before), 2),
                                 "adapt_seconds": round(secs, 2)}
            print(f"  adabn [{variant}] {name}: {before:.4f} -> {after:.4f}", flush=True)
    return out


def to_markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores; torch {res['machine']['torch']}.", ""]
    c = res.get("curve")
    if c:
        from edgexfer.transfer import curve_markdown

        lines += ["### Accuracy vs labels per class", "", curve_markdown(c),
                  f"Gain at 10 labels/class: {c['bound']['gain_at_10_labels_points']:+.1f} points (bound >= 15: "
                  f"{'met' if c['bound']['ok'] else 'NOT met'}).", ""]
    p = res.get("probe")
    if p:
        lp, ft = p["linear_probe"], p["full_finetune"]
        lines += ["### Linear probe on cached features vs full fine-tuning (100 labels/class, one run)", "",
                  "| strategy | test accuracy | training seconds | wall seconds (with set-up and test scoring) | "
                  "trainable parameters |", "|---|---|---|---|---|",
                  f"| linear probe (features computed once, then the head) | {lp['test_accuracy']:.4f} | "
                  f"{lp['train_seconds']:.1f} | {lp['wall_seconds']:.1f} | {lp['trainable_parameters']:,} |",
                  f"| full fine-tuning | {ft['test_accuracy']:.4f} | {ft['train_seconds']:.1f} | {ft['wall_seconds']:.1f} | "
                  f"{ft['trainable_parameters']:,} |",
                  "", f"Probe {p['speedup_probe_over_finetune']}x faster in training time (bound >= 10x: "
                      f"{'met' if p['bound']['ok'] else 'NOT met'}).", ""]
    s = res.get("strategies")
    if s:
        lines += ["### Strategies by labels per class", "",
                  "| labels/class | train/class | strategy | test accuracy | wall seconds | trainable parameters |",
                  "|---|---|---|---|---|---|"]
        for r in s["rows"]:
            name = r["strategy"] + (f" (lr_decay {r['lr_decay']})" if "lr_decay" in r else "")
            lines.append(f"| {r['labels_per_class']} | {r['train_per_class']} | {name} | {r['test_accuracy']:.4f} | "
                         f"{r['wall_seconds']:.0f} | {r['trainable_parameters']:,} |")
        lines.append("")
    r = res.get("rank")
    if r:
        lines += ["### `edgexfer rank` (LogME) against fine-tuned accuracy", "",
                  "| candidate | weights | LogME | LogME seconds | fine-tuned test accuracy | fine-tune seconds |",
                  "|---|---|---|---|---|---|"]
        for c in r["candidates"]:
            lines.append(f"| {c['backbone']} | {c['weights']} | {c['logme']:.4f} | {c['seconds']:.1f} | "
                         f"{c['finetuned_test_accuracy']:.4f} | {c['finetune']['wall_seconds']:.0f} |")
        lines += ["", f"Kendall's tau (LogME vs fine-tuned accuracy): {r['kendall_tau']:.2f}; ranking took "
                      f"{r['total_seconds']:.0f} s, fine-tuning all four {r['finetune_seconds_total']:.0f} s.", ""]
    a = res.get("adabn")
    if a:
        lines += ["### AdaBN on shifted test images", "",
                  "LP-FT Lite0, 100 labels/class; BatchNorm statistics re-estimated on "
                  f"{a['unlabelled_images']} unlabelled shifted training images (not the test images).", "",
                  "| BatchNorm statistics while training | clean test | shift | before AdaBN | after AdaBN | gain (points) "
                  "| adapt seconds |", "|---|---|---|---|---|---|---|"]
        for variant, v in a["variants"].items():
            for k, sh in v["shifts"].items():
                lines.append(f"| {variant} | {v['test_accuracy_clean']:.4f} | {k} | {sh['before']:.4f} | "
                             f"{sh['after']:.4f} | {sh['gain_points']:+.1f} | {sh['adapt_seconds']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=SECTIONS, action="append")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    import torch

    from edgexfer.runtime import atomic

    res = {} if args.fresh or not OUT.is_file() else json.loads(OUT.read_text())
    res["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    res["command"] = "python benchmarks/bench_transfer.py" + "".join(f" --only {s}" for s in args.only or [])
    for name in args.only or SECTIONS:
        if name in res and not args.only:
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            res[name] = globals()[f"section_{name}"]()
        except Exception:  # keep the other sections; rerun this one with --only NAME
            import traceback

            traceback.print_exc()
            continue
        # each section records its own machine, commit and date: a later --only run must not stamp its
        # machine on sections measured before (the top-level "machine" is the last invocation's)
        from render_results import provenance

        res[name]["provenance"] = {**provenance(), "torch": torch.__version__}
        res[name]["section_seconds"] = round(time.perf_counter() - t0, 1)
        res[name]["load_average_after"] = os.getloadavg()[0]
        atomic.write_json(OUT, res)
    atomic.write_text(OUT.with_suffix(".md"), to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
