"""Issue 23: the INT8 guard's promise is measured on images the model was not fitted on. A labelled image the
cross-validated probe was refitted on is answered by the fold head that held it out (features and the file's
own head error both count), the rate is over images (an image and its views are one unit), a bound that the
95% interval cannot prove is 'unproven' and nothing recommends the file on it, and re-evaluating a run keeps
what bench measured."""
from __future__ import annotations

import json

import numpy as np
import pytest


def _head_model(path, w: np.ndarray, b: np.ndarray, gain: float = 1.0) -> None:
    """input (N, 3, 4, 4) -> x gain -> global average pool -> Flatten -> Gemm(w, b, transB) -> logits (N, K)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Mul", ["input", "gain"], ["scaled"]),
             helper.make_node("GlobalAveragePool", ["scaled"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
             helper.make_node("Gemm", ["features", "w", "b"], ["logits"], transB=1)]
    g = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(w)])],
                          [numpy_helper.from_array(w.astype(np.float32), "w"),
                           numpy_helper.from_array(b.astype(np.float32), "b"),
                           numpy_helper.from_array(np.array(gain, np.float32), "gain")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _images(features: np.ndarray) -> np.ndarray:
    """Images whose pooled features are `features` (N, 3): each channel constant."""
    return np.broadcast_to(features[:, :, None, None], (len(features), 3, 4, 4)).astype(np.float32).copy()


def test_head_inputs_walks_back_through_quantize_dequantize(tmp_path):
    import onnx

    from edgexfer.guard import head_inputs, with_head_inputs

    rng = np.random.default_rng(0)
    _head_model(tmp_path / "m.onnx", rng.standard_normal((3, 3)), np.zeros(3))
    assert head_inputs(onnx.load(str(tmp_path / "m.onnx"))) == ["features"]
    extended = onnx.load_from_string(with_head_inputs(tmp_path / "m.onnx"))
    assert [o.name for o in extended.graph.output] == ["logits", "features"]
    m = onnx.load(str(tmp_path / "m.onnx"))  # an INT8 file's output: Gemm -> QuantizeLinear -> DequantizeLinear
    from onnx import helper, numpy_helper
    m.graph.node[-1].output[0] = "pre"
    m.graph.node.extend([helper.make_node("QuantizeLinear", ["pre", "s"], ["q"]),
                         helper.make_node("DequantizeLinear", ["q", "s"], ["logits"])])
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.1, np.float32), "s"))
    assert head_inputs(m) == ["features"]


def test_labelled_rows_are_answered_by_the_fold_head_that_held_them_out(tmp_path):
    from edgexfer.guard import Agreement

    rng = np.random.default_rng(1)
    k, d = 3, 3
    w_r, b_r = rng.standard_normal((k, d)), rng.standard_normal(k)
    _head_model(tmp_path / "fp32.onnx", w_r, b_r)
    delta = 0.3 * rng.standard_normal((k, d))
    _head_model(tmp_path / "int8.onnx", w_r + delta, b_r)  # a candidate whose head alone differs
    f = rng.standard_normal((6, d)).astype(np.float32)
    rows = np.array([0, 1, 2, 3, 4, 0])  # four labelled images, one unlabelled (4), a view of image 0
    folds = {"fold": np.array([0, 1, 0, 1]), "weight": rng.standard_normal((2, k, d)), "bias": rng.standard_normal((2, k))}
    ag = Agreement(tmp_path / "fp32.onnx", _images(f), rows, folds=folds, head=(w_r, b_r), labels=np.array([0, 1, 2, 0]))
    z = ag._logits(tmp_path / "fp32.onnx")[0]
    for i, image in enumerate(rows):
        if image < 4:  # the fold head that held the image out, never the refitted head
            j = folds["fold"][image]
            np.testing.assert_allclose(z[i], folds["weight"][j] @ f[i] + folds["bias"][j], rtol=1e-4, atol=1e-4)
        else:  # no head saw an unlabelled image: the file's own answer
            np.testing.assert_allclose(z[i], w_r @ f[i] + b_r, rtol=1e-4, atol=1e-4)
    zc = ag._logits(tmp_path / "int8.onnx")[0]  # the candidate's own head error rides on the fold head
    np.testing.assert_allclose(zc[0], folds["weight"][0] @ f[0] + folds["bias"][0] + delta @ f[0], rtol=1e-4, atol=1e-4)
    assert ag(tmp_path / "fp32.onnx") == 1.0 and ag.images == 5
    assert ag.detail(tmp_path / "fp32.onnx")["rate"] == 0.0
    # the labelled evidence is on the labelled images themselves (4), not their views or the unlabelled one
    assert set(ag.evidence(tmp_path / "fp32.onnx")) == {"val_accuracy", "val_drop", "val_drop_se"}
    assert ag.labelled().sum() == 4


class _Fixed:
    """An Agreement whose candidates' answers are given: rows (image ids), FP32's top-1, each file's top-1."""

    def __init__(self, rows, ref, answers):
        from edgexfer.guard import Agreement

        self.ag = Agreement.__new__(Agreement)
        self.ag.rows = np.asarray(rows)
        _, self.ag.cluster = np.unique(self.ag.rows, return_inverse=True)
        self.ag.images = int(self.ag.cluster.max()) + 1
        self.ag.ref = [np.asarray(r) for r in ref]
        self.ag._logits = lambda path: [np.eye(4)[np.asarray(a)] for a in answers[path]]


