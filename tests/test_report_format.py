"""Reports that agree with themselves: one formatter per kind of figure in report.md, the model card, the CLI
headline and `edgexfer inspect`; the model card names a loss only when there is one; the training line says
which weights were kept and why training stopped, in words that agree with the epoch log."""
import re

from edgexfer.report import checks, class_losses, kept_weights, model_card, report_md
from edgexfer.runtime import fmt


def _ft(*accs, start=1):
    return [{"epoch": start + i, "phase": "finetune", "val_accuracy": a} for i, a in enumerate(accs)]


def _rep() -> dict:
    classes = ["a", "b", "c"]
    per_class = {c: {"support": 10, "precision": 0.9, "recall": r} for c, r in zip(classes, (0.9, 0.8, 0.7))}
    q_class = {c: {"support": 10, "precision": 0.9, "recall": r} for c, r in zip(classes, (0.95, 0.8, 0.7))}
    return {
        "data": {"source": "x", "classes": classes, "train": 30, "val": 9, "test": 30},
        "backbone": {"name": "efficientnet_lite0", "weights": "imagenet", "strategy": "lpft", "image_size": 64},
        "training": {"best_epoch": 0, "val_accuracy": 0.8954248366013072, "probe_val_accuracy": 0.8954248366013072,
                     "train_seconds": 3.0, "history": [{"epoch": 0, "phase": "probe", "val_accuracy": 0.8954}]
                     + _ft(0.7, 0.8), "config": {"epochs": 2, "patience": 4}},
        "transfer": {"pretrained_test_accuracy": 0.8954248366013072, "scratch_test_accuracy": 0.5359,
                     "gain_points": 35.95, "negative_transfer": False, "measured_with": "PyTorch eager, test split"},
        "models": {"fp32": {"file": "model.onnx", "size_bytes": 4_000_000, "accuracy": 0.8954248366013072,
                            "macro_f1": 0.8912345, "latency_ms": {"p50": 4.07123, "p90": 5.1, "p99": 6.0},
                            "per_class": per_class},
                   "int8": {"file": "model.int8.onnx", "size_bytes": 1_100_000, "accuracy": 0.9123456789,
                            "macro_f1": 0.9, "latency_ms": {"p50": 2.93456, "p90": 3.0, "p99": 4.0},
                            "per_class": q_class}},
        "quantization_impact": {"accuracy_drop": -0.0169, "top1_agreement_int8_vs_fp32": 0.97,
                                "recall_delta_points": {"a": 5.0, "b": 0.0, "c": 0.0}, "worst_class": "b",
                                "worst_delta_points": 0.0, "classes_losing_more_than": {"points": 3.0, "classes": []}},
    }


def test_a_gain_reads_the_same_everywhere(capsys):
    from edgexfer.cli import print_headline

    rep = _rep()
    rep["checks"] = checks(rep, 0.01)
    md, card = report_md(rep), model_card(rep)
    print_headline(__import__("pathlib").Path("runs/x"), rep)
    headline = capsys.readouterr().out
    shown = fmt.points(35.95)
    for text in (md, card, headline):
        assert shown in text
        assert not re.search(r"35\.9(?!5)|35\.95|\+36(?!\.0)", text.replace(shown, "")), text
    # accuracy, ms and ratio figures: one form each, in all three
    for text in (md, card, headline):
        assert "0.8954" in text and "0.8954248" not in text
    for text in (md, headline):
        assert "4.07" in text and "4.0712" not in text
    assert f"| INT8 file size / FP32 | {fmt.ratio(0.275)} |" in md and f"INT8 file size / FP32: {fmt.ratio(0.275)} " in headline
    assert not re.search(r"\d\.\d{5,}", md + card + headline)


