"""`edgexfer bench RUN --formats all` recommends the fastest shippable file, with ties decided on reasons, and
`edgexfer compare` carries the run's verdicts to a board's bench of the bundled files (issue 24)."""
import copy
import json

import pytest

from edgexfer.runtime.bench import faster, recommend
from edgexfer.runtime.bundle import file_verdicts
from edgexfer.runtime.compare import compare, to_markdown


def test_faster_needs_a_sign_test_over_the_paired_rounds():
    base = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0, 10.1, 10.2]
    assert faster([b - 0.5 for b in base], base)          # 10 of 10 rounds: p = 0.002
    nine = [b - 0.5 for b in base[:9]] + [base[9] + 1]
    assert faster(nine, base)                               # 9 of 10: p = 0.021
    eight = [b - 0.5 for b in base[:8]] + [b + 1 for b in base[8:]]
    assert not faster(eight, base)                          # 8 of 10: p = 0.11, noise
    assert not faster(base, base)                           # no round differs
    assert not faster(base, [b - 0.5 for b in base])        # slower is not faster
    assert not faster([1.0, 1.0], [5.0, 5.0])               # two rounds can never show it
    assert not faster([], [])


def _row(file, p50, size, shippable=True, shift=0.0):
    return {"file": file, "latency_ms": {"p50": p50}, "size_bytes": size, "shippable": shippable,
            "p50_by_round_ms": [p50 + shift + 0.01 * (i % 3) for i in range(10)]}


def test_recommend_the_fastest_beyond_noise_even_when_larger():
    models = {"model.onnx": _row("r/model.onnx", 10.0, 4_600_000),
              "model.int8.tflite": _row("r/model.int8.tflite", 5.0, 1_300_000, shippable=False),
              "model.xml": _row("r/model.xml", 7.0, 4_700_000)}
    rec = recommend(models)
    assert rec["model"] == "model.xml" and rec["tied_with"] == []
    assert "fastest shippable" in rec["why"] and "model.onnx" in rec["why"]


def test_recommend_ties_go_to_the_smallest_then_to_onnx_runtime():
    # every round alternates which is faster: a tie, whatever the p50s say
    a = {"file": "r/model.tflite", "latency_ms": {"p50": 4.50}, "size_bytes": 4_650_000, "shippable": True,
         "p50_by_round_ms": [4.4, 4.6] * 5}
    b = {"file": "r/model.onnx", "latency_ms": {"p50": 4.56}, "size_bytes": 4_600_000, "shippable": True,
         "p50_by_round_ms": [4.6, 4.5] * 5}
    rec = recommend({"model.tflite": a, "model.onnx": b})
    assert rec["model"] == "model.onnx"  # within 5% of the smallest size: the runtime listed first
    assert rec["tied_with"] == ["model.tflite"] and "tied" in rec["why"]
    c = {**a, "file": "r/model.int8.onnx", "size_bytes": 1_200_000}
    assert recommend({"model.int8.onnx": c, "model.onnx": b})["model"] == "model.int8.onnx"  # clearly smaller
    assert recommend({"model.onnx": {**b, "shippable": False}}) is None


def _report():
    return {"quantize": {"guard": {"within_bound": True, "shippable": True, "verdict": "INT8: proven",
                                   "measured_on": "arm64 (emulated)", "disagreement": {"rate": 0.004, "images": 600, "upper95": 0.012}}},
            "quantize_fp16": {"file": "model.fp16.onnx"},
            "formats": {"files": [
                {"file": "model.tflite", "shippable": True, "why": "agrees", "check": {
                    "top1_agreement_with_fp32": 1.0, "images": 500}},
                {"file": "model.int8.pte", "shippable": False, "why": "over the bound", "check": {
                    "top1_agreement_with_fp32": 0.93, "images": 500}}]}}


def test_file_verdicts_read_the_record_and_where_the_guard_measured():
    v = file_verdicts(_report(), arch="x86_64")
    assert v["model.onnx"]["shippable"] and v["model.tflite"]["shippable"]
    assert v["model.tflite"]["agreement"] == 1.0 and v["model.tflite"]["agreement_images"] == 500
    assert not v["model.int8.pte"]["shippable"] and v["model.int8.pte"]["why"] == "over the bound"
    assert not v["model.fp16.onnx"]["shippable"] and "no accuracy guard" in v["model.fp16.onnx"]["why"]
    # the guard measured under arm64 emulation speaks for the board, not for this x86 host
    assert not v["model.int8.onnx"]["shippable"] and "not on this host" in v["model.int8.onnx"]["why"]
    assert v["model.int8.onnx"]["agreement"] == pytest.approx(0.996)
    assert file_verdicts(_report(), arch="aarch64")["model.int8.onnx"]["shippable"]
    assert list(file_verdicts({})) == ["model.onnx"]


def _bench(machine, models, recommended=None):
    doc = {"schema": "edgexfer.bench/1", "machine": machine, "config": {"threads": 2}, "models": models}
    if recommended is not None:
        doc["recommended"] = recommended
    return doc


