"""`edgexfer bench`: single-stream percentiles, offline throughput, cold start, RSS, sweep, references."""
import json
import subprocess
import sys

from tests.conftest import run_cli


def test_runtime_bench_document(tiny_run, tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(tiny_run / "model.onnx"),
                        str(tiny_run / "model.int8.onnx"), "--iters", "5", "--warmup", "2", "--batches", "1,4",
                        "--sweep", "1,2", "--no-reference", "--json-out", str(out), "--markdown", str(tmp_path / "b.md"),
                        "--plot", str(tmp_path / "b.png")],
                       capture_output=True, text=True, check=True)
    res = json.loads(out.read_text())
    assert res["schema"] == "edgexfer.bench/1"
    assert res["input_shape"] == [1, 3, 64, 64]
    assert "cpu" in res["machine"] and "flags" in res["machine"] and res["machine"]["onnxruntime"]
    first, second = res["models"]["tiny/model.onnx"], res["models"]["tiny/model.int8.onnx"]  # rows: RUN/FILE
    for r in (first, second):
        lat = r["latency_ms"]
        assert lat["n"] == 5 and lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert set(r["throughput_img_s"]) == {"1", "4"} and min(r["throughput_img_s"].values()) > 0
        cs = r["cold_start"]
        assert 0 < cs["session_ready_s"] <= cs["first_result_s"] < 60 and 10 < cs["peak_rss_mb"] < 2000
        assert set(r["thread_sweep_p50_ms"]) == {"1", "2"}
        assert r["size_bytes"] > 0
    assert first["p50_ratio_to_first"] == 1.0
    assert second["quantization"]["format"] == "QDQ"
    # ONNX Runtime's default session (spinning threads), the models in alternating blocks (capped at --iters)
    assert res["config"]["spinning"] is True and res["config"]["block"] == 20
    assert "spinning threads on" in p.stdout
    assert "| tiny/model.int8.onnx |" in (tmp_path / "b.md").read_text() and "| tiny/model.int8.onnx |" in p.stdout
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_run_folder_adds_pytorch_reference(tiny_run, tmp_path):
    p = run_cli("bench", tiny_run, "--iters", "3", "--warmup", "1", "--batches", "1", "--no-cold-start",
                "--json-out", tmp_path / "b.json", check=True)
    res = json.loads((tmp_path / "b.json").read_text())
    assert {"tiny/model.onnx", "tiny/model.int8.onnx", "pytorch_eager"} <= set(res["models"])
    assert res["models"]["pytorch_eager"]["backend"].startswith("pytorch")
    assert "pytorch_eager" in p.stdout


def test_bench_duration_mode(tiny_run, tmp_path):
    subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(tiny_run / "model.int8.onnx"),
                        "--duration", "0.5", "--batches", "1", "--no-cold-start", "--no-reference",
                        "--json-out", str(tmp_path / "d.json")], capture_output=True, text=True, check=True)
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["models"]["tiny/model.int8.onnx"]["latency_ms"]["n"] >= 5


