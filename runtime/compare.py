"""`edgexfer compare RESULT.json...`: `edgexfer bench` results from several machines in one table and plot.

Run `edgexfer bench MODEL --json-out pi5.json` on each board (the runtime install is enough), bring the
JSON files back, and compare them. Each result carries its machine info (`edgexfer.runtime.machine`);
rows are keyed by it, and each model's p50 is also given as a ratio to the fastest machine for the same model
(the same file, by its metadata or bytes: never another model's latency).

    edgexfer compare laptop.json pi5.json jetson.json --markdown fleet.md --plot fleet.png

Standard library + numpy; the plot only when matplotlib is installed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from edgexfer.runtime.bench import SCHEMA as BENCH_SCHEMA
from edgexfer.runtime.errors import RuntimeInputError

SCHEMA = "edgexfer.compare/1"


def machine_key(m: dict) -> str:
    """A short, readable name for a machine from its info: CPU, architecture, cores."""
    return f"{m.get('cpu') or '?'} ({m.get('arch') or '?'}, {m.get('cores') or '?'} cores)"


def load(paths: Sequence[str | os.PathLike]) -> list[tuple[str, dict]]:
    """(machine name, result) per file; a name shared by two machines gets the file name added."""
    out = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"bench result not found: {p}")
        try:
            res = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RuntimeInputError(f"{p} is not JSON: {e}") from None
        if not isinstance(res, dict) or res.get("schema") != BENCH_SCHEMA:
            raise RuntimeInputError(f"{p} is not an `edgexfer bench --json-out` result (schema {BENCH_SCHEMA})")
        if not isinstance(res.get("machine"), dict) or not isinstance(res.get("models"), dict):
            raise RuntimeInputError(f"{p} has no machine info or no models")
        out.append((machine_key(res["machine"]), res, p))
    counts: dict[str, int] = {}
    for name, _, _ in out:
        counts[name] = counts.get(name, 0) + 1
    return [(f"{n} [{p.name}]" if counts[n] > 1 else n, r) for n, r, p in out]


def identity(name: str, r: dict) -> str:
    """What makes rows of two machines the same model, so that one's latency is only ever divided by the
    same model's: the backend (onnxruntime, openvino, pytorch) and the file's model id (bench's `model_id`:
    its metadata less metrics), else its content hash, else (results of an older edgexfer) the row's name."""
    backend = str(r.get("backend") or "?").split()[0]
    return f"{backend}:{r.get('model_id') or r.get('sha256') or 'name:' + name}"


def compare(paths: Sequence[str | os.PathLike]) -> dict:
    """The merged document: machines, and one row per (model, machine). A row's p50 is compared with the
    same model's (`identity`) on the other machines; a model measured on one machine only is said to have no
    counterpart (`p50_ratio_to_fastest` None)."""
    results = load(paths)
    machines = {name: {**res["machine"], "created": res.get("created"), "threads": res.get("config", {}).get("threads"),
                       "input_shape": res.get("input_shape")} for name, res in results}
    rows = []
    for name, res in results:
        for model, r in res["models"].items():
            thr = r.get("throughput_img_s") or {}
            best_b = max(thr, key=lambda b: int(b)) if thr else None
            rows.append({"model": model, "identity": identity(model, r),
                         "machine": name, "backend": r.get("backend"), "threads": r.get("threads"),
                         "p50_ms": r["latency_ms"]["p50"], "p90_ms": r["latency_ms"]["p90"],
                         "p99_ms": r["latency_ms"]["p99"], "accuracy": r.get("accuracy"),
                         "throughput": {"batch": int(best_b), "img_s": thr[best_b]} if best_b else None,
                         "first_result_s": (r.get("cold_start") or {}).get("first_result_s"),
                         "peak_rss_mb": (r.get("cold_start") or {}).get("peak_rss_mb"),
                         "quantized": bool(r.get("quantization")) or ".int8" in str(r.get("file") or model),
                         **({"shippable": bool(r["shippable"]), "verdict": r.get("verdict")} if "shippable" in r else {})})
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["identity"], []).append(r)
    order = {}
    for ident, same in groups.items():
        best = min(r["p50_ms"] for r in same)
        alone = len({r["machine"] for r in same}) < 2 <= len(machines)
        for r in same:
            r["p50_ratio_to_fastest"] = None if alone else r["p50_ms"] / best
            if alone:
                r["no_counterpart"] = True
        order[ident] = min(r["model"] for r in same)
    rows.sort(key=lambda r: (order[r["identity"]], r["identity"], r["p50_ms"]))
    _share_verdicts(rows, machines)
    return {"schema": SCHEMA, "sources": [str(p) for p in paths], "machines": machines, "rows": rows,
            "recommended": _recommended(results, rows)}


def int8_kernels(m: dict) -> str:
    """Which family of INT8 kernels a machine runs (its machine info's arch and ISA flags): arm64, x86 with VNNI,
    AVX-512 without it, or AVX2. Without VNNI, U8S8 without reduce_range can saturate on x86, so the same INT8
    file can answer differently on machines of one architecture (`exporters.quantize.recipe_for`)."""
    flags = set(m.get("flags") or [])
    if str(m.get("arch") or "").lower() in ("aarch64", "arm64"):
        return "arm64"
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "x86 with VNNI"
    return "x86 AVX-512" if "avx512f" in flags else "x86 AVX2"


