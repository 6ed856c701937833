"""Issue 27, "the first hour without surprises": what `run` says next, interrupts and refused re-runs that
explain themselves, `predict` on folders with a corrupt image, bench/compare rows named by run and file and
matched by model, and the small ones (a one-point learning curve, "1 image", a failed backbone leaving no
run folder, command-name suggestions). In-process CLI calls and tiny files: no pipeline run."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from edgexfer.cli import cli, main
from tests._onnx_model import good_meta, onnx_bytes


def _main(capsys, *args) -> tuple[int, str, str]:
    """`edgexfer ARGS` in this process: (exit status, stdout, stderr)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def _model(path: Path, classes: int = 3, side: int = 8, backbone: str = "test") -> Path:
    meta = good_meta(classes=classes, side=side)
    meta["provenance"] = {"backbone": backbone}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_bytes(meta, classes=classes, side=side))
    return path


# -- 1. what next ------------------------------------------------------------------------------------------

def _report(int8_proven: bool) -> dict:
    def m(file, acc, p50):
        return {"file": file, "size_bytes": 1000, "accuracy": acc, "n": 100, "latency_ms": {"p50": p50}}

    rec = {"model": "int8" if int8_proven else "fp32", "file": "model.int8.onnx" if int8_proven else "model.onnx",
           "why": "fastest", "p50_ms": 1.0, "size_bytes": 1000}
    return {"models": {"fp32": m("model.onnx", 0.9, 2.0), "int8": m("model.int8.onnx", 0.9, 1.0)},
            "recommendation": rec}


@pytest.mark.parametrize("int8_proven", [True, False])
def test_run_ends_with_accuracy_se_and_the_next_commands(tmp_path, capsys, int8_proven):
    from edgexfer.cli import print_headline

    run = tmp_path / "runs" / "demo"
    _model(run / "model.onnx")
    _model(run / "model.int8.onnx")
    rep = _report(int8_proven)
    (run / "report.json").write_text(json.dumps(rep))
    print_headline(run, rep)
    out = capsys.readouterr().out
    assert "test accuracy 0.9000 ± 0.0300 (100 images)" in out  # sqrt(0.9 * 0.1 / 100)
    file = "model.int8.onnx" if int8_proven else "model.onnx"
    assert f"Recommended here: {run / file}, test accuracy 0.9000 ± 0.0300" in out
    what_next = out.split("What next:", 1)[1]
    cmds = [line.split("  #", 1)[0].strip() for line in what_next.strip().splitlines()]
    # `serve RUN` serves the INT8 file: the run folder when that is the recommended file, else the file itself
    assert cmds == [f"edgexfer evaluate {run} --data DIR", f"edgexfer predict {run / file} IMAGE",
                    f"edgexfer serve {run if int8_proven else run / file}", f"edgexfer bundle {run} OUT"]
    for c in cmds:  # each parses as the command it names (real syntax, real paths)
        args = shlex.split(c)[1:]
        cmd = cli.get_command(cli.make_context("edgexfer", ["--help"], resilient_parsing=True), args[0])
        cmd.make_context(args[0], args[1:])


def test_multi_task_headline_gives_each_task_its_standard_error(tmp_path, capsys):
    from edgexfer.cli import print_headline

    fp = {"file": "model.onnx", "size_bytes": 100, "accuracy": 0.9, "n": 100,
          "tasks": {"species": {"accuracy": 0.9, "n": 100}, "colour": {"accuracy": 0.5, "n": 25}}}
    print_headline(tmp_path, {"models": {"fp32": fp}})
    out = capsys.readouterr().out
    assert "species 0.9000 ± 0.0300, colour 0.5000 ± 0.1000" in out
    assert f"edgexfer predict {tmp_path / 'model.onnx'} IMAGE" in out


# -- 2. interrupt and resume, refused re-runs --------------------------------------------------------------

def _config(folder: Path, **kw):
    from edgexfer.config import build_config

    args = dict(data=str(folder), shots=None, all_labels=False, test_size=2000, seed=0, strict=False,
                backbone="efficientnet_lite0", weights="imagenet", image_size=64, strategy="auto", epochs=8,
                batch_size=32, lr=3e-4, threads=2)
    return build_config(**{**args, **kw})


