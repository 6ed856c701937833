"""Where the guard's Fashion-MNIST misses come from (issue 23): the shipped INT8 file's disagreement with FP32 on
each part of the guard's pool of unseen images, against images the guard never saw and the test split.

For a run whose labelled images are a sample (`--shots`: the left-out labelled images are the guard's unlabelled
pool), this scores the shipped model.int8.onnx against model.onnx, with the files' own heads, on

- the pool's search half (the images the candidate search chose on: biased low by that choice),
- the pool's certify half (held out of the search: the images the guard's figure and bound are measured on,
  with the out-of-fold labelled images beside them),
- `--fresh` further left-out images the guard never saw (the same distribution, far more images: the rate the
  bound is a bound for),
- the run's test split (the figure bench_guard.py compares the bound with).

If the certify half reads like the fresh images, the guard is not biased; if the fresh images read like the test
split, the test split is "images like these". Run folders: bench_guard.py's `runs/bench-guard-fashion-mnist-30-s*`.

    .venv/bin/python benchmarks/bench_guard_pool.py [RUN ...]   # -> benchmarks/results/guard_pool.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "guard_pool.json"
PARTS = ("search", "certify", "fresh", "test")


def pool_parts(run: Path, fresh: int) -> dict:
    from edgexfer.evaluate import onnx_logits
    from edgexfer.guard import search_and_certify
    from edgexfer.runfolder import RunFolder, Workspace
    from edgexfer.runtime.preprocess import preprocess

    rf = RunFolder(run)
    cfg = rf.config()
    ws = Workspace(rf, cfg)
    labelled = len(ws.dataset.train) + len(ws.dataset.val)
    un = ws.dataset.unused
    pool = min(cfg.quantize.guard_images, len(un.images))  # unlabelled_images(): a seeded sample of the left-out ones
    order = np.random.default_rng(cfg.data.seed).permutation(len(un.images))[:pool + fresh]
    x = np.stack([preprocess(un.images[i], ws.preprocessing) for i in order]).astype(np.float32)

    def flips(x):
        return (onnx_logits(run / "model.onnx", x, threads=2)[0].argmax(1)
                != onnx_logits(run / "model.int8.onnx", x, threads=2)[0].argmax(1))

    d = flips(x)
    rows = np.concatenate([np.arange(labelled), labelled + np.arange(pool)])
    search, cert = search_and_certify(rows, labelled, seed=cfg.data.seed)
    parts = {"search": d[search[search >= labelled] - labelled], "certify": d[cert[cert >= labelled] - labelled],
             "fresh": d[pool:], "test": flips(ws.tensors("test")[0])}
    g = json.loads((run / "report.json").read_text())["quantize"]["guard"]["disagreement"]
    return {"run": run.name, "seed": cfg.data.seed, "guard_rate": g["rate"], "guard_upper95": g["upper95"],
            **{k: {"disagree": int(v.sum()), "images": int(len(v))} for k, v in parts.items()}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run folders (default: runs/bench-guard-fashion-mnist-30-s*)")
    ap.add_argument("--fresh", type=int, default=3000, help="left-out images beyond the guard's pool")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md paragraph from the JSON")
    ap.add_argument("--add", action="store_true", help="keep the JSON's cases of other runs and add these (more "
                    "runs, more evidence; each case records the commit it was scored at)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    runs = args.runs or sorted((ROOT / "runs").glob("bench-guard-fashion-mnist-30-s*"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    prov = provenance()
    cases = [{**pool_parts(r, args.fresh), "scored_at": prov["commit"]} for r in runs]
    command = "python benchmarks/bench_guard_pool.py " + " ".join(str(r) for r in args.runs)
    if args.add and OUT.is_file():
        old = json.loads(OUT.read_text())
        new_names = {c["run"] for c in cases}
        cases = [c for c in old["cases"] if c["run"] not in new_names] + cases
        command = old["command"] + "; " + command.replace("bench_guard_pool.py", "bench_guard_pool.py --add")
    total = {k: {f: sum(c[k][f] for c in cases) for f in ("disagree", "images")} for k in PARTS}
    res = {"command": command, **prov, "cases": cases, "total": total}
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    print(markdown(res))
    return 0


def _z(a: dict, b: dict) -> float:
    """Two-proportion z of a's rate below b's (pooled standard error)."""
    p1, p2 = a["disagree"] / a["images"], b["disagree"] / b["images"]
    p = (a["disagree"] + b["disagree"]) / (a["images"] + b["images"])
    se = (p * (1 - p) * (1 / a["images"] + 1 / b["images"])) ** 0.5
    return (p2 - p1) / se if se else 0.0


def dispersion(res: dict) -> tuple[float, int, float]:
    """Whether each run's certify half scatters about the run's rate as a binomial sample would:
    Pearson's chi-square of the certify counts against 'images x the run's pooled rate' (certify and fresh
    together, the variance of a count given the pooled total), its degrees of freedom (one per run with a
    nonzero rate) and p-value. Large: the per-run figures vary more than the guard's interval, which assumes independent
    images, allows for."""
    from scipy import stats

    chi2, k = 0.0, 0
    for c in res["cases"]:
        n, m = c["certify"]["images"], c["fresh"]["images"]
        o = c["certify"]["disagree"]
        rate = (o + c["fresh"]["disagree"]) / (n + m)  # both samples pooled: the run's rate under "no difference"
        if 0 < rate < 1:  # the certify count's variance about n x pooled rate, given the pooled total
            chi2 += (o - n * rate) ** 2 / (n * rate * (1 - rate) * m / (n + m))
            k += 1
    return chi2, k, float(stats.chi2.sf(chi2, k))


def markdown(res: dict) -> str:
    t = res["total"]
    chi2, k, p_disp = dispersion(res)
    rate = {k: 100 * t[k]["disagree"] / t[k]["images"] for k in PARTS}
    rows = [f"| {c['run']} | " + " | ".join(f"{c[k]['disagree']}/{c[k]['images']}" for k in PARTS) +
            f" | {100 * c['guard_upper95']:.1f}% |" for c in res["cases"]]
    return "\n".join([
        "| run | search half | certify half | fresh unseen | test split | guard's 95% bound |",
        "|---|---|---|---|---|---|", *rows,
        f"| **all** | {rate['search']:.2f}% | {rate['certify']:.2f}% | {rate['fresh']:.2f}% | {rate['test']:.2f}% | |",
        "",
        f"Over {len(res['cases'])} Fashion-MNIST 30-shot runs (commit {res['commit']}, each run's shipped INT8 file against "
        f"its FP32 file): the search half reads {rate['search']:.2f}% (chosen on: biased low, as expected), the certify "
        f"half {rate['certify']:.2f}% against {rate['fresh']:.2f}% on fresh unseen images (z = "
        f"{_z(t['certify'], t['fresh']):.1f}), and the fresh images {rate['fresh']:.2f}% against the test split's "
        f"{rate['test']:.2f}% (z = {_z(t['fresh'], t['test']):.1f}). Run by run, the certify half's count scatters about "
        f"that run's pooled rate (certify and fresh images together) with chi-square {chi2:.1f} on {k} degrees of "
        f"freedom (p = {p_disp:.3f}; a binomial scatter, "
        f"as the guard's interval assumes, gives about {k})."])


if __name__ == "__main__":
    sys.exit(main())