def test_rate_is_over_images_and_the_worst_task_decides():
    rows = [0, 1, 2, 3, 0, 0, 0]  # image 0 and three views of it, images 1-3 once
    ref = [[0, 1, 2, 3, 0, 0, 0]]
    fx = _Fixed(rows, ref, {"a": [[0, 1, 2, 3, 1, 1, 0]], "b": [[1, 1, 2, 3, 1, 1, 1]]})
    # two of image 0's four rows disagree: half an image of four
    assert fx.ag.rates("a") == [pytest.approx(0.5 / 4)]
    assert fx.ag.rates("b") == [pytest.approx(1 / 4)]
    d = fx.ag.detail("a")
    assert d["images"] == 4 and d["rows"] == 7 and d["rate"] == pytest.approx(0.125) and d["upper95"] > 0.125
    two = _Fixed([0, 1, 2, 3], [[0, 1, 2, 3], [0, 0, 0, 0]], {"c": [[0, 1, 2, 3], [0, 1, 0, 0]]})
    assert two.ag("c") == pytest.approx(0.75)  # the second task disagrees on one image of four: it decides
    assert len(two.ag.detail("c")["per_task"]) == 2


def _guard(within=True, rate=0.002, images=2000, fitted=False, md=0.01):
    from edgexfer.guard import summarize, wilson_upper

    g = {"max_accuracy_drop": md, "within_bound": within}
    info = {"images": images, "labelled": images, "labelled_from": "train" if fitted else "out-of-fold",
            "fitted": fitted, "unlabelled": 0, "augmented": 0, "labelled_available": images}
    detail = {"rate": rate, "images": images, "rows": images, "upper95": wilson_upper(rate, images)}
    summarize(g, info, detail, images, 0.9, {"val_accuracy": 0.9, "val_drop": 0.0, "val_drop_se": 0.0})
    return g


def test_proven_only_when_the_95_percent_bound_fits_on_unseen_images():
    from edgexfer.guard import images_needed

    g = _guard(rate=0.002, images=2000)
    assert g["proven"] and "within the bound)" in g["confidence"]
    assert "2000 images the model was not fitted on" in g["confidence"] and "out-of-fold" in g["confidence"]
    g = _guard(rate=0.0, images=150)  # nothing disagrees, but 150 images cannot prove 1%
    assert not g["proven"] and "unproven" in g["confidence"]
    need = images_needed(0.0, 0.01, 150)
    assert f"about {need} unseen images" in g["confidence"] and 370 < need < 390
    g = _guard(rate=0.0, images=5000, fitted=True)  # fitted images prove nothing, however many
    assert not g["proven"] and "fitted on" in g["confidence"]
    g = _guard(within=False, rate=0.05, images=150)
    assert not g["proven"] and "over the 1.0% bound" in g["confidence"]
    assert images_needed(0.05, 0.01, 150) is None


def _report(g: dict, p50=(4.0, 2.0)) -> dict:
    return {"models": {"fp32": {"file": "model.onnx", "size_bytes": 100, "accuracy": 0.9,
                                "latency_ms": {"p50": p50[0], "p90": p50[0], "p99": p50[0]}},
                       "int8": {"file": "model.int8.onnx", "size_bytes": 30, "accuracy": 0.9,
                                "latency_ms": {"p50": p50[1], "p90": p50[1], "p99": p50[1]}}},
            "quantize": {"guard": g, "target": {"host_measures_faithfully": True}}}