RUN_ARGS = ("--backbone", "efficientnet_lite0", "--image-size", "64")


def test_refused_rerun_names_each_setting_that_differs(image_folder, tmp_path, capsys):
    from edgexfer.runfolder import RunFolder

    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    RunFolder(run).write_config(_config(image_folder))
    before = (run / "config.json").read_text()
    code, _, err = _main(capsys, "run", "--data", image_folder, "--runs", tmp_path / "runs", "--name", "x",
                         *RUN_ARGS, "--epochs", "3", "--lr", "0.001")
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "holds a run made with another configuration (train.epochs: 8 -> 3; train.lr: 0.0003 -> 0.001)" in err
    assert "pass --force to replace it, or --name NEW to make a new run beside it" in err
    assert (run / "config.json").read_text() == before and sorted(p.name for p in run.iterdir()) == ["config.json"]


def _interrupting(what):
    def stage(*a, **kw):
        what(*a, **kw)
        raise KeyboardInterrupt
    return stage


def test_ctrl_c_in_run_says_what_was_saved_and_how_to_resume(image_folder, tmp_path, capsys, monkeypatch):
    import torch

    from edgexfer import pipeline
    from edgexfer.runfolder import RunFolder
    from edgexfer.runtime import atomic

    runs = tmp_path / "runs"
    argv = ["run", "--data", str(image_folder), "--runs", str(runs), "--name", "demo", *RUN_ARGS]
    monkeypatch.setattr(sys, "argv", ["/somewhere/.venv/bin/edgexfer", *argv])

    def saved_some(out, cfg, **kw):  # finetune done, export half way; a per-epoch state of a later fine-tuning
        out.mkdir(parents=True)
        RunFolder(out).write_config(cfg)
        atomic.write_json(out / "report.json", {"stages": {"finetune": {"done": True}}})
        torch.save({"epoch": 3}, out / "train_state.pt")

    monkeypatch.setattr(pipeline, "run", _interrupting(saved_some))
    code, _, err = _main(capsys, *argv)
    assert code == 130 and "Traceback" not in err
    assert f"interrupted: {runs / 'demo'} keeps stages done: finetune; fine-tuning state after epoch 3 " \
           "(train_state.pt)." in err
    assert f"To resume from export, run the same command again: edgexfer {shlex.join(argv)}" in err

    monkeypatch.setattr(pipeline, "run", _interrupting(lambda out, cfg, **kw: None))  # stopped before writing
    code, _, err = _main(capsys, *[a if a != "demo" else "other" for a in argv])
    assert code == 130 and f"interrupted: nothing saved in {runs / 'other'}. Run the same command to start " \
                           "again: edgexfer run" in err


def test_ctrl_c_in_quantize_says_the_same(image_folder, tmp_path, capsys, monkeypatch):
    from edgexfer import pipeline
    from edgexfer.runfolder import RunFolder
    from edgexfer.runtime import atomic

    run = tmp_path / "r"
    run.mkdir()
    RunFolder(run).write_config(_config(image_folder))
    atomic.write_json(run / "report.json", {"stages": {"finetune": {"done": True}, "export": {"done": True}}})
    monkeypatch.setattr(sys, "argv", ["edgexfer", "quantize", str(run)])
    monkeypatch.setattr(pipeline, "quantize", _interrupting(lambda *a, **kw: None))
    code, _, err = _main(capsys, "quantize", run)
    assert code == 130
    assert f"interrupted: {run} keeps stages done: finetune, export." in err
    assert f"To resume from quantize, run the same command again: edgexfer quantize {run}" in err


# -- 3. predict on folders ---------------------------------------------------------------------------------