def test_model_card_never_calls_a_gain_a_loss():
    impact = _rep()["quantization_impact"]
    assert class_losses(impact) == "No class lost accuracy (per-class recall)."
    assert "No class lost accuracy" in model_card(_rep()) and "lost most" not in model_card(_rep())
    impact["recall_delta_points"] = {"a": 1.43, "b": -1.43, "c": -2.86}
    s = class_losses(impact)
    assert s.startswith("The class that lost most: c (-2.9 points).") and "No class lost more than 3 points" in s
    impact["recall_delta_points"] = {"a": -4.0, "b": -4.0, "c": 2.0}
    impact["classes_losing_more_than"]["classes"] = ["a", "b"]
    s = class_losses(impact)
    assert s.startswith("The classes that lost most: a, b (-4.0 points).") and "**Warning:** a, b lost more" in s


def test_training_line_explains_epoch_0_the_tie_and_the_early_stop():
    probe = [{"epoch": 0, "phase": "probe", "val_accuracy": 0.85}]
    # epoch 0 is the linear probe, kept because no fine-tuning epoch beat it
    t = {"best_epoch": 0, "val_accuracy": 0.85, "history": probe + _ft(0.8, 0.84), "config": {"epochs": 2, "patience": 4}}
    assert kept_weights(t) == ("validation accuracy 0.8500 from the linear probe (epoch 0), kept because none of "
                               "the 2 fine-tuning epochs beat it")
    # the linear strategy: no fine-tuning at all
    assert "linear probe only (epoch 0, no fine-tuning epochs)" in kept_weights(
        {"best_epoch": 0, "val_accuracy": 0.85, "history": probe, "config": {"epochs": 8}})
    # refitted on train + val, the probe's figure is its cross-validation's, not the (fitted) validation split's
    assert kept_weights({"best_epoch": 0, "val_accuracy": 0.85, "history": probe, "config": {"epochs": 8},
                         "probe_selection": {"refit_on": "train + val"}}).endswith(
        "cross-validated (out-of-fold) accuracy 0.8500")
    # "best epoch 6" beside "no better validation accuracy in 4 epochs": epoch 6 tied epoch 2 (ties keep the
    # later weights), early stopping counts from epoch 2 (only a strictly better epoch resets it)
    t = {"best_epoch": 6, "val_accuracy": 0.9, "history": probe + _ft(0.88, 0.9, 0.89, 0.87, 0.88, 0.9),
         "config": {"epochs": 12, "patience": 4}}
    s = kept_weights(t)
    assert s.startswith("validation accuracy 0.9000 from fine-tuning epoch 6 of 6 run (tied with epoch 2; ties keep "
                        "the later weights)")
    assert s.endswith("stopped early after epoch 6 of 12: no fine-tuning epoch beat epoch 2's 0.9000 in the 4 "
                      "epochs after it (patience 4)")
    # stopped early with the probe kept
    t = {"best_epoch": 0, "val_accuracy": 0.95, "history": probe + _ft(0.9, 0.8, 0.8, 0.8, 0.8),
         "config": {"epochs": 8, "patience": 4}}
    assert "stopped early after epoch 5 of 8: no fine-tuning epoch beat epoch 1's 0.9000 in the 4 epochs" in kept_weights(t)
    assert "best epoch" not in report_md(_rep())


def test_inspect_formats_metrics(tmp_path):
    from edgexfer.exporters.inspect_model import format_text, inspect
    from tests._onnx_model import good_meta, onnx_bytes

    meta = good_meta(classes=3)
    meta["metrics"] = {"accuracy": 0.8954248366013072, "macro_f1": 0.8812345678, "n": 153, "split": "test"}
    meta["preprocessing"]["mean"] = [0.4980392156862745] * 3
    p = tmp_path / "m.onnx"
    p.write_bytes(onnx_bytes(meta, classes=3))
    text = format_text(inspect(p))
    assert "metrics: accuracy 0.8954, macro-F1 0.8812 on 153 test images" in text
    assert "mean (0.498, 0.498, 0.498)" in text and "0.4980392" not in text and "0.8954248" not in text