def test_unproven_int8_is_neither_recommended_nor_bundled(tmp_path):
    from edgexfer.report import recommend
    from edgexfer.runtime.bundle import choose_model, int8_verdict

    proven = _guard(rate=0.002, images=2000)
    assert int8_verdict(_report(proven))[0]
    assert recommend(_report(proven), 0.01)["model"] == "int8"
    unproven = _guard(rate=0.0, images=150)
    ok, why = int8_verdict(_report(unproven))
    assert not ok and why.startswith("INT8, unproven")
    r = recommend(_report(unproven), 0.01)
    assert r["model"] == "fp32" and "unproven" in r["why"]
    for name in ("model.onnx", "model.int8.onnx"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "report.json").write_text(json.dumps(_report(unproven)))
    path, why, _ = choose_model(tmp_path)
    assert path.name == "model.onnx" and "unproven" in why


def test_no_recommended_int8_beside_a_warning(tmp_path, capsys):
    """A run whose test split disagrees with the guard does not print 'Recommended here: model.int8.onnx'."""
    from edgexfer.cli import print_headline

    rep = _report(_guard(rate=0.002, images=2000))
    rep["recommendation"] = {"model": "int8", "file": "model.int8.onnx", "why": "fastest", "p50_ms": 2.0,
                             "size_bytes": 30, "test_disagrees": "INT8 drops 4 points on test"}
    print_headline(tmp_path, rep)
    out = capsys.readouterr().out
    assert "Recommended here: model.int8.onnx" not in out and "Not recommended with confidence" in out
    assert "model.onnx is the safe choice" in out


def test_host_load_comparisons_are_reported_not_failed():
    from edgexfer.report import checks

    rep = _report(_guard(), p50=(4.0, 5.0))
    rep["reference"] = {"pytorch_eager": {"latency_ms": {"p50": 3.0}}}
    c = {x["name"]: x for x in checks(rep, 0.01)}
    assert c["ONNX FP32 p50 latency / PyTorch eager"]["ok"] is None
    assert c["INT8 speed-up over FP32 (p50, batch 1)"]["ok"] is None
    guard_row = next(x for n, x in c.items() if n.startswith("INT8 accuracy guard"))
    assert "proven" in guard_row["bound"] and guard_row["ok"] is True


def test_evaluate_again_keeps_what_bench_measured(run_copy):
    """`edgexfer evaluate RUN` updates the test figures and leaves bench's section and latencies as they were."""
    from edgexfer.pipeline import evaluate

    before = json.loads((run_copy / "report.json").read_text())
    assert before["stages"]["bench"]["done"]
    evaluate(run_copy)
    after = json.loads((run_copy / "report.json").read_text())
    assert json.dumps(after["bench"], sort_keys=True) == json.dumps(before["bench"], sort_keys=True)
    assert after["stages"]["bench"] == before["stages"]["bench"] and after["machine"] == before["machine"]
    for k, m in before["models"].items():
        assert after["models"][k]["latency_ms"] == m["latency_ms"] and after["models"][k]["accuracy"] == m["accuracy"]
    assert after["stages"]["evaluate"]["done"]


def test_multi_task_reports_name_every_task(tmp_path, capsys):
    """Issue 23: a multi-task run's headline names each task's accuracy, and report.md has a per-class table
    per task; guard candidates carry their search order and the shipped one is marked."""
    from edgexfer.cli import print_headline
    from edgexfer.report import candidate_name, per_class_table

    def metrics(recalls):
        return {"per_class": {c: {"precision": r, "recall": r, "f1": r, "support": 10} for c, r in recalls.items()}}

    fp = {"file": "model.onnx", "size_bytes": 100, "accuracy": 0.9, **metrics({"cat": 0.9, "dog": 0.9}),
          "tasks": {"species": {"accuracy": 0.9, **metrics({"cat": 0.9, "dog": 0.9})},
                    "colour": {"accuracy": 0.7, **metrics({"black": 0.8, "white": 0.6})}}}
    q = {"file": "model.int8.onnx", "size_bytes": 30, "accuracy": 0.9, **metrics({"cat": 0.9, "dog": 0.9}),
         "tasks": {"species": {"accuracy": 0.9, **metrics({"cat": 0.9, "dog": 0.9})},
                   "colour": {"accuracy": 0.65, **metrics({"black": 0.8, "white": 0.5})}}}
    rep = {"models": {"fp32": fp, "int8": q}}
    md = per_class_table(rep)
    assert "## Per class (test split, task species)" in md and "## Per class (test split, task colour)" in md
    assert "| white | 10 | 0.6000 | 0.6000 | 0.5000 | -10.0 |" in md  # the second task's own INT8 loss
    print_headline(tmp_path, rep)
    out = capsys.readouterr().out
    assert "species 0.9000, colour 0.7000" in out
    g = {"candidates": [{"fp32_layers": 0, "order": "plain"}, {"fp32_layers": 1, "order": "graph prefix"},
                        {"fp32_layers": 1, "order": "ranked by harm"}], "chosen_candidate": 2}
    names = [candidate_name(g, i) for i in range(3)]
    assert names == ["0 layers FP32 (plain)", "1 layer FP32 (graph prefix)", "1 layer FP32 (ranked by harm), **shipped**"]