def test_predict_folder_with_a_corrupt_image_classifies_the_rest_and_fails_at_the_end(tmp_path, capsys):
    from PIL import Image

    model = _model(tmp_path / "m" / "model.onnx")
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 12), (200, 10, 10)).save(photos / "b.png")
    Image.new("RGB", (16, 12), (10, 200, 10)).save(photos / "sub" / "c.jpg")
    (photos / "a_broken.jpg").write_bytes(b"not a jpeg at all")
    (photos / "notes.txt").write_text("not an image: not listed")
    single = tmp_path / "d.png"
    Image.new("RGB", (9, 9), (0, 0, 200)).save(single)
    code, out, err = _main(capsys, "predict", model, photos, single, "--top-k", "1")
    assert code == 1
    seen = [json.loads(line)["image"] for line in out.splitlines()]
    assert seen == [str(photos / "b.png"), str(photos / "sub" / "c.jpg"), str(single)]  # sorted, recursive
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"skipped {photos / 'a_broken.jpg'}: cannot decode: ") and "Traceback" not in err
    assert lines[-1] == "error: 3 images classified; 1 skipped (listed above)" and len(lines) == 2

    code, out, err = _main(capsys, "predict", model, single, "--format", "csv")
    assert code == 0 and err == "" and out.count("\n") == 4  # header + top-3


# -- 4. bench / compare ------------------------------------------------------------------------------------

def test_bench_rows_are_named_by_run_and_file_and_no_e2e_skips_that_phase(tmp_path, capsys):
    from edgexfer.exporters import e2e

    a = _model(tmp_path / "a" / "model.onnx")
    b = _model(tmp_path / "b" / "model.onnx", classes=4)
    for f in (a, b):
        e2e.write(f)
    common = ("--iters", "3", "--warmup", "1", "--batches", "1", "--no-cold-start", "--no-reference")
    code, out, _ = _main(capsys, "bench", a.parent, b.parent, *common, "--json-out", tmp_path / "b.json")
    res = json.loads((tmp_path / "b.json").read_text())
    assert code == 0 and list(res["models"]) == ["a/model.onnx", "b/model.onnx"]
    assert res["models"]["a/model.onnx"]["model_id"] != res["models"]["b/model.onnx"]["model_id"]
    assert set(res["e2e"]) == {"a/model.onnx", "b/model.onnx"}
    assert "| a/model.e2e.onnx |" in out and "| b/model.e2e.onnx |" in out
    code, out, _ = _main(capsys, "bench", a.parent, *common, "--no-e2e", "--json-out", tmp_path / "n.json")
    assert code == 0 and "e2e" not in json.loads((tmp_path / "n.json").read_text())
    assert "End-to-end files" not in out
    code, out, _ = _main(capsys, "bench", "--help")
    assert "--no-e2e" in out and "end-to-end" in out


def _bench_doc(cpu: str, rows: dict) -> dict:
    return {"schema": "edgexfer.bench/1", "machine": {"cpu": cpu, "arch": "x86_64", "cores": 2, "flags": []},
            "config": {"threads": 2},
            "models": {n: {"backend": "onnxruntime", "latency_ms": {"p50": p50, "p90": p50, "p99": p50},
                           **({"model_id": mid} if mid else {})} for n, (mid, p50) in rows.items()}}


def test_compare_divides_a_latency_only_by_the_same_models(tmp_path):
    from edgexfer.runtime.compare import compare, to_markdown

    host, board = tmp_path / "host.json", tmp_path / "board.json"
    host.write_text(json.dumps(_bench_doc("host", {"demo/model.onnx": ("meta:A", 2.0), "other/model.onnx": ("meta:B", 1.0)})))
    board.write_text(json.dumps(_bench_doc("board", {"bundle/model.onnx": ("meta:A", 6.0)})))
    doc = compare([host, board])
    rows = {(r["model"], r["machine"].split()[0]): r for r in doc["rows"]}
    assert rows[("bundle/model.onnx", "board")]["p50_ratio_to_fastest"] == pytest.approx(3.0)  # 6 / 2, not 6 / 1
    assert rows[("demo/model.onnx", "host")]["p50_ratio_to_fastest"] == 1.0
    assert rows[("other/model.onnx", "host")]["p50_ratio_to_fastest"] is None
    md = to_markdown(doc)
    assert "| other/model.onnx | host (x86_64, 2 cores) | onnxruntime | 1.00 | 1.00 | 1.00 | no counterpart |" in md
    assert "No counterpart (a model measured on one machine only, compared with none): other/model.onnx on host" in md
    # results without model ids (an older edgexfer) are matched by row name, as before
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_bench_doc("old", {"demo/model.onnx": (None, 4.0)})))
    doc = compare([old, board])
    assert all(r["p50_ratio_to_fastest"] is None for r in doc["rows"])


