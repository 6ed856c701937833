"""`--format openvino,executorch` (the convert stage): each model as an OpenVINO IR file and an ExecuTorch
program beside its ONNX file, the metadata inside (rt_info; a second method of the program), checked against
FP32 and judged as the guard judges; EdgeModel, predict and bench open them as they open ONNX; a file without
its metadata or weights is refused in one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from tests.conftest import invoke  # noqa: E402


@pytest.fixture
def converted(fast_run_copy):
    r = invoke("export", fast_run_copy, "--format", "openvino")
    assert r.exit_code == 0, r.stderr[-2000:]
    return fast_run_copy, r


def test_export_format_openvino_writes_checked_ir_files_with_the_metadata(converted):
    run, r = converted
    for name in ("model.xml", "model.bin", "model.int8.xml", "model.int8.bin"):
        assert (run / name).is_file(), name
    rep = json.loads((run / "report.json").read_text())
    f = rep["formats"]
    assert [(x["precision"], x["file"], x["source"]) for x in f["files"]] == \
        [("fp32", "model.xml", "model.onnx"), ("int8", "model.int8.xml", "model.int8.onnx")]
    fp32, int8 = f["files"]
    assert fp32["check"]["top1_agreement_with_source"] >= 0.995 and fp32["shippable"]
    assert fp32["check"]["max_abs_prob_diff_vs_source"] < 1e-3
    # the fast run's data holds no unseen images (every label used, no --guard-data): no INT8 promise
    assert f["unseen"] is False and not int8["shippable"]
    assert "model.xml: openvino fp32, shippable" in r.stdout
    assert rep["stages"]["convert"] and json.loads((run / "config.json").read_text())["formats"] == ["openvino"]

    from edgexfer.runtime import EdgeModel

    onnx, ir = EdgeModel(run / "model.onnx"), EdgeModel(run / "model.xml")
    assert ir.meta == onnx.meta and ir.providers == ["OpenVINO:CPU"] and ir.e2e_used is False
    x = np.random.default_rng(0).standard_normal((5, *onnx.input_shape)).astype(np.float32)
    a, b = onnx.run(x), ir.run(x)
    assert np.abs(a["label"] - b["label"]).max() < 1e-3 and (a["label"].argmax(1) == b["label"].argmax(1)).all()


def test_predict_and_bench_take_an_ir_file(converted, image_folder):
    run, _ = converted
    img = next(p for p in sorted(image_folder.rglob("*.png")))
    a, b = (invoke("predict", run / name, img, "--top-k", "2") for name in ("model.onnx", "model.xml"))
    assert a.exit_code == b.exit_code == 0, b.stderr
    assert json.loads(a.stdout)["predictions"][0]["label"] == json.loads(b.stdout)["predictions"][0]["label"]
    res = invoke("bench", run / "model.onnx", run / "model.xml", "--iters", "3", "--warmup", "1", "--no-cold-start",
                 "--no-e2e", "--batches", "1", "--json")
    assert res.exit_code == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout)["models"]
    ir = next(v for v in rows.values() if str(v["file"]).endswith("model.xml"))
    assert ir["backend"].startswith("openvino") and ir["size_bytes"] == \
        (run / "model.xml").stat().st_size + (run / "model.bin").stat().st_size


def test_an_ir_without_its_metadata_or_weights_is_one_line(converted, tmp_path):
    import openvino as ov

    run, _ = converted
    bare = tmp_path / "bare.xml"
    ov.save_model(ov.convert_model(str(run / "model.onnx")), str(bare), compress_to_fp16=False)
    r = invoke("predict", bare, next(iter(sorted(run.parent.rglob("*.png"))), run / "none.png"))
    assert r.exit_code == 1 and "carries no edgexfer metadata" in r.stderr and "Traceback" not in r.stderr
    lone = tmp_path / "lone.xml"
    shutil.copy(run / "model.xml", lone)
    r = invoke("bench", lone, "--iters", "2", "--no-cold-start")
    assert r.exit_code == 1 and "lone.bin is missing" in r.stderr and "Traceback" not in r.stderr


def test_a_new_int8_file_removes_the_ir_made_from_the_old_one(converted):
    from edgexfer.runfolder import RunFolder

    run, _ = converted
    RunFolder(run).begin("quantize")  # what quantize does as it starts writing
    assert not (run / "model.int8.xml").exists() and not (run / "model.xml").exists()
    assert "formats" not in json.loads((run / "report.json").read_text())


def test_format_option_and_stage_list():
    from edgexfer.config import RunConfig
    from edgexfer.runfolder import CONVERT, stages_for

    assert CONVERT not in stages_for(RunConfig())
    assert stages_for(RunConfig(formats=("openvino",))).index(CONVERT) == stages_for(RunConfig()).index("quantize") + 1
    with pytest.raises(ValueError, match="unknown format"):
        RunConfig(formats=("coreml",))
    assert stages_for(RunConfig(formats=("litert",))) == stages_for(RunConfig(formats=("openvino",)))
    assert RunConfig.from_dict(RunConfig(formats=("openvino",)).to_dict()).formats == ("openvino",)
    r = invoke("export", "nowhere", "--format", "onnx,coreml")
    assert r.exit_code == 2 and "'coreml' is not a format" in r.stderr


@pytest.mark.parametrize("key,check,unseen,source,ok,words", [
    ("fp32", {"images": 100, "top1_agreement_with_source": 1.0}, False, None, True, "100.0% of 100"),
    ("fp32", {"images": 100, "top1_agreement_with_source": 0.99}, True, None, False, "at least 99.5%"),
    ("int8", {"images": 1000, "top1_agreement_with_source": 0.99, "top1_agreement_with_fp32": 0.999,
              "disagreement_upper95": 0.006}, True, (True, "INT8"), True, "within the 1.00% bound"),
    ("int8", {"images": 1000, "top1_agreement_with_source": 0.99, "top1_agreement_with_fp32": 0.999,
              "disagreement_upper95": 0.006}, True, None, True, "within the 1.00% bound"),  # its own quantization
    ("int8", {"images": 1000, "top1_agreement_with_source": 0.99, "top1_agreement_with_fp32": 0.985,
              "disagreement_upper95": 0.024}, True, None, False, "over the 1.00% bound"),
    ("int8", {"images": 300, "top1_agreement_with_source": 1.0, "top1_agreement_with_fp32": 1.0,
              "disagreement_upper95": 0.004}, False, (True, "INT8"), False, "fitted on"),
    ("int8", {"images": 1000, "top1_agreement_with_source": 1.0, "top1_agreement_with_fp32": 1.0,
              "disagreement_upper95": 0.004}, True, (False, "INT8, unproven"), False,
     "its ONNX source is not shippable (INT8, unproven)"),
])
def test_conversion_verdict(key, check, unseen, source, ok, words):
    from edgexfer.pipeline import conversion_verdict

    got, why = conversion_verdict(key, check, unseen, source, 0.01)
    assert got is ok and words in why


def test_run_with_format_openvino_on_a_finished_run_converts_and_keeps_the_rest(fast_run_copy, image_folder):
    from tests.conftest import FAST_RUN_ARGS

    before = json.loads((fast_run_copy / "report.json").read_text())["stages"]
    r = invoke("run", "--data", image_folder, "--runs", fast_run_copy.parent, "--name", fast_run_copy.name,
               *FAST_RUN_ARGS, "--format", "openvino")
    assert r.exit_code == 0, r.stderr[-2000:]
    after = json.loads((fast_run_copy / "report.json").read_text())["stages"]
    assert "convert" in after and all(after[s] == before[s] for s in before)  # nothing else ran again
    assert (fast_run_copy / "model.int8.xml").is_file()


def test_executorch_programs_carry_the_metadata_and_answer_as_fp32(fast_run_copy):
    pytest.importorskip("executorch")
    r = invoke("export", fast_run_copy, "--format", "executorch")
    assert r.exit_code == 0, r.stderr[-2000:]
    rows = {x["file"]: x for x in json.loads((fast_run_copy / "report.json").read_text())["formats"]["files"]}
    assert set(rows) == {"model.pte", "model.int8.pte"}
    fp32, int8 = rows["model.pte"], rows["model.int8.pte"]
    assert fp32["source"] == int8["source"] == "checkpoint.pt" and fp32["delegate"] == "XNNPACK"
    assert fp32["check"]["top1_agreement_with_source"] >= 0.995 and fp32["shippable"]
    assert int8["quantization"].startswith("PT2E") and int8["calibration_images"] > 0
    assert not int8["shippable"] and "fitted on" in int8["why"]  # no unseen images in the fast run's data

    from edgexfer.runtime import EdgeModel

    onnx, pte = EdgeModel(fast_run_copy / "model.onnx"), EdgeModel(fast_run_copy / "model.pte")
    assert pte.meta.tasks == onnx.meta.tasks and pte.providers == ["ExecuTorch:XNNPACK"]
    x = np.random.default_rng(1).standard_normal((3, *onnx.input_shape)).astype(np.float32)
    assert np.abs(onnx.run(x)["label"] - pte.run(x)["label"]).max() < 1e-3
    assert 1 <= pte.session.max_batch == fp32["max_batch"]  # what the memory plan holds, as the program records it
    big = np.random.default_rng(2).standard_normal((2 * fp32["max_batch"] + 3, *onnx.input_shape)).astype(np.float32)
    assert np.abs(onnx.run(big)["label"] - pte.run(big)["label"]).max() < 1e-3  # split into calls it takes
    assert EdgeModel(fast_run_copy / "model.int8.pte").meta.quantization["method"].startswith("PT2E")


def test_a_program_without_the_metadata_method_is_one_line(fast_run_copy, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("executorch")
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(torch.nn.Linear(4, 2).eval(), (torch.zeros(1, 4),))
    bare = tmp_path / "bare.pte"
    bare.write_bytes(to_edge_transform_and_lower(ep).to_executorch().buffer)
    r = invoke("bench", bare, "--iters", "2", "--no-cold-start")
    assert r.exit_code == 1 and "no 'edgexfer_meta' method" in r.stderr and "Traceback" not in r.stderr


def test_bench_formats_all_times_every_format_of_a_run_folder(fast_run_copy):
    pytest.importorskip("executorch")
    assert invoke("export", fast_run_copy, "--format", "openvino,executorch").exit_code == 0
    res = invoke("bench", fast_run_copy, "--formats", "all", "--iters", "3", "--warmup", "1", "--no-cold-start",
                 "--no-e2e", "--no-reference", "--batches", "1", "--json")
    assert res.exit_code == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout)["models"]
    files = [Path(v["file"]).name for v in rows.values()]
    assert files[:2] == ["model.onnx", "model.int8.onnx"] and set(files[2:]) == \
        {"model.xml", "model.int8.xml", "model.pte", "model.int8.pte"}
    assert {v["backend"].split()[0] for v in rows.values()} == {"onnxruntime", "openvino", "executorch"}
    only_onnx = invoke("bench", fast_run_copy, "--iters", "2", "--warmup", "1", "--no-cold-start", "--no-e2e",
                       "--no-reference", "--batches", "1", "--json")
    assert all(Path(v["file"]).suffix == ".onnx" for v in json.loads(only_onnx.stdout)["models"].values())


def test_a_file_that_is_not_a_model_of_its_format_is_one_line(tmp_path):
    (tmp_path / "bad.xml").write_text("<net>")
    (tmp_path / "bad.bin").write_bytes(b"x")
    r = invoke("predict", tmp_path / "bad.xml", tmp_path / "bad.bin")
    assert r.exit_code == 1 and "cannot load" in r.stderr and "Unable to read the model" in r.stderr
    assert "Traceback" not in r.stderr
    pytest.importorskip("executorch")
    (tmp_path / "bad.pte").write_bytes(b"garbage")
    r = invoke("predict", tmp_path / "bad.pte", tmp_path / "bad.bin")
    assert r.exit_code == 1 and "as an ExecuTorch program" in r.stderr and "Traceback" not in r.stderr


def test_format_without_its_package_is_one_line_before_anything_is_written(fast_run_copy, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    before = sorted(p.name for p in fast_run_copy.iterdir())
    r = invoke("export", fast_run_copy, "--format", "openvino", "--force")
    assert r.exit_code == 1 and 'pip install "edgexfer[openvino]"' in r.stderr
    assert sorted(p.name for p in fast_run_copy.iterdir()) == before


def test_bundle_runtime_ships_the_formats_file_the_record_offers(converted, tmp_path):
    run, _ = converted
    r = invoke("bundle", run, tmp_path / "ov", "--runtime", "openvino", "--no-wheels")
    assert r.exit_code == 0, r.stderr[-2000:]
    out = tmp_path / "ov"
    manifest = json.loads((out / "bundle.json").read_text())
    # the fast run's INT8 IR is not shippable (no unseen images): FP32, and the record's reason
    assert manifest["model"] == "model.xml" and manifest["runtime"] == "openvino" and "FP32" in manifest["why"]
    assert (out / "model.bin").is_file() and any(q.startswith("openvino") for q in manifest["requirements"])
    assert manifest["e2e"] is None
    from edgexfer.runtime import EdgeModel

    assert EdgeModel(out / "model.xml").meta == EdgeModel(run / "model.onnx").meta
    r = invoke("bundle", run, tmp_path / "et", "--runtime", "executorch", "--no-wheels")
    assert r.exit_code == 1 and "--format executorch" in r.stderr and not (tmp_path / "et").exists()
    r = invoke("bundle", run / "model.xml", tmp_path / "x", "--runtime", "onnxruntime", "--no-wheels")
    assert r.exit_code == 1 and "not a file for --runtime onnxruntime" in r.stderr


def test_litert_files_carry_the_metadata_and_answer_as_fp32(fast_run_copy, tmp_path):
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    r = invoke("export", fast_run_copy, "--format", "litert")
    assert r.exit_code == 0, r.stderr[-2000:]
    rows = {x["file"]: x for x in json.loads((fast_run_copy / "report.json").read_text())["formats"]["files"]}
    fp32, int8 = rows["model.tflite"], rows["model.int8.tflite"]
    assert fp32["source"] == "checkpoint.pt" and fp32["check"]["top1_agreement_with_source"] >= 0.995
    assert fp32["shippable"] and not int8["shippable"] and int8["quantization"].startswith("PT2E")

    from edgexfer.runtime import EdgeModel

    onnx, lite = EdgeModel(fast_run_copy / "model.onnx"), EdgeModel(fast_run_copy / "model.tflite")
    assert lite.meta.tasks == onnx.meta.tasks and lite.providers == ["LiteRT:XNNPACK"]
    x = np.random.default_rng(3).standard_normal((5, *onnx.input_shape)).astype(np.float32)
    assert np.abs(onnx.run(x)["label"] - lite.run(x)["label"]).max() < 1e-3  # batch 5 from a batch-1 file
    q = EdgeModel(fast_run_copy / "model.int8.tflite")  # full integer or not, it takes and gives float32
    assert q.run(x)["label"].dtype == np.float32 and q.meta.quantization["method"].startswith("PT2E")
    # the flatbuffer alone, its appended metadata cut off: refused in one line
    raw = (fast_run_copy / "model.tflite").read_bytes()
    end = raw.rfind(b"PK\x03\x04")
    (tmp_path / "bare.tflite").write_bytes(raw[:end])
    r = invoke("bench", tmp_path / "bare.tflite", "--iters", "2", "--no-cold-start")
    assert r.exit_code == 1 and "no edgexfer_meta.json associated file" in r.stderr and "Traceback" not in r.stderr
