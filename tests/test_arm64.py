"""arm64 under qemu user-mode emulation: `edgexfer verify --arch arm64`, the emulated root filesystem's
pins (shared with the Docker image), and the arm64 bundle.

The emulated tests need root, qemu-user-static and debootstrap, and the cached root filesystem that
`make arm64` builds (`make test` builds it first). Without root or the tools they skip and say why;
under CI as root they must run. The offline install of an arm64 bundle (about 2 min under emulation)
runs with EDGEXFER_ARM64_FULL=1, as `make verify-arm64` sets.
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from edgexfer.runtime import emulate
from edgexfer.runtime.verify import sample, scan_images, verify_arm64
from tests.conftest import CLASSES, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _arm64_or_skip():
    why = emulate.missing()
    if why:
        pytest.skip(f"arm64 emulation unavailable: {why}")
    if not emulate.ready():
        msg = f"the arm64 root filesystem is not set up in {emulate.cache_dir()}: run `make arm64` (as root)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI runs as root after `make arm64`: a skip here would hide a broken set-up
        pytest.skip(msg)


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | set().union(*(_keys(v) for v in obj.values()))
    return set().union(*(_keys(v) for v in obj)) if isinstance(obj, list) else set()


def _no_latency(res: dict) -> bool:
    """Emulated timing is never reported as latency: no latency or per-call millisecond field anywhere."""
    return not any("latency" in k or k.endswith("_ms") or k.startswith("p50") for k in _keys(res))


def _pins(path: Path) -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {emulate.canonical(n): v for n, v in (ln.split("==") for ln in lines if ln)}


# -- no emulation needed -----------------------------------------------------------------------------

def test_image_and_emulated_board_install_the_same_pins():
    req = ROOT / "requirements-runtime.txt"
    pins = _pins(req)
    assert {"numpy", "onnxruntime", "pillow"} <= set(pins) and all(pins.values())
    assert {emulate.canonical(k): v for k, v in (r.split("==") for r in emulate.requirements())} == pins
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^COPY requirements-runtime\.txt ", docker, re.M)
    assert re.search(r"pip install [^\n]*-r requirements-runtime\.txt", docker)
    assert "--no-deps" in docker  # the edgexfer package itself adds nothing beyond the pins
    assert "TARGETPLATFORM" in docker or "TARGETARCH" in docker
    assert "/v2/health/ready" in docker and re.search(r"^USER (?!root)\w+", docker, re.M)


def test_missing_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in emulate.missing()


def test_verify_needs_root_one_line(monkeypatch, tiny_run, capsys):
    from edgexfer.runtime.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as e:
        main(["verify", "--arch", "arm64", str(tiny_run / "model.onnx"), "--images", str(tiny_run.parent)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "error:" in err[0]


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "not found"),
    (["{model}"], "needs --images"),
    (["{model}", "--images", "nowhere"], "image folder not found"),
])
def test_verify_bad_input(tiny_run, args, message):
    args = [a.format(model=tiny_run / "model.onnx") for a in args]
    p = run_cli("verify", "--arch", "arm64", *args)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_scan_images_labelled_and_plain(image_folder, tmp_path):
    paths, y, kind = scan_images(image_folder, CLASSES)
    assert len(paths) == len(y) and set(y.tolist()) == {0, 1, 2} and "ImageFolder" in kind
    plain = tmp_path / "plain"
    plain.mkdir()
    for p in paths[:3]:
        (plain / p.name).write_bytes(p.read_bytes())
    paths, y, kind = scan_images(plain, CLASSES)
    assert len(paths) == 3 and y is None and "agreement only" in kind
    assert sample(10, 4, 0).tolist() == sorted(set(sample(10, 4, 0).tolist())) and len(sample(10, 4, 0)) == 4


def test_verify_flags_disagreement(monkeypatch, tiny_run, image_folder):
    """The comparison itself: a board that flips one prediction is caught (emulation faked)."""
    def fake_run_models(models, *, images, threads):
        from edgexfer.runtime.model import EdgeModel

        outs = []
        for m in models:
            em = EdgeModel(m)
            x = em.preprocess(images)
            logits = em.run(x)
            task = em.meta.tasks[0].name
            flipped = logits[task].copy()
            flipped[0] = flipped[0][::-1] + np.arange(flipped.shape[1]) * 10  # a different top-1
            outs.append({task: flipped})
        return {"outputs": outs, "inputs": x, "info": {"arch": "aarch64"}, "seconds": 0.0}

    monkeypatch.setattr(emulate, "run_models", fake_run_models)
    paths, y, _ = scan_images(image_folder, CLASSES)
    res = verify_arm64([tiny_run / "model.onnx"], paths[:5], y[:5], source="test")
    r = res["models"]["model.onnx"]
    assert r["top1_agreement"] == pytest.approx(0.8) and r["disagreements"] == [0] and not res["passed"]
    assert r["max_abs_diff"] > 1 and _no_latency(res)


def test_guard_decides_on_the_target_figure(tiny_run, tmp_path):
    """With a target measurement, the guard ships what the target's figure allows and only records the
    host's (here the host 'saturates' to 0 while the target keeps 1.0: plain INT8 ships)."""
    from edgexfer.exporters.quantize import Int8Recipe
    from edgexfer.guard import Judge, Scorer, guarded_quantize

    calib = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    judge = Judge([Scorer("guard_accuracy", lambda p: 1.0, "decides", 1.0, measured_on="arm64 (emulated)"),
                   Scorer("host_accuracy", lambda p: 0.0)], 0.01)
    rec = guarded_quantize(tiny_run / "model.onnx", tmp_path / "q.onnx", calib, Int8Recipe(reduce_range=False), judge)
    g = rec["guard"]
    assert g["chosen_fp32_layers"] == 0 and g["within_bound"] and g["measured_on"] == "arm64 (emulated)"
    assert g["candidates"] == [dict(g["candidates"][0], host_accuracy=0.0)] and (tmp_path / "q.onnx").is_file()