def test_without_drops_the_rows_of_given_images(tmp_path):
    from edgexfer.guard import Agreement

    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((3, 3)), rng.standard_normal(3)
    _head_model(tmp_path / "fp32.onnx", w, b)
    f = rng.standard_normal((5, 3)).astype(np.float32)
    ag = Agreement(tmp_path / "fp32.onnx", _images(f), np.array([0, 1, 2, 0, 7]), labels=np.array([0, 1, 2]))
    sub = ag.without(tmp_path / "fp32.onnx", np.array([0, 1]))  # QAT trained on images 0 and 1
    assert sub.rows.tolist() == [2, 7] and sub.images == 2 and sub(tmp_path / "fp32.onnx") == 1.0
    assert ag.without(tmp_path / "fp32.onnx", np.array([0, 1, 2, 7])) is None


def test_a_subset_reuses_fp32s_outputs_and_stability_its_answers(tmp_path, monkeypatch):
    """`only`/`without` slice FP32's outputs from the set they come from instead of running FP32 again, and FP32's
    stability given its known top-1 is the figure it computes itself."""
    import onnxruntime as ort

    from edgexfer.guard import Agreement, fp32_stability
    from edgexfer.runtime.preprocess import Preprocessing

    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((3, 3)), rng.standard_normal(3)
    fp32 = tmp_path / "fp32.onnx"
    _head_model(fp32, w, b)
    x = _images(rng.standard_normal((6, 3)).astype(np.float32))
    ag = Agreement(fp32, x, np.array([0, 1, 2, 3, 4, 5]), labels=np.arange(6) % 3)
    sessions = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(1) or real(*a, **k))
    sub = ag.only(fp32, np.array([1, 4]))
    assert not sessions and [t.tolist() for t in sub.top1] == [ag.top1[0][[1, 4]].tolist()]
    assert sub.rows.tolist() == [1, 4] and sub(fp32) == 1.0 and not sessions
    pp = Preprocessing(resize=4, crop=4)
    assert fp32_stability(fp32, x, pp, ref=ag.top1) == fp32_stability(fp32, x, pp)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, image_folder):
    """A cross-validated linear probe (refitted on every labelled image) on the tiny images, exported and
    quantized with QAT forced (one epoch): the out-of-fold path of the guard, end to end."""
    from tests.conftest import run_cli

    run = tmp_path_factory.mktemp("probe") / "run"
    run_cli("finetune", "--data", image_folder, "--backbone", "efficientnet_lite0", "--strategy", "linear",
            "--image-size", "64", "--shots", "12", "--out", run, check=True)
    run_cli("export", run, check=True)
    env = {"EDGEXFER_QAT_FORCE": "1", "EDGEXFER_QAT_EPOCHS": "1", "EDGEXFER_QAT_VIEWS": "16",
           "EDGEXFER_GUARD_IMAGES": "120"}
    run_cli("quantize", run, "--tuner", "builtin", "--calibration-samples", "16", env=env, check=True)
    return run


def test_a_refitted_probe_is_guarded_out_of_fold_end_to_end(probe_run):
    import torch

    rep = json.loads((probe_run / "report.json").read_text())
    assert rep["training"]["probe_selection"]["refit_on"] == "train + val"
    payload = torch.load(probe_run / "checkpoint.pt", weights_only=True)
    n = rep["data"]["train"] + rep["data"]["val"]
    assert payload["probe_folds"]["fold"].shape == (n,)  # the fold heads went with the checkpoint
    g = rep["quantize"]["guard"]
    info = g["agreement_set"]
    assert info["labelled_from"] == "out-of-fold" and info["labelled"] == n and not info["fitted"]
    assert "out-of-fold" in g["guard_set"] and "out-of-fold" in g["confidence"]
    assert g["validation"]["held_out_as"] == "out-of-fold"
    # QAT trains on the train split, so it was judged on the other images only (validation, left out by --shots)
    q = g["qat"]
    assert q["tried"], q
    # the search chose on half the images; the other half, never used to choose, certify the shipped file
    assert info["certified"] and "held out of the search" in g["confidence"]
    half = round(n / 2) + round(info["unlabelled"] / 2)
    if q["chosen"]:
        assert info["qat_judged_on"].endswith("images QAT did not train on")
        assert g["disagreement"]["images"] < half
    else:
        assert g["disagreement"]["images"] == half