# -- 5. the small ones -------------------------------------------------------------------------------------

def test_a_one_point_learning_curve_is_a_sentence_not_a_figure(tmp_path):
    from edgexfer import plots
    from edgexfer.report import learning_curve_line, report_md

    png = tmp_path / "learning_curve.png"
    png.write_bytes(b"an earlier run's figure")
    probe_only = [{"epoch": 0, "phase": "probe", "val_accuracy": 0.8}]
    plots.learning_curve(png, probe_only)
    assert not png.exists()
    rep = {"training": {"history": probe_only}}
    assert learning_curve_line(rep) == ("No learning curve: validation accuracy was measured once (0.8000, the "
                                        "linear probe), so there is no curve to draw.")
    assert "learning_curve.png" not in report_md(rep)
    refit = {"training": {"history": probe_only, "probe_selection": {"refit_on": "train + val"}}}
    assert learning_curve_line(refit).startswith("No learning curve: cross-validated (out-of-fold) accuracy was "
                                                 "measured once")  # not 'validation': the probe was fitted on it
    two = probe_only + [{"epoch": 1, "val_accuracy": 0.9}]
    assert "![learning curve](learning_curve.png)" in report_md({"training": {"history": two}})


def test_counts_take_the_singular_for_one():
    from edgexfer.runtime import fmt

    assert [fmt.count(n, "image") for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert fmt.count(1, "test image") == "1 test image" and fmt.count(3, "class") == "3 classes"


def test_a_backbone_without_its_weights_leaves_no_run_folder(image_folder, tmp_path, capsys, monkeypatch):
    import dataclasses

    from edgexfer import backbones
    from edgexfer.errors import BackboneError

    def no_weights(*, weights, image_size):
        raise BackboneError("cannot get ImageNet weights for mobilenet_v3_small: URLError. Offline? Put ...")

    info = backbones.get_backbone_info("mobilenet_v3_small")
    monkeypatch.setitem(backbones._REGISTRY, "mobilenet_v3_small",
                        dataclasses.replace(info, builder=no_weights, offline=lambda: False))
    runs = tmp_path / "runs"
    code, _, err = _main(capsys, "run", "--data", image_folder, "--runs", runs, "--name", "mnv3",
                         "--backbone", "mobilenet_v3_small")
    assert code == 1 and "cannot get ImageNet weights for mobilenet_v3_small" in err
    assert not (runs / "mnv3").exists()


def test_a_new_run_that_fails_before_saving_anything_leaves_no_folder(image_folder, tmp_path, monkeypatch):
    from edgexfer import pipeline
    from edgexfer.errors import BackboneError

    def fails(*a, **kw):
        raise BackboneError("weights missing")

    monkeypatch.setitem(pipeline.STAGE_FUNCS, "finetune", fails)
    with pytest.raises(BackboneError):
        pipeline.run(tmp_path / "new", _config(image_folder))
    assert not (tmp_path / "new").exists()
    keep = tmp_path / "kept"  # a folder that already held something keeps it
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(BackboneError):
        pipeline.run(keep, _config(image_folder))
    assert (keep / "notes.txt").read_text() == "mine"


def test_a_mistyped_command_gets_a_suggestion(capsys):
    code, _, err = _main(capsys, "evalute", "runs/demo")
    assert code == 2 and err.strip() == "error: No such command 'evalute'. Did you mean 'evaluate'? (see edgexfer --help)"
    code, _, err = _main(capsys, "zzzz")
    assert code == 2 and "Did you mean" not in err