def _share_verdicts(rows: list[dict], machines: dict) -> None:
    """A board's bench of bundled files has no run folder, so no verdict: give its rows the verdict another
    machine's result holds for the same file (`identity`). A file's FP32 answers do not depend on the machine;
    an INT8 file's can (other integer kernels), so an INT8 verdict is shared only between machines of the
    same INT8 kernel family (`int8_kernels`). Shared verdicts name their machine (`verdict_from`)."""
    for r in rows:
        if "shippable" in r:
            continue
        kernels = int8_kernels(machines[r["machine"]])
        for o in rows:
            if o is r or o["identity"] != r["identity"] or "shippable" not in o or "verdict_from" in o:
                continue
            if (o["quantized"] or r["quantized"]) and int8_kernels(machines[o["machine"]]) != kernels:
                continue
            r.update(shippable=o["shippable"], verdict=o.get("verdict"), verdict_from=o["machine"])
            break


def _recommended(results: list[tuple[str, dict]], rows: list[dict]) -> dict:
    """Each machine's file to ship: its own bench's recommendation (made with the run folder's verdicts and its
    interleaved rounds, `bench.recommend`), else one made here from the verdicts its rows were given."""
    from edgexfer.runtime.bench import recommend

    out = {}
    for name, res in results:
        if res.get("recommended"):
            out[name] = res["recommended"]
            continue
        mine = {r["model"]: r for r in rows if r["machine"] == name}
        models = {m: {**e, **({"shippable": mine[m]["shippable"]} if "shippable" in mine.get(m, {}) else {})}
                  for m, e in res["models"].items()}
        rec = recommend(models)
        if rec:
            out[name] = {**rec, "why": rec["why"] + " (verdicts from " + ", ".join(sorted(
                {mine[m]["verdict_from"] for m in mine if "verdict_from" in mine[m]})) + ")"}
    return out


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def to_markdown(doc: dict) -> str:
    lines = ["| machine | arch | cores | ISA flags | onnxruntime | providers | threads | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in doc["machines"].items():
        prov = ", ".join(p.replace("ExecutionProvider", "") for p in m.get("providers") or [])
        lines.append(f"| {name} | {m.get('arch', '')} | {m.get('cores', '')} | {', '.join(m.get('flags') or []) or 'none'} | "
                     f"{m.get('onnxruntime', '')} | {prov} | {_f(m.get('threads'), '')} | {m.get('created') or ''} |")
    judged = any("shippable" in r for r in doc["rows"])
    lines += ["", "| model | machine | backend | p50 ms | p90 ms | p99 ms | × fastest (p50) | img/s (batch) | "
                  "first result s | peak RSS MB | accuracy |" + (" shippable |" if judged else ""),
              "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if judged else "")]
    rec = doc.get("recommended") or {}
    for r in doc["rows"]:
        t = r["throughput"]
        thr = f"{t['img_s']:.0f} ({t['batch']})" if t else ""
        ratio = "no counterpart" if r["p50_ratio_to_fastest"] is None else f"{r['p50_ratio_to_fastest']:.2f}"
        lines.append(f"| {r['model']} | {r['machine']} | {r['backend']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {ratio} | "
                     f"{thr} | {_f(r['first_result_s'], '.2f')} | "
                     f"{_f(r['peak_rss_mb'], '.0f')} | {_f(r['accuracy'], '.4f')} |"
                     + (f" {_shippable(r, rec.get(r['machine']))} |" if judged else ""))
    lines += ["", "× fastest (p50): this row's p50 over the fastest machine's for the same model (the same file: its "
                  "metadata less metrics, or its bytes; results of an older edgexfer, without them: the same row name)."]
    if judged:
        lines.append("shippable: the run folder's verdict on the file (report.json, as `edgexfer bench RUN` read it); "
                     "from another machine's result where this one benchmarked the file without its run folder (an "
                     "INT8 file's only from a machine of the same INT8 kernel family: arm64, x86 with VNNI, AVX-512, AVX2).")
        for m in doc["machines"]:
            r = rec.get(m)
            lines.append(f"Recommended on {m}: " + (f"{r['model']} ({r['p50_ms']:.2f} ms p50): {r['why']}." if r else
                                                     "none (no benchmarked file with a verdict that lets it ship)."))
    alone = [f"{r['model']} on {r['machine']}" for r in doc["rows"] if r.get("no_counterpart")]
    if alone:
        lines.append("No counterpart (a model measured on one machine only, compared with none): " + "; ".join(alone) + ".")
    return "\n".join(lines) + "\n"


def _shippable(r: dict, rec: dict | None) -> str:
    if "shippable" not in r:
        return ""
    s = "yes" if r["shippable"] else "no"
    if rec and rec.get("model") == r["model"]:
        s = f"**{s} (recommended)**"
    return s + (f" (verdict from {r['verdict_from']})" if r.get("verdict_from") else "")


def plot(doc: dict, path) -> bool:
    """p50 latency per model, one bar per machine (needs matplotlib; returns False without it)."""
    import numpy as np

    from edgexfer.runtime.plotting import save_plot

    labels: dict[str, str] = {}  # one bar group per model (identity), labelled by its first row's name
    for r in doc["rows"]:
        labels.setdefault(r.get("identity", r["model"]), r["model"])
    models = list(labels)
    machines = list(doc["machines"])
    width = 0.8 / max(1, len(machines))

    def draw(plt):
        fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(models) + 2), 3.8))
        for k, mach in enumerate(machines):
            vals = [next((r["p50_ms"] for r in doc["rows"] if r.get("identity", r["model"]) == m and r["machine"] == mach),
                         np.nan) for m in models]
            ax.bar(np.arange(len(models)) + (k - (len(machines) - 1) / 2) * width, vals, width, label=mach)
        ax.set_xticks(range(len(models)), [labels[m] for m in models], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("batch-1 p50 latency, ms")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("edgexfer bench across machines", fontsize=9)
        return fig

    return save_plot(path, draw)
