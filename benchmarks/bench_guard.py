"""Does the INT8 guard's promise hold on photos the model never saw? (issue 23)

For each case (a data set and a seed: the seed draws the split, the folds and the augmentation) this runs the
pipeline as a user would (`edgexfer finetune`, `export`, `quantize`, `evaluate`, each a subprocess) and sets
what the guard stated against what the run's test split, which nothing fitted or chose on, then measures:

- the guard's disagreement rate with FP32's top-1 and its 95% Wilson interval (report.json quantize.guard,
  measured on images the model was not fitted on: out-of-fold, validation, augmented views of those);
- the disagreement of the same INT8 file on the test split (report.json quantization_impact);
- for contrast, the disagreement on the labelled images the model was fitted on (train + validation, the
  file's own head): what the guard measured before issue 23.

The bound is covered when the test split's disagreement is at most the guard's 95% upper bound; issue 23 asks
for coverage in >= 95% of >= 20 cases over >= 3 data sets. flowers-dev and aerial-dev are read where they lie
(../shared/data) and never copied; Fashion-MNIST comes from the Debian package (30 labels per class, 96 px, as
`--shots 30` gives; and the demo's own settings, 100 per class). Every case but flowers-dev-default (every
default, `--backbone auto` included) uses EfficientNet-Lite0 (the backbone does not change what is checked, and
`--backbone auto` triples the cost) and the built-in search without QAT (INC and QAT change the file, not how
it is judged). `fashion-mnist-30-every` is Fashion-MNIST 30-shot with EDGEXFER_MIN_SPEEDUP=0 (every candidate
tried), on seeds no other case uses: where INT8 is barely faster the default search stops before the files within
the bound, and these cases check the bound where the shipped file is within it, at a few disagreements in
hundreds of images (the case records its `environment`).

    .venv/bin/python benchmarks/bench_guard.py                  # -> benchmarks/results/guard.json
    .venv/bin/python benchmarks/bench_guard.py --cases flowers-dev:0,aerial-dev:0
    .venv/bin/python benchmarks/bench_guard.py --markdown       # the RESULTS.md section from the JSON

Cases already in the JSON (same data set and seed; each records the commit it was measured at) are kept unless
--fresh, so an interrupted run goes on where it stopped. Run folders: runs/bench-guard-SET-sSEED.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "guard.json"
SETS = {  # name -> the options `edgexfer finetune` gets besides --seed
    "flowers-dev": ["--data", str(DATA / "flowers-dev")],
    "aerial-dev": ["--data", str(DATA / "aerial-dev")],
    "fashion-mnist-30": ["--shots", "30"],
    "demo": [],  # the no-option run's data: Fashion-MNIST, 100 labels per class
    # flowers-dev at every default, --backbone auto included (issue 23's bound is on this run)
    "flowers-dev-default": ["--data", str(DATA / "flowers-dev"), "--backbone", "auto"],
    # Fashion-MNIST 30-shot with every candidate tried (no early stop): on this 96 px model INT8 is barely faster, so
    # the default search stops before the candidates that keep most layers in FP32, and ships files over the bound;
    # these cases check the bound where files are within it, at low disagreement (a few images of several hundred)
    "fashion-mnist-30-every": ["--shots", "30"],
}
ENV = {"fashion-mnist-30-every": {"EDGEXFER_MIN_SPEEDUP": "0"}}  # set -> environment of its commands
COMMON = ["--backbone", "efficientnet_lite0"]  # unless the set names its own backbone
DEFAULT_CASES = ([f"flowers-dev:{s}" for s in range(5)] + [f"aerial-dev:{s}" for s in range(5)]
                 + [f"fashion-mnist-30:{s}" for s in range(14)] + ["demo:0", "flowers-dev-default:0"]
                 + [f"fashion-mnist-30-every:{s}" for s in range(14, 28)])  # new seeds: a confirmation set


def edgexfer(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "edgexfer", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})


def fitted_rate(run: Path) -> float:
    """The shipped INT8 file's disagreement with FP32 on the labelled images the model was fitted on (train +
    validation, centre crops, each file's own answers): what the guard measured before issue 23."""
    from edgexfer.evaluate import onnx_logits
    from edgexfer.runfolder import RunFolder, Workspace

    rf = RunFolder(run)
    ws = Workspace(rf, rf.config())
    x = np.concatenate([ws.tensors("train")[0], ws.tensors("val")[0]])
    a = onnx_logits(run / "model.onnx", x, threads=2)[0].argmax(1)
    b = onnx_logits(run / "model.int8.onnx", x, threads=2)[0].argmax(1)
    return float(np.mean(a != b))


