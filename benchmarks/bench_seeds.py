"""Is the default's lead over the twenty-line probe a property of the default, or of one seed? (issue 28)

`benchmarks/bench_photos.py` measures one default run per development set (seed 0). The seed draws the
validation split from train/, the cross-validation's folds and the probe's augmented views, so another seed is
another default run on the same photos. For each development set and each seed:

- `edgexfer finetune --data DIR --seed S` with every other option at its default (`--backbone auto`, which
  compares photos at each backbone's pretraining size and at 1.15x it; `--strategy auto`), then
  `edgexfer export`; the FP32 file's prediction for every test image (ONNX Runtime, the runtime's own
  preprocessing);
- where `--backbone auto` chose a 1.15x size, the default as it was before those sizes joined it: the best
  candidate at a pretraining size by the same rule (leave-one-out accuracy from the same
  backbone_selection.json, ties to the faster), `finetune --backbone B --image-size N` (what the select stage
  chooses is the only difference); elsewhere the two are the same run;
- the twenty-line probe (`bench_photos.twenty_line_predictions`: frozen Lite0 at 224 px + LogisticRegressionCV
  on every labelled image; it draws nothing from the seed, so it is fitted once per set).

Each lead is paired over the same test images (± its paired standard error); the mean over seeds is given ±
the standard error over seeds. Wall times are not the point here (see bench_photos): the quantize and bench
stages are not run.

    .venv/bin/python benchmarks/bench_seeds.py                  # -> benchmarks/results/seeds.json
    .venv/bin/python benchmarks/bench_seeds.py --markdown       # the RESULTS.md paragraph from the JSON

Finished cases are kept in the JSON; running again measures the missing ones.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "seeds.json"
SETS = ("flowers-dev", "aerial-dev")
SEEDS = (0, 1, 2, 3, 4)


def _finetune_and_export(run: Path, data: Path, seed: int, repeats: int | None, **model) -> None:
    """What `edgexfer finetune --data DATA --seed SEED [--backbone B --image-size N]` then `edgexfer export RUN` do
    (the same pipeline stages, in this process), with TrainConfig.probe_cv_repeats set where `repeats` is given."""
    from edgexfer import pipeline
    from edgexfer.config import build_config

    cfg = build_config(data=str(data), seed=seed, **model)
    if repeats is not None:
        cfg.train.probe_cv_repeats = repeats
    if cfg.model.backbone == "auto":
        pipeline.select(run, cfg)
    pipeline.finetune(run, cfg)
    pipeline.export(run)


def _predict(onnx: Path, images: list[Path], classes: list[str]) -> np.ndarray:
    """The FP32 file's class index (in `classes`' order) for each image: ONNX Runtime, Python preprocessing."""
    from edgexfer.runtime.model import EdgeModel

    m = EdgeModel(onnx, e2e=False)
    labels = m.meta.tasks[0].labels
    out = []
    for i in range(0, len(images), 32):
        logits = next(iter(m.run(m.preprocess([str(p) for p in images[i:i + 32]])).values()))
        out += [classes.index(labels[k]) for k in logits.argmax(1)]
    return np.array(out)


def _native_choice(sel: dict) -> dict:
    """The candidate `--backbone auto` chose before 1.15x sizes joined it: the best at a pretraining size."""
    from edgexfer.backbones import get_backbone_info

    native = [r for r in sel["candidates"] if r["image_size"] == get_backbone_info(r["backbone"]).default_size
              and "cv_accuracy" in r]
    return min(native, key=lambda r: (-r["cv_accuracy"], r["latency_p50_ms"]))


def _lead(pred: np.ndarray, base: np.ndarray, y: np.ndarray) -> dict:
    d = (pred == y).astype(float) - (base == y).astype(float)
    return {"points": round(100 * float(d.mean()), 2), "paired_stderr_points": round(100 * float(d.std(ddof=1) / math.sqrt(len(d))), 2)}


def case(data: Path, seed: int, probe_pred: np.ndarray, repeats: int | None, before: bool = True) -> dict:
    from bench_photos import _labelled

    _, _, xte, yte, classes = _labelled(data)
    work = Path(tempfile.mkdtemp(prefix=f"bench-seeds-{data.name}-{seed}-", dir=ROOT / "runs"))
    try:
        t0 = time.perf_counter()
        run = work / "default"
        _finetune_and_export(run, data, seed, repeats)
        sel = json.loads((run / "backbone_selection.json").read_text())
        pred = _predict(run / "model.onnx", xte, classes)
        probe = json.loads((run / "report.json").read_text())["training"].get("probe_selection") or {}
        res = {"seed": seed, "chosen": sel["chosen"], "image_size": sel["image_size"],
               "selection_lead": sel.get("lead"),
               "probe": {"features": (probe.get("features") or {}).get("name"), "C": probe.get("C"),
                         "cv_accuracy": probe.get("cv_accuracy"), "repeats": probe.get("repeats")},
               "default": {"test_accuracy": round(float((pred == yte).mean()), 4), "over_probe": _lead(pred, probe_pred, yte)}}
        old = _native_choice(sel) if before else None
        res["before_fixres"] = {"backbone": old["backbone"], "image_size": old["image_size"]} if before else None
        if before and (old["backbone"], old["image_size"]) == (sel["chosen"], sel["image_size"]):
            res["before_fixres"]["same_run"] = True
            res["before_fixres"].update(res["default"])
            res["default_minus_before_fixres"] = {"points": 0.0, "paired_stderr_points": 0.0}
        elif before:
            run0 = work / "before-fixres"
            _finetune_and_export(run0, data, seed, repeats, backbone=old["backbone"], image_size=old["image_size"])
            pred0 = _predict(run0 / "model.onnx", xte, classes)
            res["before_fixres"].update({"same_run": False, "test_accuracy": round(float((pred0 == yte).mean()), 4),
                                         "over_probe": _lead(pred0, probe_pred, yte)})
            res["default_minus_before_fixres"] = _lead(pred, pred0, yte)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)  # this script's own temporary run folders


def _mean(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def markdown(res: dict) -> str:
    lines = [f"`python benchmarks/bench_seeds.py` at {res['commit']}, {res['machine'].get('cpu')}, "
             f"{res.get('cores')} cores. Lead: FP32 test accuracy minus the twenty-line probe's, paired over the "
             "test images, ± its paired standard error. \"Before FixRes\": the same seed with the candidate "
             "`--backbone auto` chose before 1.15x sizes joined it (the same run where the choice is the same).", ""]
    for name, s in res["sets"].items():
        p = s["probe"]
        lines += [f"**{name}** (twenty-line probe: {p['test_accuracy']:.3f} on {p['test_images']} test images)", "",
                  "| seed | `--backbone auto` chose | FP32 test | lead over the probe | before FixRes | its lead | "
                  "default minus before |", "|---|---|---|---|---|---|---|"]
        cases = sorted(s["cases"].values(), key=lambda c: c["seed"])
        lead = lambda x: f"{x['points']:+.1f} ± {x['paired_stderr_points']:.1f}"  # noqa: E731
        for c in cases:
            d, b = c["default"], c["before_fixres"]
            lines.append(f"| {c['seed']} | {c['chosen']} at {c['image_size']} px | {d['test_accuracy']:.3f} | "
                         f"{lead(d['over_probe'])} | "
                         + (f"{b['backbone']} at {b['image_size']} px{' (same run)' if b.get('same_run') else ''} | "
                            f"{lead(b['over_probe'])} | {lead(c['default_minus_before_fixres'])} |" if b else
                            "not run | – | – |"))
        if len(cases) > 1:
            m, se = _mean([c["default"]["over_probe"]["points"] for c in cases])
            met = sum(c["default"]["over_probe"]["points"] >= 3 for c in cases)
            lines += ["", f"Mean lead over {len(cases)} seeds: {m:+.2f} ± {se:.2f} points (standard error over seeds; "
                      f"the +3-point bound met by {met} of {len(cases)})"
                      + (f"; before FixRes {_mean([c['before_fixres']['over_probe']['points'] for c in cases])[0]:+.2f} ± "
                         f"{_mean([c['before_fixres']['over_probe']['points'] for c in cases])[1]:.2f}"
                         if all(c["before_fixres"] for c in cases) else "") + "."]
        lines.append("")
    return "\n".join(lines)


def compare(base: dict, variant: dict, what: str) -> str:
    """A sentence: `variant`'s lead over the probe against `base`'s, case by case (set, seed) where both have it."""
    diffs, lines = [], []
    for name, s in variant["sets"].items():
        other = base["sets"].get(name, {}).get("cases", {})
        d = [c["default"]["over_probe"]["points"] - other[k]["default"]["over_probe"]["points"]
             for k, c in s["cases"].items() if k in other]
        diffs += d
        if d:
            met = sum(c["default"]["over_probe"]["points"] >= 3 for c in s["cases"].values())
            lines.append(f"{name}: mean lead {_mean([c['default']['over_probe']['points'] for c in s['cases'].values()])[0]:+.2f} "
                         f"(bound met by {met} of {len(s['cases'])}), {np.mean(d):+.2f} points against the base's same seeds")
    if not diffs:
        return ""
    m, se = _mean(diffs)
    return (f"{what} against the single partition, over {len(diffs)} (set, seed) cases: {m:+.2f} ± {se:.2f} points "
            f"of test accuracy (mean ± standard error over cases); " + "; ".join(lines) + ".")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(SETS), help="development sets in ../shared/data, comma-separated")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="seeds, comma-separated")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-before-fixres", action="store_true",
                    help="skip the run with the choice made before FixRes sizes joined --backbone auto")
    ap.add_argument("--probe-cv-repeats", type=int, default=None,
                    help="set TrainConfig.probe_cv_repeats (default: its default) for a variant's measurement")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md paragraph from the results JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())), end="")
        return 0
    from bench_photos import twenty_line_predictions
    from render_results import provenance

    prov = provenance()  # commit (-dirty for a modified tree), when, and the machine, as every benchmark records them
    commit = prov["commit"]
    res = json.loads(args.out.read_text()) if args.out.is_file() else {"sets": {}}
    if res.get("commit") not in (None, commit):
        print(f"bench_seeds: {args.out} was measured at {res['commit']}, HEAD is {commit}: move it aside to start "
              "again", file=sys.stderr)
        return 2
    if res.get("probe_cv_repeats", args.probe_cv_repeats) != args.probe_cv_repeats:
        print(f"bench_seeds: {args.out} was measured with --probe-cv-repeats {res['probe_cv_repeats']}", file=sys.stderr)
        return 2
    res.update({"command": "python benchmarks/bench_seeds.py" + "".join(f" {a}" for a in sys.argv[1:]),
                **prov, "cores": prov["machine"]["cores"], "probe_cv_repeats": args.probe_cv_repeats})
    (ROOT / "runs").mkdir(exist_ok=True)
    for name in args.sets.split(","):
        data = ROOT.parent / "shared" / "data" / name
        if not (data / "train").is_dir():
            print(f"bench_seeds: {data} has no train/ folder", file=sys.stderr)
            return 2
        s = res["sets"].setdefault(name, {"cases": {}})
        probe, probe_pred = twenty_line_predictions(data)
        s["probe"] = probe
        for seed in map(int, args.seeds.split(",")):
            if str(seed) in s["cases"]:
                continue
            s["cases"][str(seed)] = case(data, seed, probe_pred, args.probe_cv_repeats, not args.no_before_fixres)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1) + "\n")  # each case as it finishes
            print(json.dumps(s["cases"][str(seed)]), flush=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