def test_compare_gives_a_board_the_run_s_verdicts_and_recommends_on_each_machine(tmp_path):
    host = {"cpu": "AMD EPYC", "arch": "x86_64", "cores": 2}
    board = {"cpu": "Cortex-A76", "arch": "aarch64", "cores": 4}

    def entry(name, p50, size, **kw):
        return {"backend": "litert" if name.endswith("tflite") else "onnxruntime", "file": name, "size_bytes": size,
                "model_id": "id-" + name, "latency_ms": {"p50": p50, "p90": p50, "p99": p50},
                "p50_by_round_ms": [p50] * 10, "quantization": {"format": "QDQ"} if ".int8" in name else None, **kw}

    on_host = {n: entry(n, p, s, shippable=ok, verdict=why) for n, p, s, ok, why in (
        ("model.onnx", 5.0, 4_600_000, True, "FP32"), ("model.tflite", 4.0, 4_600_000, True, "agrees"),
        ("model.int8.tflite", 2.0, 1_300_000, True, "within the bound"))}
    rec_host = recommend(on_host)
    assert rec_host["model"] == "model.int8.tflite"
    # the board benchmarked the bundled files alone: no run folder, no verdicts; LiteRT is the fastest there
    on_board = {n: {k: v for k, v in copy.deepcopy(e).items() if k not in ("shippable", "verdict")}
                for n, e in on_host.items()}
    for n, p in (("model.onnx", 30.0), ("model.tflite", 12.0), ("model.int8.tflite", 6.0)):
        on_board[n]["latency_ms"] = {"p50": p, "p90": p, "p99": p}
        on_board[n]["p50_by_round_ms"] = [p] * 10
    a, b = tmp_path / "host.json", tmp_path / "board.json"
    a.write_text(json.dumps(_bench(host, on_host, rec_host)))
    b.write_text(json.dumps(_bench(board, on_board)))
    doc = compare([a, b])
    rows = {(r["machine"].split(" (")[0], r["model"]): r for r in doc["rows"]}
    assert rows[("Cortex-A76", "model.tflite")]["shippable"]  # FP32: the same answers on any machine
    assert rows[("Cortex-A76", "model.tflite")]["verdict_from"].startswith("AMD EPYC")
    assert "shippable" not in rows[("Cortex-A76", "model.int8.tflite")]  # INT8 kernels differ across architectures
    recs = {m.split(" (")[0]: r for m, r in doc["recommended"].items()}
    assert recs["AMD EPYC"]["model"] == "model.int8.tflite"
    assert recs["Cortex-A76"]["model"] == "model.tflite" and "verdicts from AMD EPYC" in recs["Cortex-A76"]["why"]
    md = to_markdown(doc)
    assert "Recommended on Cortex-A76 (aarch64, 4 cores): model.tflite" in md
    assert "(verdict from AMD EPYC" in md


def test_bench_of_a_run_folder_shows_verdicts_and_a_recommendation(fast_run):
    from tests.conftest import invoke

    r = invoke("bench", str(fast_run), "--iters", "40", "--warmup", "2", "--batches", "1", "--no-e2e",
               "--no-reference", "--no-cold-start", "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    models = res["models"]
    fp32 = next(m for n, m in models.items() if n.endswith("model.onnx"))
    assert fp32["shippable"] and fp32["agreement_with_fp32"] == 1.0 and len(fp32["p50_by_round_ms"]) == 2
    int8 = next(m for n, m in models.items() if n.endswith("model.int8.onnx"))
    rep = json.loads((fast_run / "report.json").read_text())
    assert int8["shippable"] == rep["quantize"]["guard"]["shippable"]
    assert res["recommended"]["model"] in models and res["recommended"]["why"]


def test_too_few_rounds_to_test_means_p50_decides_not_size():
    """With 5 rounds even 5 wins is no evidence at 5% (p = 0.0625): the rule must not let every file tie and the
    smallest win, so p50 alone decides, and the why says so."""
    fast = {"file": "r/model.onnx", "latency_ms": {"p50": 10.0}, "size_bytes": 4_600_000, "shippable": True,
            "p50_by_round_ms": [10.0] * 5}
    slow = {"file": "r/model.int8.onnx", "latency_ms": {"p50": 20.0}, "size_bytes": 1_200_000, "shippable": True,
            "p50_by_round_ms": [20.0] * 5}
    rec = recommend({"model.onnx": fast, "model.int8.onnx": slow})
    assert rec["model"] == "model.onnx" and "by p50 alone" in rec["why"]
    old = {k: {x: y for x, y in v.items() if x != "p50_by_round_ms"} for k, v in (("a", fast), ("b", slow))}
    assert recommend(old)["model"] == "a"  # results of an older bench, without rounds


def test_report_note_never_contradicts_a_tied_int8_recommendation():
    from edgexfer.report import recommend as run_recommend
    from tests.test_guard_unseen import _guard, _report

    rep = _report(_guard(rate=0.002, images=2000), p50=(10.0, 10.3))
    rep["models"]["fp32"]["p50_by_round_ms"] = [10.0, 10.6] * 5
    rep["models"]["int8"]["p50_by_round_ms"] = [10.6, 10.0] * 5
    r = run_recommend(rep, 0.01)
    assert r["model"] == "int8" and "note" not in r


def test_compare_shares_an_int8_verdict_only_within_a_kernel_family():
    from edgexfer.runtime.compare import int8_kernels

    vnni = {"arch": "x86_64", "flags": ["avx2", "avx512f", "avx512_vnni"]}
    assert int8_kernels(vnni) == "x86 with VNNI" and int8_kernels({"arch": "x86_64", "flags": ["avx2"]}) == "x86 AVX2"
    assert int8_kernels({"arch": "aarch64", "flags": ["asimddp"]}) == "arm64"
    assert int8_kernels({"arch": "x86_64", "flags": ["avx512f"]}) != int8_kernels(vnni)