def case(name: str, seed: int) -> dict:
    from edgexfer.guard import wilson_upper

    run = ROOT / "runs" / f"bench-guard-{name}-s{seed}"
    t0 = time.perf_counter()
    common = [] if "--backbone" in SETS[name] else COMMON
    env = ENV.get(name)
    edgexfer("finetune", *SETS[name], *common, "--seed", str(seed), "--out", str(run), env=env)
    edgexfer("export", str(run), env=env)
    edgexfer("quantize", str(run), "--tuner", "builtin", "--qat", "off", env=env)
    edgexfer("evaluate", str(run), env=env)
    rep = json.loads((run / "report.json").read_text())
    g, qi = rep["quantize"]["guard"], rep["quantization_impact"]
    d = g["disagreement"]
    n_test = rep["models"]["int8"]["n"]
    test_rate = 1.0 - qi["top1_agreement_int8_vs_fp32"]
    lower = 1.0 - wilson_upper(1.0 - d["rate"], d["images"])  # the two-sided 95% Wilson interval's lower end
    return {"set": name, "seed": seed, **({"environment": env} if env else {}), "backbone": rep["backbone"]["name"], "strategy": rep["backbone"]["strategy"],
            "image_size": rep["backbone"]["image_size"], "labelled_from": g["agreement_set"]["labelled_from"],
            "unseen_images": d["images"], "rows": d.get("rows"), "fp32_layers": g["chosen_fp32_layers"],
            "guard_rate": d["rate"], "guard_lower95": lower, "guard_upper95": d["upper95"], "proven": g["proven"],
            "within_bound": g["within_bound"], "test_images": n_test, "test_rate": test_rate,
            "fitted_rate": fitted_rate(run), "covered": test_rate <= d["upper95"],
            "in_interval": lower <= test_rate <= d["upper95"],
            "test_drop": rep["models"]["fp32"]["accuracy"] - rep["models"]["int8"]["accuracy"],
            "seconds": round(time.perf_counter() - t0, 1)}


def miss_probability(c: dict) -> float:
    """How often the guard's 95% upper bound would fall below the test split's rate for this case if the guard's
    figure were unbiased: the guard's n unseen images and the test split's m images drawn at one rate (both
    figures pooled), the guard's Wilson bound computed as the guard computes it. Binomial over images (a case with
    augmented views is treated as its images alone: its bound is wider than this model says)."""
    from scipy import stats

    from edgexfer.guard import wilson_upper

    n, m = int(c["unseen_images"]), int(c["test_images"])
    p = (c["guard_rate"] * n + c["test_rate"] * m) / (n + m)
    k = np.arange(n + 1)
    pk = stats.binom.pmf(k, n, p)
    upper = np.array([wilson_upper(x / n, n) for x in k])
    return float(np.sum(pk * stats.binom.sf(np.floor(upper * m + 1e-9), m, p)))


def at_least(probs: list[float], k: int) -> float:
    """P(at least k of independent events with these probabilities): the Poisson-binomial tail."""
    dist = np.zeros(len(probs) + 1)
    dist[0] = 1.0
    for q in probs:
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] *= 1 - q
    return float(dist[k:].sum())