def test_arm64_target_without_emulation_says_why(monkeypatch, tmp_path):
    from edgexfer.exporters.quantize import recipe_for
    from edgexfer.pipeline import _arm64_emulation

    monkeypatch.setenv("EDGEXFER_ARM64_CACHE", str(tmp_path / "empty"))
    recipe, target = recipe_for("arm64")
    if target["host_measures_faithfully"]:
        pytest.skip("this host measures arm64 INT8 faithfully (VNNI or arm64)")
    assert _arm64_emulation(target) is False and target["warning"]
    assert "make arm64" in target["arm64_emulation"] or "root" in target["arm64_emulation"]


# -- under emulation ------------------------------------------------------------------------------------

def test_emulated_venv_has_the_pins():
    _arm64_or_skip()
    got = emulate.installed_versions()
    for name, version in _pins(ROOT / "requirements-runtime.txt").items():
        assert got.get(name) == version, (name, got.get(name))


def test_verify_run_folder_under_arm64(run_copy):
    """CI's smoke check: the tiny run's FP32 and INT8 files under emulated arm64 on a few test images."""
    _arm64_or_skip()
    tiny_run = run_copy  # verify writes verify_arm64.json into the run folder: a copy, not the session's run
    p = run_cli("verify", "--arch", "arm64", tiny_run, "--samples", "6", check=True)
    res = json.loads((tiny_run / "verify_arm64.json").read_text())
    assert res["schema"] == "edgexfer.verify/1" and res["passed"] and res["sample"]["n"] == 6
    assert set(res["models"]) == {"model.onnx", "model.int8.onnx"}
    fp32, int8 = res["models"]["model.onnx"], res["models"]["model.int8.onnx"]
    assert fp32["top1_agreement"] == 1.0 and fp32["max_abs_diff"] < 1e-3
    # the same top-1 on the same 6 labelled images: the same accuracy, a count of 6
    assert int8["top1_agreement"] == 1.0 and int8["accuracy_arm64"] == int8["accuracy_host"]
    assert int8["accuracy_arm64"] * 6 == pytest.approx(round(int8["accuracy_arm64"] * 6))
    assert res["arm64"]["arch"] == "aarch64" and res["input_max_abs_diff"] < 1e-6
    assert _no_latency(res) and "not latency" in p.stdout


def test_verify_litert_files_under_arm64(run_copy):
    """A run folder's LiteRT files under the emulated board, in ai-edge-litert's aarch64 wheel (installed into the
    emulated venv the first time, at this host's version, its dependencies resolved for the board's markers)."""
    _arm64_or_skip()
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    run_cli("export", run_copy, "--format", "litert", check=True)
    run_cli("verify", "--arch", "arm64", run_copy, "--formats", "litert", "--samples", "6", check=True)
    res = json.loads((run_copy / "verify_arm64.json").read_text())
    assert list(res["models"]) == ["model.onnx", "model.int8.onnx", "model.tflite", "model.int8.tflite"]
    assert res["models"]["model.tflite"]["top1_agreement"] == 1.0 and res["models"]["model.tflite"]["max_abs_diff"] < 1e-3
    assert res["arm64"]["runtimes"]["model.tflite"].startswith("litert ") and res["passed"]
    assert res["host"]["runtimes"]["model.tflite"] == res["arm64"]["runtimes"]["model.tflite"]  # the same version
    p = run_cli("verify", "--arch", "arm64", run_copy, "--formats", "executorch")
    assert p.returncode == 1 and "cannot be verified under emulated arm64" in p.stderr and "Traceback" not in p.stderr


