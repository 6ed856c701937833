"""`edgexfer bench`: single-stream percentiles, offline throughput, cold start, RSS, sweep, references."""
import json
import subprocess
import sys

from tests.conftest import run_cli


def test_runtime_bench_document(tiny_run, tmp_path):
    out = tmp_path / "b.json"
    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(tiny_run / "model.onnx"),
                        str(tiny_run / "model.int8.onnx"), "--iters", "5", "--warmup", "2", "--batches", "1,4",
                        "--sweep", "1,2", "--no-reference", "--json", str(out), "--markdown", str(tmp_path / "b.md"),
                        "--plot", str(tmp_path / "b.png")],
                       capture_output=True, text=True, check=True)
    res = json.loads(out.read_text())
    assert res["schema"] == "edgexfer.bench/1"
    assert res["input_shape"] == [1, 3, 64, 64]
    assert "cpu" in res["machine"] and "flags" in res["machine"] and res["machine"]["onnxruntime"]
    first, second = res["models"]["model.onnx"], res["models"]["model.int8.onnx"]
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
    assert "| model.int8.onnx |" in (tmp_path / "b.md").read_text() and "| model.int8.onnx |" in p.stdout
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_run_folder_adds_pytorch_reference(tiny_run, tmp_path):
    p = run_cli("bench", tiny_run, "--iters", "3", "--warmup", "1", "--batches", "1", "--no-cold-start",
                "--json", tmp_path / "b.json", check=True)
    res = json.loads((tmp_path / "b.json").read_text())
    assert {"model.onnx", "model.int8.onnx", "pytorch_eager"} <= set(res["models"])
    assert res["models"]["pytorch_eager"]["backend"].startswith("pytorch")
    assert "pytorch_eager" in p.stdout


def test_bench_duration_mode(tiny_run, tmp_path):
    subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(tiny_run / "model.int8.onnx"),
                        "--duration", "0.5", "--batches", "1", "--no-cold-start", "--no-reference",
                        "--json", str(tmp_path / "d.json")], capture_output=True, text=True, check=True)
    res = json.loads((tmp_path / "d.json").read_text())
    assert res["models"]["model.int8.onnx"]["latency_ms"]["n"] >= 5


def test_bench_bad_input(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgexfer.runtime", "bench", str(tmp_path / "none.onnx")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr.strip().startswith("error:") and "Traceback" not in p.stderr
