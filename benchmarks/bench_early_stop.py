"""Can the INT8 guard stop early? The latency model's predicted speed-up against the measured one (issue 28).

The guard's built-in search (`edgexfer.guard.guarded_quantize`) tries candidates that keep the layers INT8 hurts
most in FP32, cheapest (estimated) first, and each candidate's speed-up over FP32 is estimated from one latency
measurement of FP32 and of plain INT8 and each layer's share of the MACs (`edgexfer.exporters.sensitivity`). If
the estimate holds, a candidate estimated under QAT's `MIN_SPEEDUP` (1.2x: the speed under which a PTQ choice is
not good enough and QAT competes) cannot be worth shipping as INT8, and the search can stop before it.

For each run folder given, this calibrates and ranks its model.onnx as the guard does, writes a spread of the
guard's candidates (every speed-up the search can reach, the last ones included) and times each against FP32, both
as the estimate was measured (1 thread, call by call) and as the bench stage measures (the run's threads, ONNX
Runtime's spinning threads, blocks of 20 calls), interleaved, at batch 1.

    .venv/bin/python benchmarks/bench_early_stop.py RUN [RUN ...]   # -> benchmarks/results/early_stop.json
    .venv/bin/python benchmarks/bench_early_stop.py --markdown
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "early_stop.json"
SPREAD = 9  # candidates timed per run


def measure(run: Path, iters: int) -> dict:
    from edgexfer.exporters import sensitivity
    from edgexfer.exporters.quantize import calibrate, quantize, recipe_for
    from edgexfer.guard import PREFIX_STEPS
    from edgexfer.qat import MIN_SPEEDUP
    from edgexfer.quantize_stage import calibration_set
    from edgexfer.runfolder import RunFolder, Workspace
    from edgexfer.runtime.bench import interleaved, onnx_candidate

    rf = RunFolder(run)
    cfg = rf.config()
    ws = Workspace(rf, cfg)
    recipe, target = recipe_for(cfg.quantize.target, cfg.quantize.recipe)
    calib, _ = calibration_set(cfg, ws, recipe.calibration_samples)
    fp32 = run / "model.onnx"
    with tempfile.TemporaryDirectory() as td:
        cal = calibrate(fp32, calib, recipe, td)
        sens = sensitivity.rank(cal, calib[:cfg.quantize.rank_images], method="revert")
        cands = sensitivity.candidates(sens, PREFIX_STEPS)
        pick = sorted({int(i) for i in np.linspace(0, len(cands) - 1, SPREAD).round()} | {len(cands) - 1, len(cands) - 2})
        files = {}
        for i in pick:
            c = cands[i]
            files[f"c{i}"] = Path(td) / f"c{i}.onnx"
            quantize(fp32, files[f"c{i}"], cal, dataclasses.replace(recipe, nodes_to_exclude=tuple(c["nodes"])))
        x = np.random.default_rng(0).standard_normal((1, *calib.shape[1:])).astype(np.float32)
        one = interleaved([onnx_candidate("fp32", fp32, 1)] + [onnx_candidate(k, p, 1) for k, p in files.items()],
                          x, warmup=10, iters=iters)
        t = cfg.bench.threads
        spin = interleaved([onnx_candidate("fp32", fp32, t, spinning=True)]
                           + [onnx_candidate(k, p, t, spinning=True) for k, p in files.items()],
                           x, warmup=10, iters=iters, block=20, pause=0.02)
    rows = [{"candidate": i, "fp32_layers": cands[i]["fp32_layers"], "order": cands[i]["order"],
             "est_speedup": cands[i]["est_speedup"],
             "speedup_1_thread": one["fp32"]["p50"] / one[f"c{i}"]["p50"],
             "speedup_bench": spin["fp32"]["p50"] / spin[f"c{i}"]["p50"]} for i in pick]
    return {"run": run.name, "backbone": rf.config().model.backbone, "image_size": int(calib.shape[-1]),
            "target": target["target"], "host_measures_faithfully": target["host_measures_faithfully"],
            "candidates": len(cands), "below_min_speedup": sum(c["est_speedup"] < MIN_SPEEDUP for c in cands),
            "min_speedup": MIN_SPEEDUP, "threads": t, "iters": iters,
            "latency_ms": {"fp32": sens["report"]["latency_ms"]["fp32"], "int8_plain": sens["report"]["latency_ms"]["int8_plain"]},
            "rows": rows}


def verdict(res: dict) -> dict:
    """Whether stopping below MIN_SPEEDUP (estimated) would have skipped a candidate that measured at or above it."""
    rows = [r for c in res["cases"] for r in c["rows"]]
    t = res["cases"][0]["min_speedup"] if res["cases"] else 1.2
    below = [r for r in rows if r["est_speedup"] < t]
    return {"timed": len(rows), "estimated_below": len(below),
            "estimated_below_but_measured_at_least": sum(max(r["speedup_1_thread"], r["speedup_bench"]) >= t for r in below),
            "max_measured_where_estimated_below": max((max(r["speedup_1_thread"], r["speedup_bench"]) for r in below),
                                                      default=None),
            "ratio_measured_to_estimated_1_thread": {
                "median": float(np.median([r["speedup_1_thread"] / r["est_speedup"] for r in rows])) if rows else None,
                "max": float(max(r["speedup_1_thread"] / r["est_speedup"] for r in rows)) if rows else None}}


def markdown(res: dict) -> str:
    lines = []
    for c in res["cases"]:
        lines += [f"**{c['run']}** ({c['backbone']}, {c['image_size']} px, target {c['target']}; the search's "
                  f"{c['candidates']} candidates, {c['below_min_speedup']} estimated under {c['min_speedup']}x; FP32 "
                  f"{c['latency_ms']['fp32']:.2f} ms, plain INT8 {c['latency_ms']['int8_plain']:.2f} ms at 1 thread):", "",
                  "| candidate | layers FP32 | order | estimated | measured, 1 thread | measured, bench (" +
                  f"{c['threads']} threads, spinning) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['candidate']} | {r['fp32_layers']} | {r['order']} | {r['est_speedup']:.2f}x | "
                  f"{r['speedup_1_thread']:.2f}x | {r['speedup_bench']:.2f}x |" for r in c["rows"]]
        lines.append("")
    v = res["verdict"]
    lines.append(f"Of {v['timed']} candidates timed, {v['estimated_below']} were estimated under the {res['cases'][0]['min_speedup']}x "
                 f"the early stop uses; {v['estimated_below_but_measured_at_least']} of those measured at or above it "
                 f"(the fastest: {v['max_measured_where_estimated_below']:.2f}x). Measured over estimated speed-up at 1 "
                 f"thread: median {v['ratio_measured_to_estimated_1_thread']['median']:.2f}, max "
                 f"{v['ratio_measured_to_estimated_1_thread']['max']:.2f}." if v["estimated_below"] else
                 f"None of the {v['timed']} candidates timed was estimated under {res['cases'][0]['min_speedup']}x.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path)
    ap.add_argument("--iters", type=int, default=150)
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section from the JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    if not args.runs:
        ap.error("name at least one run folder")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    res = {"command": "python benchmarks/bench_early_stop.py " + " ".join(str(r) for r in args.runs), **provenance(),
           "cases": [measure(r, args.iters) for r in args.runs]}
    res["verdict"] = verdict(res)
    OUT.write_text(json.dumps(res, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