def test_bench_bad_input(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(tmp_path / "none.onnx")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr


def _tiny_files(tmp_path, sides=(8, 16)):
    from tests._onnx_model import good_meta, onnx_bytes

    paths = []
    for side in sides:
        p = tmp_path / f"m{side}.onnx"
        p.write_bytes(onnx_bytes(good_meta(classes=3, side=side), classes=3, side=side))
        paths.append(p)
    return paths


def test_models_of_different_input_sizes_are_one_interleaved_run(tmp_path):
    """Each model gets an input of its own size (it was refused: "different input shapes")."""
    from edgexfer.runtime.bench import BenchConfig, run_benchmark, to_markdown

    small, big = _tiny_files(tmp_path)
    res = run_benchmark([small, big], BenchConfig(warmup=1, iters=5, batches=(1, 2), cold_start=False))
    assert "input_shape" not in res  # no one shape for the whole run
    m8, m16 = f"{tmp_path.name}/m8.onnx", f"{tmp_path.name}/m16.onnx"  # rows: the folder and the file
    assert res["models"][m8]["input_shape"] == [1, 3, 8, 8]
    assert res["models"][m16]["input_shape"] == [1, 3, 16, 16]
    for r in res["models"].values():
        if r["backend"] == "onnxruntime":
            assert r["latency_ms"]["n"] == 5 and set(r["throughput_img_s"]) == {"1", "2"}
    md = to_markdown(res)
    assert "| input |" in md and f"| {m8} | onnxruntime | 3×8×8 |" in md and f"| {m16} | onnxruntime | 3×16×16 |" in md
    same = run_benchmark([small, small], BenchConfig(warmup=1, iters=3, batches=(1,), cold_start=False))
    assert same["input_shape"] == [1, 3, 8, 8] and "| input |" not in to_markdown(same)


def test_batch_1_throughput_is_the_single_stream_p50(tmp_path):
    """img/s @1 and p50 come from one run, so they agree (a separate 10-call run could read half of 1000/p50)."""
    from edgexfer.runtime.bench import BenchConfig, run_benchmark, to_markdown

    (small,) = _tiny_files(tmp_path, sides=(8,))
    res = run_benchmark([small], BenchConfig(warmup=1, iters=7, batches=(1, 4), cold_start=False, openvino=False))
    r = res["models"][f"{tmp_path.name}/m8.onnx"]
    assert r["throughput_img_s"]["1"] == 1e3 / r["latency_ms"]["p50"]
    md = to_markdown(res)
    assert "- img/s @1: 1000 / p50, from the same single-stream run." in md
    assert "- img/s @4: the batch size over the median time of one call on that many images" in md


def test_every_column_is_explained_and_skipped_backends_say_why(tmp_path):
    import importlib.util

    (small,) = _tiny_files(tmp_path, sides=(8,))
    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(small), "--iters", "3", "--warmup", "1",
                        "--batches", "1,2", "--json-out", str(tmp_path / "b.json")], capture_output=True, text=True, check=True)
    header = next(l for l in p.stdout.splitlines() if l.startswith("| model |"))
    notes = p.stdout.split(header, 1)[1]
    columns = [c.strip() for c in header.strip("|").split("|")][2:]  # after model and backend
    assert {"ready s", "first result s", "peak RSS MB", "img/s @1", "img/s @2"} <= set(columns)
    for col in columns:
        assert f"{col}:" in notes or f"{col}," in notes, f"column {col!r} is not explained under the table"
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["not_measured"]["pytorch_eager"].startswith("needs a run folder")
    assert "Not measured: PyTorch eager — needs a run folder (its checkpoint.pt)" in p.stdout
    if importlib.util.find_spec("openvino") is None:
        assert "Not measured: OpenVINO — the openvino package is not installed" in p.stdout
    else:
        assert any(k.startswith("openvino:") for k in res["models"])
    q = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(small), "--iters", "3", "--warmup", "1",
                        "--batches", "1", "--no-cold-start", "--no-reference"], capture_output=True, text=True, check=True)
    assert "Not measured: OpenVINO — not asked for (--no-reference)." in q.stdout
    assert "ready s" not in q.stdout  # no cold-start columns, so no note on them


def test_bench_no_spinning_times_call_by_call(tiny_run, tmp_path):
    """--no-spinning: sessions without spinning threads, one call of each model in turn, and the output says so."""
    from edgexfer.runtime.bench import Candidate, interleaved

    p = run_cli("bench", tiny_run / "model.onnx", tiny_run / "model.int8.onnx", "--no-spinning", "--iters", "4",
                "--warmup", "1", "--batches", "1", "--no-cold-start", "--no-reference", "--json-out", tmp_path / "b.json",
                check=True)
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["config"]["spinning"] is False and "no spinning, interleaved call by call" in p.stdout
    assert all(r["latency_ms"]["n"] == 4 for r in res["models"].values())
    # blocks: each candidate's calls come in runs of `block`, and about `iters` calls each in all
    order = []
    cands = [Candidate(n, lambda x, n=n: order.append(n)) for n in "ab"]
    out = interleaved(cands, 0, warmup=0, iters=6, block=3)
    assert order == list("aaabbbaaabbb") and out["a"]["n"] == out["b"]["n"] == 6