def test_verify_bare_model_with_image_folder(tiny_run, image_folder, tmp_path):
    _arm64_or_skip()
    out = tmp_path / "v.json"
    run_cli("verify", "--arch", "arm64", tiny_run / "model.int8.onnx", "--images", image_folder, "--samples", "4",
            "--json-out", out, check=True)
    res = json.loads(out.read_text())
    assert list(res["models"]) == ["model.int8.onnx"] and res["sample"]["labelled"] and res["sample"]["n"] == 4


def test_quantize_target_arm64_guard_on_emulated_arm64(tiny_run, tmp_path):
    """`edgexfer quantize --target arm64`: candidates scored by the arm64 runtime, this host's beside them,
    both in report.json and report.md."""
    _arm64_or_skip()
    run = tmp_path / "run"
    run.mkdir()
    for f in ("checkpoint.pt", "config.json", "model.onnx", "report.json"):
        (run / f).write_bytes((tiny_run / f).read_bytes())
    run_cli("quantize", run, "--target", "arm64", "--tuner", "builtin", "--max-accuracy-drop", "1.0",
            env={"EDGEXFER_ARM64_GUARD_SAMPLES": "8"}, check=True)
    rep = json.loads((run / "report.json").read_text())
    q, g = rep["quantize"], rep["quantize"]["guard"]
    assert q["reduce_range"] is False and q["target"]["target"] == "arm64" and not q["target"].get("warning")
    if q["target"]["host_measures_faithfully"]:  # a VNNI host computes arm64's U8S8 as arm64 does: no emulation
        assert g["measured_on"] == "this host" and "arm64_emulation" not in q["target"]
        return
    assert g["measured_on"] == "arm64 (emulated)" and g["guard_set"].startswith("8 validation images")

    def of_8(a: float) -> bool:  # an accuracy on the 8 sampled validation images: a count of 8
        return a * 8 == pytest.approx(round(a * 8))

    assert all(of_8(c["host_accuracy"]) and of_8(c["guard_accuracy"]) for c in g["candidates"])
    assert of_8(g["fp32_host_accuracy"]) and g["shipped_host_accuracy"] in [c["host_accuracy"] for c in g["candidates"]]
    from edgexfer.report import checks, report_md

    assert "| accuracy on arm64 (emulated) (decides) | accuracy on this host |" in report_md(rep)
    check = next(c for c in checks(rep, 1.0) if c["name"] == "INT8 accuracy drop vs FP32 on arm64 (emulated)")
    assert check["ok"] is True and "this host measured" in check["note"]


def test_image_entrypoint_and_healthcheck_under_arm64(tiny_run):
    """The Docker image's ENTRYPOINT and HEALTHCHECK, run as written in the Dockerfile, in the emulated
    install (the same pins): the server comes up and /v2/health/ready answers."""
    _arm64_or_skip()
    import socket
    import subprocess
    import time

    docker = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", docker, re.M).group(1))
    health = re.search(r'CMD python -c "(.*)" \|\| exit 1', docker).group(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with emulate.Job() as job:
        model = job.put(tiny_run / "model.int8.onnx")
        server = job.popen([f"{emulate.VENV}/bin/{entry[0]}", *entry[1:], model],
                           env={"EDGEXFER_HOST": "127.0.0.1", "EDGEXFER_PORT": str(port)})
        try:
            deadline, ok = time.monotonic() + 240, None
            while time.monotonic() < deadline and server.poll() is None:
                r = job.python(["-c", health.replace("8000", str(port))], timeout=120)
                if r.returncode == 0:
                    ok = True
                    break
                time.sleep(2)
            assert ok, f"no answer on /v2/health/ready (server exit {server.poll()})"
        finally:
            server.terminate()
            try:
                out = server.communicate(timeout=60)[0]
            except subprocess.TimeoutExpired:
                server.kill()
                out = server.communicate()[0]
    assert "Traceback" not in out, out[-2000:]


@pytest.mark.skipif(os.environ.get("EDGEXFER_ARM64_FULL") != "1", reason="about 2 min under emulation: "
                    "EDGEXFER_ARM64_FULL=1 (make verify-arm64)")
def test_arm64_bundle_installs_offline_and_classifies(tiny_run, image_folder, tmp_path):
    _arm64_or_skip()
    out = tmp_path / "bundle"
    run_cli("bundle", tiny_run, out, "--arch", "arm64", check=True)
    assert any("aarch64" in w.name for w in (out / "wheels").glob("onnxruntime-*.whl"))
    r = emulate.install_bundle(out, next(image_folder.rglob("*.png")))
    preds = r["prediction"]["predictions"]
    assert len(preds) == 3 and preds[0]["label"] in CLASSES