def summary(cases: list[dict]) -> dict:
    n = len(cases)
    covered = sum(c["covered"] for c in cases)
    sets = sorted({c["set"] for c in cases})
    miss = [miss_probability(c) for c in cases]
    return {"cases": n, "sets": sets, "covered": covered, "coverage": covered / n if n else None,
            "in_interval": sum(c["in_interval"] for c in cases),
            "fitted_covered": sum(c["test_rate"] <= c["fitted_rate"] for c in cases),
            "expected_misses_if_unbiased": sum(miss),
            "p_at_least_observed_misses_if_unbiased": at_least(miss, n - covered),
            "bounds": {"coverage of the 95% bound >= 95%": bool(n and covered / n >= 0.95),
                       ">= 20 cases": n >= 20, ">= 3 data sets": len(sets) >= 3}}


def markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["| data set | seed | strategy | held out as | unseen images (+ views) | layers FP32 | guard disagreement "
             "(95% interval) | test disagreement (images) | covered | fitted-image disagreement | proven |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in res["cases"]:
        lines.append(f"| {c['set']} | {c['seed']} | {c['strategy']} | {c['labelled_from']} | {c['unseen_images']} "
                     f"(+{c['rows'] - c['unseen_images']}) | {c['fp32_layers']} | {100 * c['guard_rate']:.1f}% "
                     f"({100 * c['guard_lower95']:.1f}-{100 * c['guard_upper95']:.1f}%) | {100 * c['test_rate']:.1f}% "
                     f"({c['test_images']}) | {'yes' if c['covered'] else '**no**'} | {100 * c['fitted_rate']:.1f}% | "
                     f"{'yes' if c['proven'] else 'no'} |")
    lines += ["", f"The 95% upper bound covered the test split's disagreement in {s['covered']} of {s['cases']} cases "
                  f"({100 * s['coverage']:.0f}%) over {len(s['sets'])} data sets; the test disagreement lay inside "
                  f"the guard's two-sided 95% interval in {s['in_interval']}. Measured on the images the model was "
                  f"fitted on (before issue 23), the disagreement would have covered it in {s['fitted_covered']}. "
                  + (f"If the guard's figure were unbiased, about {s['expected_misses_if_unbiased']:.1f} of these cases "
                     f"would miss (each case's test and guard images drawn at their pooled rate; the bound is the "
                     f"upper end of a two-sided 95% interval, and the test split's own noise counts against it)"
                     + (f"; {s['cases'] - s['covered']} or more would happen with probability "
                        f"{s['p_at_least_observed_misses_if_unbiased']:.3f}. " if s["cases"] > s["covered"] else ". ")
                     if "expected_misses_if_unbiased" in s else "")
                  + "Bounds: " + "; ".join(f"{k}: {'met' if v else '**not met**'}" for k, v in s["bounds"].items()) + "."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="SET:SEED,... (sets: " + ", ".join(SETS) + ")")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section from the results JSON")
    ap.add_argument("--fresh", action="store_true", help="measure every case again (default: keep those in the JSON)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    prov = provenance()
    old = json.loads(OUT.read_text()) if OUT.is_file() else {}
    done = {(c["set"], c["seed"]): c for c in old.get("cases", []) if not args.fresh}
    wanted = []
    for item in args.cases.split(","):
        name, _, seed = item.partition(":")
        if name not in SETS:
            print(f"bench_guard: unknown set {name!r} (sets: {', '.join(SETS)})", file=sys.stderr)
            return 2
        wanted.append((name, int(seed or 0)))
    cases = []
    for name, seed in wanted:
        c = done.get((name, seed)) or {**case(name, seed), "commit": provenance()["commit"]}
        cases.append(c)
        kept = cases + [d for k, d in done.items() if k not in {(x["set"], x["seed"]) for x in cases}]
        res = {"command": "python benchmarks/bench_guard.py", **prov, "cores": os.cpu_count(), "cases": kept,
               "summary": summary(kept)}  # cases measured before and not asked for yet stay in the file
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(res, indent=2) + "\n")  # after every case: an interrupted run goes on from here
        print(f"{name} seed {seed}: guard {100 * c['guard_rate']:.1f}% (<= {100 * c['guard_upper95']:.1f}%), test "
              f"{100 * c['test_rate']:.1f}%, fitted {100 * c['fitted_rate']:.1f}%", flush=True)
    print(markdown(res))
    return 0 if all(res["summary"]["bounds"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