def test_search_and_certify_split_images_not_rows():
    """The search and the certificate never share an image (an image's views go with it), each kind (labelled,
    unlabelled) is split in half, and too few images are not split."""
    from edgexfer.guard import search_and_certify

    rows = np.concatenate([np.arange(60), 60 + np.arange(40), np.repeat(np.arange(60), 4)])
    search, cert = search_and_certify(rows, labelled=60, seed=3)
    assert not set(search) & set(cert) and set(search) | set(cert) == set(range(100))
    assert (cert < 60).sum() == 30 and (cert >= 60).sum() == 20
    again = search_and_certify(rows, labelled=60, seed=3)
    assert (again[1] == cert).all()  # seeded
    assert search_and_certify(np.arange(30), labelled=30) is None  # 15 a side: too few to hold out


def test_the_verdict_is_written_once_and_read_not_re_decided(tmp_path):
    """The guard writes its verdict into the record (guard.verdict: shippable, verdict); int8_verdict, recommend
    and bundle read it. A record from before the verdict is read as the guard decides."""
    from edgexfer.guard import verdict
    from edgexfer.report import recommend
    from edgexfer.runtime.bundle import int8_verdict

    old = _guard(rate=0.002, images=2000)  # proven, as records were written before the verdict
    g = {**old, **verdict(old)}
    assert g["shippable"] is True and int8_verdict(_report(g)) == int8_verdict(_report(old)) == (True, g["verdict"])
    said_no = {**g, "shippable": False, "verdict": "the guard said no"}  # the figures alone would ship it
    assert int8_verdict(_report(said_no)) == (False, "the guard said no")
    r = recommend(_report(said_no), 0.01)
    assert r["model"] == "fp32" and "the guard said no" in r["why"]
    unproven = _guard(rate=0.0, images=150)
    assert verdict(unproven) == {"shippable": False, "verdict": int8_verdict(_report(unproven))[1]}
    elsewhere = {**g, "measured_on": "arm64 (emulated)"}  # shippable for the device, not measured on this host
    assert int8_verdict(_report(elsewhere))[0] and not int8_verdict(_report(elsewhere), on_this_host=True)[0]


def test_a_proven_int8_file_that_ties_fp32_is_recommended_for_its_size():
    """With the bench's rounds, FP32's lower p50 counts only beyond the noise (`runtime.bench.recommend`): a tie
    goes to the smaller file; a clear win still goes to the faster one."""
    from edgexfer.report import recommend

    rep = _report(_guard(rate=0.002, images=2000), p50=(4.0, 4.1))
    rep["models"]["fp32"]["p50_by_round_ms"] = [4.0, 4.2] * 5
    rep["models"]["int8"]["p50_by_round_ms"] = [4.2, 4.0] * 5
    r = recommend(rep, 0.01)
    assert r["model"] == "int8" and "no faster beyond the noise" in r["why"]
    rep["models"]["fp32"]["p50_by_round_ms"] = [3.0] * 10
    rep["models"]["int8"]["p50_by_round_ms"] = [4.1] * 10
    r = recommend(rep, 0.01)
    assert r["model"] == "fp32" and "slower here" in r["why"]


def test_the_verdict_never_says_within_the_bound_beside_a_certified_rate_over_it():
    """The search's candidate met the bound on the images it chose on; the certify half read 1.8%: the verdict says
    both, in that order, and never 'within the bound on the measured rate' beside a rate over it."""
    from edgexfer.runtime.bundle import guard_verdict

    g = _guard(rate=0.018, images=75)
    g["proven"], g["within_bound"] = False, True
    ok, why = guard_verdict(g)
    assert not ok and "within the 0.01 bound on the measured rate" not in why
    assert "images held out to certify it" in why and "1.8%" in why and "over the bound" in why
    g = _guard(rate=0.004, images=150)
    g["proven"] = False
    assert "within the 0.01 bound on the measured rate" in guard_verdict(g)[1]
