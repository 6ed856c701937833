"""report.json -> report.md and model_card.md, and the headline checks printed at the end of a run."""
from __future__ import annotations

from edgexfer.bounds import within
from edgexfer.report_schema import Check, Recommendation
from edgexfer.runtime import atomic, fmt
from edgexfer.runtime.labels import code_span, markdown


TEST_DROP_CHECK = "INT8 accuracy drop vs FP32 (test split, reported: does not choose)"


def checks(rep: dict, max_drop: float) -> list[Check]:
    """The numbers a user relies on, each against its bound. Only the accuracy guard's row (validation
    side) decides what ships; rows on the test split are reported figures and say so in their names."""
    out: list[Check] = []
    models = rep.get("models", {})
    fp, q = models.get("fp32", {}), models.get("int8", {})
    target = rep.get("quantize", {}).get("target", {})
    g = rep.get("quantize", {}).get("guard", {})
    if g.get("disagreement") and g.get("measured_on", "this host") == "this host":
        d = g["disagreement"]
        proven = "" if "proven" not in g else (
            f"; 95% bound {fmt.pct(d['upper95'])}: " + ("proven" if g["proven"] else "unproven"))
        out.append({"name": "INT8 accuracy guard: disagreement with FP32 top-1 on images the model was not fitted on "
                            "(decides what ships)",
                    "value": d["rate"], "kind": "pct",
                    "bound": f"<= {fmt.pct(g['max_accuracy_drop'])} of {fmt.count(d['images'], 'image')}{proven}",
                    "ok": bool(g["within_bound"]), "note": g.get("confidence")})
    if "accuracy" in fp and "accuracy" in q:
        drop = fp["accuracy"] - q["accuracy"]
        if target.get("host_measures_faithfully", True):
            out.append({"name": TEST_DROP_CHECK, "value": round(drop, 4), "kind": "accuracy_delta",
                        "bound": f"<= {max_drop}", "ok": within(drop, max_drop)})
        else:
            out.append({"name": TEST_DROP_CHECK, "value": f"{fmt.accuracy_delta(drop)} on this host, not the target's",
                        "bound": f"<= {max_drop} on a {target.get('target')} device", "ok": None,
                        "note": target.get("warning")})
    if g.get("measured_on", "this host") != "this host":  # the target's own figure (arm64 under emulation)
        out.append({"name": f"INT8 accuracy drop vs FP32 on {g['measured_on']}",
                    "value": round(g["fp32_accuracy"] - g["shipped_accuracy"], 4), "kind": "accuracy_delta",
                    "bound": f"<= {g['max_accuracy_drop']} ({g.get('guard_set')})", "ok": bool(g["within_bound"]),
                    "note": f"this host measured {fmt.accuracy(g.get('shipped_host_accuracy'))} against FP32 "
                            f"{fmt.accuracy(g.get('fp32_host_accuracy'))}"})
    if "size_bytes" in fp and "size_bytes" in q:
        r = q["size_bytes"] / fp["size_bytes"]
        out.append({"name": "INT8 file size / FP32", "value": round(r, 3), "kind": "ratio", "bound": "<= 0.35",
                    "ok": r <= 0.35})
    eager = rep.get("reference", {}).get("pytorch_eager", {}).get("latency_ms", {}).get("p50")
    if eager and "latency_ms" in fp:
        r = fp["latency_ms"]["p50"] / eager
        out.append({"name": "ONNX FP32 p50 latency / PyTorch eager", "value": round(r, 3), "kind": "ratio",
                    "bound": "reported: both move with the host's load", "ok": None})
    if "latency_ms" in fp and "latency_ms" in q:
        r = fp["latency_ms"]["p50"] / q["latency_ms"]["p50"]
        out.append({"name": "INT8 speed-up over FP32 (p50, batch 1)", "value": round(r, 2), "kind": "ratio",
                    "bound": "reported: the recommendation ships the faster file", "ok": None})
    ad = rep.get("adaptation")
    if ad and "kept" in ad:
        state = "reverted" if not ad["kept"] else "kept by --adapt-bn-force" if ad.get("forced") else "kept"
        out.append({"name": "AdaBN: label-free checks on the target images (kept only when none says it hurt)",
                    "value": state, "bound": "kept", "ok": state == "kept", "note": "; ".join(ad.get("reasons", []))})
    tr = rep.get("transfer")
    if tr:
        out.append({"name": "pretrained beats scratch (test, points)", "value": tr["gain_points"], "kind": "points",
                    "bound": "> 0", "ok": not tr["negative_transfer"]})
    impact = rep.get("quantization_impact", {})
    losing = impact.get("classes_losing_more_than", {}).get("classes")
    if losing is not None:
        out.append({"name": "classes losing > 3 points to INT8 (test split, reported)", "value": losing or "none",
                    "bound": "none expected", "ok": not losing})
    return out


def recommend(rep: dict, max_drop: float) -> Recommendation | None:
    """The file to ship on this host, chosen on validation-side evidence only: FP32, or INT8 when the
    accuracy guard's verdict (report.json quantize.guard `shippable`, `verdict`, written once by the guard:
    `edgexfer.guard.verdict`; read through `int8_verdict`) lets it ship and it measured on this host, whichever
    is faster at batch 1 in the bench stage, then smaller. Files no guard checked (FP16, dynamic INT8) are not chosen.
    The test split is reported (`test_accuracy`) and never read to choose; where it disagrees with the
    guard, `test_disagrees` says so and the choice stands. `max_drop` is the run's bound; the guard
    recorded the one it applied."""
    from edgexfer.runtime.bundle import disagreement_on_test, int8_verdict

    models = rep.get("models", {})
    fp = models.get("fp32", {})
    if "latency_ms" not in fp:
        return None
    ok = {"fp32": fp}
    q = models.get("int8", {})
    int8_ok, int8_why = int8_verdict(rep, on_this_host=True) if q else (False, "")
    if int8_ok and "latency_ms" in q:
        ok["int8"] = q
    # the bench's rule: faster beyond the noise of the interleaved rounds, ties to the smaller (records without the
    # rounds: p50 decides, ties only at an equal p50)
    from edgexfer.runtime.bench import recommend as fastest

    pick = fastest({k: {**m, "shippable": True} for k, m in ok.items()})
    best, tie = pick["model"], pick["tied_with"]
    m = ok[best]
    if best == "int8" and tie:
        how = ("no faster beyond the noise of the interleaved rounds" if pick["decided_by"].startswith("sign")
               else "the same p50")
        why = f"as fast at batch 1 on this host as FP32 ({how}) and smaller, and {int8_why}"
    elif best == "int8":
        why = f"fastest at batch 1 on this host, and {int8_why}"
    elif "int8" in ok:
        why = "fastest at batch 1 on this host (INT8 passed the accuracy guard but is slower here)"
    else:
        why = "FP32" + (f": {int8_why}" if q else ": the run has no INT8 file")
    out: Recommendation = {
        "model": best, "file": m["file"], "p50_ms": m["latency_ms"]["p50"], "size_bytes": m["size_bytes"],
        "test_accuracy": m.get("accuracy"), "why": why,
        "decided_on": "the accuracy guard (validation side) and batch-1 latency from the bench stage; "
                      "the test split only reports"}
    if "latency_ms" in q:
        speedup = fp["latency_ms"]["p50"] / q["latency_ms"]["p50"]
        out["int8_speedup"] = speedup
        if speedup <= 1.0 and best != "int8":  # INT8 chosen anyway only on a tie, which its why says
            out["note"] = (f"INT8 is not faster than FP32 on this CPU ({fmt.ratio(speedup)}x at batch 1): ship FP32 here, "
                           "or benchmark INT8 on the target device (VNNI and ARM dot-product cores gain more)")
    if q and not int8_ok:
        g = (rep.get("quantize") or {}).get("guard") or {}
        out["outside_bound" if g and not g.get("within_bound") else "not_checked"] = ["int8"]
    unchecked = sorted(k for k in models if k not in ("fp32", "int8"))
    if unchecked:  # FP16, dynamic INT8: scored on test only, which never chooses
        out["not_checked"] = sorted(set(out.get("not_checked", [])) | set(unchecked))
    warning = disagreement_on_test(rep)
    if warning:
        out["test_disagrees"] = warning
    return out


_pct = fmt.pct


def check_value(c: dict) -> str:
    """A check's value as its kind says (report.md, the CLI headline)."""
    return fmt.figure(c["value"], c.get("kind"))


def report_md(rep: dict) -> str:
    d, b, models = rep.get("data", {}), rep.get("backbone", {}), rep.get("models", {})
    lines = ["# edgexfer run report", "",
             f"Data: {code_span(d.get('source'))} — {len(d.get('classes', []))} classes; train {d.get('train')}, "
             f"val {d.get('val')}, test {d.get('test')}"
             + (f"; {fmt.count(d['labelled_left_out'], 'labelled image')} left out by --shots." if d.get("labelled_left_out") else "."),
             f"Backbone: `{b.get('name')}` ({b.get('weights')} weights), strategy `{b.get('strategy')}`, "
             f"input {b.get('image_size')}×{b.get('image_size')}.", ""]
    if b.get("selection"):
        lines += _selection_lines(b["selection"])
    if b.get("image_size_reason"):
        lines += [f"Input size {b['image_size']} px: {b['image_size_reason']}.", ""]
    if b.get("strategy_reason"):
        lines += [f"Strategy `{b.get('strategy')}` chosen by `--strategy auto`: {b['strategy_reason']}.", ""]
    t = rep.get("training", {})
    if t:
        tuned = any(h.get("phase") == "finetune" for h in t.get("history") or [])
        lines += [f"Training: {kept_weights(t)}; {t.get('train_seconds', 0):.0f} s on {t.get('device', 'cpu')}"
                  + (f"; linear probe alone {fmt.accuracy(t.get('probe_val_accuracy'))}" if tuned else "")
                  + (f" in {t['probe_seconds']:.1f} s" if tuned and t.get("probe_seconds") else "")
                  + (f"; {t['trainable_parameters']:,} trainable parameters" if t.get("trainable_parameters") else "")
                  + ".", ""]
        sel = t.get("probe_selection")
        if sel:
            lines += [f"Probe strength C={sel['C']:.3g} chosen by {sel['method']} on {fmt.count(sel['images'], 'labelled image')} "
                      f"(CV accuracy {fmt.accuracy(sel['cv_accuracy'])} ± {fmt.accuracy(sel['cv_stderr'])}), fitted on "
                      f"{sel['refit_on']}: "
                      f"{sel['reason']}.", ""]
            if sel.get("C_at_edge"):
                lines += [f"**Warning:** {sel['C_at_edge']}.", ""]
            lines += probe_features_lines(sel)
    lines += calibration_lines(rep)
    lines += adaptation_lines(rep)
    tr = rep.get("transfer")
    if tr:
        lines += [("**NEGATIVE TRANSFER:** " if tr["negative_transfer"] else "") +
                  f"Pretrained start {fmt.accuracy(tr['pretrained_test_accuracy'])} vs the same network from scratch "
                  f"{fmt.accuracy(tr['scratch_test_accuracy'])} with the same budget ({fmt.points(tr['gain_points'])} points, "
                  f"{tr['measured_with']}).", ""]
    lines += ["## Models", ""]
    stages = rep.get("stages", {})
    pending = [s for s in ("evaluate", "bench") if not stages.get(s, {}).get("done")]
    if pending:  # a stage before them ran again since (runfolder.begin cleared their figures)
        what = {"evaluate": "test accuracy (`edgexfer evaluate RUN`)",
                "bench": "latency (the bench stage of `edgexfer run`; `edgexfer bench RUN` prints it without "
                         "recording it here)"}
        lines += ["Not measured since the files last changed: " + "; ".join(what[s] for s in pending) + ".", ""]
    lines += ["| model | file | size (MB) | test accuracy | macro-F1 | p50 ms | p90 ms | p99 ms | img/s (batch) |",
              "|---|---|---|---|---|---|---|---|---|"]
    rows = list(models.items())
    ref = rep.get("reference", {}).get("pytorch_eager")
    for k, m in rows:
        lat, thr = m.get("latency_ms", {}), m.get("throughput", {})
        lines.append(f"| {k} | {m.get('file')} | {m.get('size_bytes', 0) / 1e6:.2f} | {fmt.accuracy(m.get('accuracy'))} | "
                     f"{fmt.accuracy(m.get('macro_f1'))} | {fmt.ms(lat.get('p50'))} | {fmt.ms(lat.get('p90'))} | "
                     f"{fmt.ms(lat.get('p99'))} | {fmt.img_s(thr.get('images_per_s'))} ({thr.get('batch', '')}) |")
    if ref:
        lat, thr = ref["latency_ms"], ref.get("throughput", {})
        lines.append(f"| PyTorch eager (reference) | checkpoint.pt | | | | {fmt.ms(lat['p50'])} | {fmt.ms(lat['p90'])} | "
                     f"{fmt.ms(lat['p99'])} | {fmt.img_s(thr.get('images_per_s'))} ({thr.get('batch', '')}) |")
    bench = rep.get("bench", {})
    if bench:
        lines += ["", f"Latency: batch 1, {bench.get('threads')} threads, {bench.get('iters')} interleaved runs "
                      f"after {bench.get('warmup')} warm-up runs. img/s (batch): images per second at the batch size "
                      "in brackets, that batch size over the median time of one call (at batch 1, 1000 / p50)."]
    mach = rep.get("machine")
    if mach:
        lines += [f"Machine: {mach.get('cpu')} ({mach.get('arch')}, {mach.get('cores')} cores, flags "
                  f"{', '.join(mach.get('flags', [])) or 'none'}), onnxruntime {mach.get('onnxruntime')}."]
    ex = rep.get("export")
    if ex:
        lines += ["", f"Export validation ({ex.get('validated_on')}): max abs difference {ex['max_abs_diff']:.2e} "
                      f"(atol {ex['atol']}), top-1 agreement {_pct(ex['top1_agreement'])}; opset {ex.get('opset')}."]
    q = rep.get("quantize")
    if q:
        lines += [f"Quantization: static INT8 {q.get('format')}, activations {q.get('activation_type')}, weights "
                  f"{q.get('weight_type')}, per-channel {q.get('per_channel')}, reduce_range {q.get('reduce_range')}, "
                  f"{q.get('calibration_method')} calibration on {q.get('calibrated_on')}."]
        g = q.get("guard")
        if g:
            lines += ["", f"Accuracy guard ({g.get('tuner', 'built-in')}; on {g.get('guard_set')}, bound "
                          f"{g['max_accuracy_drop']}): {g['chosen_fp32_layers']} of {g['quantizable_layers']} weighted "
                          "layers kept in FP32" + ("" if g["within_bound"] else " — **no candidate met the bound**")
                      + ".", "", "| candidate | guard accuracy | drop | within bound |", "|---|---|---|---|"]
            inc = g.get("inc") or {}
            if g.get("decides_on"):  # top-1 agreement with FP32 decides; labelled validation beside it
                held = (g.get("validation") or {}).get("held_out_as", "validation")
                lines[-2:] = ["| candidate | agreement with FP32 (decides) | disagreement | labelled accuracy, "
                              f"{held} (drop ± s.e.) | within bound |", "|---|---|---|---|---|"]
            lines += [f"| INC trial {i + 1} | {fmt.accuracy(a)} | {fmt.accuracy_delta(g['fp32_accuracy'] - a)} | "
                      + ("(INC's own run) | " if g.get("decides_on") else "")
                      + f"{within(g['fp32_accuracy'] - a, g['max_accuracy_drop'])} |"
                      for i, a in enumerate(inc.get("trial_accuracies", [])[1:])]
            if g.get("measured_on", "this host") != "this host":  # arm64 columns: the target's figure and this host's
                lines[-2:] = [f"| candidate | accuracy on {g['measured_on']} (decides) | accuracy on this host | "
                              "drop (target) | within bound |", "|---|---|---|---|---|"]
                lines += [f"| FP32 | {fmt.accuracy(g['fp32_accuracy'])} | {fmt.accuracy(g.get('fp32_host_accuracy'))} | | |"]
                lines += [f"| {c['fp32_layers']} layers FP32 | {fmt.accuracy(c['guard_accuracy'])} | "
                          f"{fmt.accuracy(c['host_accuracy'])} | {fmt.accuracy_delta(c['drop'])} | {c['within_bound']} |"
                          for c in g["candidates"] if "fp32_layers" in c]
            elif g.get("decides_on"):
                lines += [f"| {candidate_name(g, i)} | {fmt.accuracy(c['guard_accuracy'])} | "
                          f"{fmt.accuracy(c['drop'])} | "
                          + (f"{fmt.accuracy(c['val_accuracy'])} ({fmt.points(100 * c['val_drop'])} ± "
                             f"{fmt.points(100 * c['val_drop_se'], signed=False)} points)" if "val_drop" in c else "–")
                          + f" | {c['within_bound']} |"
                          for i, c in enumerate(g["candidates"]) if "fp32_layers" in c]
                lines += ["", f"How sure: {g['confidence']}"]
            else:
                lines += [f"| {c['fp32_layers']} layers FP32 | {fmt.accuracy(c['guard_accuracy'])} | "
                          f"{fmt.accuracy_delta(c['drop'])} | {c['within_bound']} |"
                          for c in g["candidates"] if "fp32_layers" in c]
            if g["layers_kept_fp32"]:
                lines += ["", "Kept in FP32: " + ", ".join(f"`{n}`" for n in g["layers_kept_fp32"]) + "."]
    lines += ["", "## Checks", "", "| check | value | bound | ok |", "|---|---|---|---|"]
    for c in rep.get("checks", []):
        ok = "not measurable here" if c["ok"] is None else ("yes" if c["ok"] else "**NO**")
        lines.append(f"| {c['name']} | {markdown(check_value(c))} | {c['bound']} | {ok} |")
    r = rep.get("recommendation")
    if r:
        lines += ["", f"**Recommended for this host:** `{r['file']}` — {r['why']} (p50 {fmt.ms(r['p50_ms'])} ms, "
                      f"{r['size_bytes'] / 1e6:.2f} MB; test accuracy {fmt.accuracy(r.get('test_accuracy'))}, "
                      "reported only). Chosen on " + r.get("decided_on", "") + "."
                  + (f" {r['note']}." if r.get("note") else "")
                  + (f" Not chosen, no validation-side check: {', '.join(r['not_checked'])}."
                     if r.get("not_checked") else "")]
        if r.get("test_disagrees"):
            lines += ["", f"> **WARNING — {r['test_disagrees']}.**"]
    t = rep.get("quantize", {}).get("target")
    if t:
        lines += ["", f"INT8 target: {t['target']} (host: {t['host']}). {t['why']}"
                  + (f" **Warning:** {t['warning']}." if t.get("warning") else "")]
    lines += ["", task_table(rep), "", per_class_table(rep), "", "![confusion matrix](confusion_matrix.png)",
              learning_curve_line(rep), ""]
    return "\n".join(lines)


def learning_curve_line(rep: dict) -> str:
    """The learning curve's image, or why there is none (plots.learning_curve draws it from two epochs on)."""
    from edgexfer.plots import has_learning_curve, learning_curve_points

    history = (rep.get("training") or {}).get("history")
    if has_learning_curve(history):
        return "![learning curve](learning_curve.png)"
    pts = learning_curve_points(history)
    if pts:
        return (f"No learning curve: {accuracy_name(rep.get('training') or {})} was measured once "
                f"({fmt.accuracy(pts[0][1])}, "
                + ("the linear probe" if pts[0][0] == 0 else f"epoch {pts[0][0]}") + "), so there is no curve to draw.")
    return "No learning curve: no validation accuracy was measured (no validation split)."


def candidate_name(g: dict, i: int) -> str:
    """'3 layers FP32 (ranked by harm per ms), shipped': a guard candidate, its search order, and whether it shipped."""
    c = g["candidates"][i]
    k = c["fp32_layers"]
    name = f"{k} layer{'' if k == 1 else 's'} FP32" + (f" ({c['order']})" if c.get("order") else "")
    return name + (", **shipped**" if g.get("chosen_candidate") == i and not (g.get("qat") or {}).get("chosen") else "")


def task_table(rep: dict) -> str:
    """Per-task accuracy of every file, when the model has several tasks (one output each)."""
    models = rep.get("models", {})
    tasks = next((m["tasks"] for m in models.values() if "tasks" in m), None)
    if not tasks:
        return ""
    keys = [k for k in models if "tasks" in models[k]]
    lines = ["## Per task (test split)", "", "| task | classes | labelled test images | "
             + " | ".join(f"{k} accuracy | {k} macro-F1" for k in keys) + " |",
             "|---|---|---|" + "---|---|" * len(keys)]
    for name, v in tasks.items():
        cells = " | ".join(f"{fmt.accuracy(models[k]['tasks'][name]['accuracy'])} | "
                           f"{fmt.accuracy(models[k]['tasks'][name]['macro_f1'])}"
                           for k in keys)
        lines.append(f"| {markdown(name)} | {len(v['per_class'])} | {v['n']} | {cells} |")
    return "\n".join(lines)


def per_class_table(rep: dict) -> str:
    """FP32 and INT8 per class on the test split: one table per task when the model has several."""
    models = rep.get("models", {})
    fp, q = models.get("fp32", {}), models.get("int8", {})
    if "per_class" not in fp:
        return ""
    tasks = {name: (v, (q.get("tasks") or {}).get(name, {})) for name, v in (fp.get("tasks") or {}).items()
             if "per_class" in v}
    if not tasks:
        tasks = {None: (fp, q)}
    out = []
    for name, (f, i8) in tasks.items():
        lines = [f"## Per class (test split{'' if name is None else f', task {markdown(name)}'})", "",
                 "| class | support | FP32 precision | FP32 recall | INT8 recall | INT8 − FP32 (points) |",
                 "|---|---|---|---|---|---|"]
        for c, v in f["per_class"].items():
            qr = i8.get("per_class", {}).get(c, {}).get("recall")
            delta = None if qr is None else 100 * (qr - v["recall"])
            lines.append(f"| {markdown(c)} | {v['support']} | {fmt.accuracy(v['precision'])} | "
                         f"{fmt.accuracy(v['recall'])} | {'' if qr is None else fmt.accuracy(qr)} | "
                         f"{'' if delta is None else fmt.points(round(delta, 2))} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _ece(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def adaptation_lines(rep: dict) -> list[str]:
    """--adapt-bn in report.md: kept or reverted and why, the label-free measures before -> after on the
    target images, and INT8/FP32 agreement there."""
    ad = rep.get("adaptation")
    if not ad:
        return []
    where = f"{ad['batchnorm_layers']} BatchNorm layers on {fmt.count(ad['images'], 'unlabelled image')} from {code_span(ad['folder'])}"
    why = "; ".join(ad.get("reasons", []))
    if not ad.get("kept", True):
        head = (f"**AdaBN REVERTED: {where} looked harmful without target labels, so the model keeps its unadapted "
                f"BatchNorm statistics (`--adapt-bn-force` keeps them): {why}.**")
    elif ad.get("forced"):
        head = f"**AdaBN kept by `--adapt-bn-force` although the label-free checks say it hurt: {why}.**"
    else:
        head = f"Domain adaptation: {ad['method']}, {where}; kept: {why}." if why else \
            f"Domain adaptation: {ad['method']}, {where}."
    lines = [head, ""]
    src = ad.get("source_validation")
    if src:
        lines += [f"Source validation accuracy {fmt.accuracy(src['before'])} before, {fmt.accuracy(src['after'])} after "
                  f"({fmt.points(100 * src['change'])} points ± {fmt.points(100 * src['stderr'], signed=False)} paired s.e., "
                  f"{fmt.count(src['images'], 'image')}: {src['fixed']} fixed, {src['broken']} broken"
                  + (f"; {src['note']}" if src.get("note") else "") + ").", ""]
    elif "source_val_accuracy_before" in ad and "target" not in ad:  # a report written before the checks
        lines += [f"Source validation accuracy {fmt.accuracy(ad.get('source_val_accuracy_before'))} before, "
                  f"{fmt.accuracy(ad.get('source_val_accuracy_after'))} after.", ""]
    target = ad.get("target") or {}
    if target:
        lines += ["| on the target images | images | mean entropy (nats) | mean max-probability | largest class (share) "
                  "| top-1 agreement adapted/unadapted |", "|---|---|---|---|---|---|"]
        for name, t in target.items():
            b, a = t["before"], t["after"]
            lines.append(f"| {markdown(name)} | {t['images']} | {b['mean_entropy']:.3f} → {a['mean_entropy']:.3f} | "
                         f"{b['mean_max_probability']:.3f} → {a['mean_max_probability']:.3f} | "
                         f"{markdown(b['largest_class'])} ({fmt.pct(b['largest_class_share'])}) → {markdown(a['largest_class'])} "
                         f"({fmt.pct(a['largest_class_share'])}) | {fmt.pct(t['top1_agreement'])} |")
        lines.append("")
    st = ad.get("stability")
    if st and st.get("warning"):
        lines += [f"**Warning:** {st['warning'][0].upper()}{st['warning'][1:]}.", ""]
    return lines + target_agreement_lines(rep)


def target_agreement_lines(rep: dict) -> list[str]:
    """INT8/FP32 top-1 agreement on the --adapt-bn images (the quantize stage's label-free target check)."""
    ag = (rep.get("quantize") or {}).get("target_agreement")
    if not ag:
        return []
    searched = not ((rep.get("quantize") or {}).get("guard") or {}).get("search_skipped")
    return [("**Warning:** " if ag["top1_agreement"] < ag["warn_below"] else "")
            + f"INT8 gives FP32's top-1 on {fmt.pct(ag['top1_agreement'])} of {ag['images']} unlabelled "
            + ("target-domain images (no labels needed; the accuracy guard kept early layers in FP32 "
               f"until it reached {fmt.pct(ag['warn_below'])}, or the best it could)." if searched else
               f"target-domain images (no labels needed; plain INT8, not searched: no file could be proven, "
               f"so nothing kept layers in FP32 to reach {fmt.pct(ag['warn_below'])})."), ""]


def calibration_lines(rep: dict) -> list[str]:
    """One line per task: T, where it was fitted, ECE before -> after there and on the test split."""
    cal = rep.get("calibration") or {}
    out = []
    for task, r in cal.get("tasks", {}).items():
        f, test = r.get("fitted_on", {}), r.get("test", {}).get("files", {})
        name = "" if len(cal["tasks"]) == 1 else f" ({markdown(task)})"
        if not f.get("images"):
            out.append(f"Calibration{name}: none — {f.get('reason')}.")
            continue
        what = (f"temperature T={r['temperature']:.3f} (90% bootstrap interval "
                f"{r['temperature_interval_90'][0]:.2f}–{r['temperature_interval_90'][1]:.2f}) fitted on "
                if r.get("folded") else f"not applied ({r['not_folded']}); measured on " if r.get("not_folded")
                else "not calibrated (--no-calibrate); measured on ")
        line = (f"Calibration{name}: {what}{fmt.count(f['images'], 'image')} ({f['split']})"
                + (", **uncertain: few images**" if f.get("uncertain") else "")
                + f"; ECE ({cal.get('bins', 15)} bins, top-1) {_ece(f['ece_before'])} → {_ece(f['ece_after'])} there")
        line += "".join(f"; test split, {k} (report only): {_ece(v['ece_before'])} → {_ece(v['ece_after'])}"
                        for k, v in test.items())
        out.append(line + ".")
    if cal.get("note"):
        out.append(f"Calibration note: {cal['note']}.")
    return out + [""] if out else []


def thresholds_section(rep: dict) -> list[str]:
    """The model card's advice on thresholds: a coverage/accuracy table on the held-out images T was fitted
    on (the test split's beside it, report only), and what images from outside the classes do."""
    cal = rep.get("calibration") or {}
    tasks = cal.get("tasks", {})
    if not tasks:
        return []
    lines = ["## Confidence scores and thresholds", ""]
    folded = any(r.get("folded") for r in tasks.values())
    lines += [("The scores are softmax probabilities calibrated by temperature scaling: one temperature per task, "
               "fitted after training on held-out images and folded into the final layer, so every file "
               "(FP32, INT8, bundles, the server) gives the same calibrated scores with no runtime change. "
               if folded else "The scores are softmax outputs as trained, not calibrated ("
               + "; ".join(r.get("not_folded") or "--no-calibrate" for r in tasks.values()) + "). ")
              + "To act only on confident answers, pick the threshold from the held-out columns below: the "
              "lowest one whose accuracy meets what your use needs; images under it go to a person. The test "
              "columns are for checking only (nothing was chosen on them); with few held-out images, treat "
              "every row as a rough guide and re-check on your own labelled images (`edgexfer evaluate --data`).",
              ""]
    for task, r in tasks.items():
        f = r.get("fitted_on", {})
        held = {row["threshold"]: row for row in f.get("thresholds", [])}
        test = {row["threshold"]: row for row in r.get("test", {}).get("thresholds", [])}
        if not held and not test:
            continue
        if len(tasks) > 1:
            lines += [f"Task {code_span(task)}:", ""]
        src = f"held out: {f.get('images')} {f.get('split')} images" if held else "held out: none"
        tfile = r.get("test", {}).get("file", "")
        lines += [f"| threshold | coverage ({src}) | accuracy (held out) | coverage (test, {tfile}) | "
                  "accuracy (test) |", "|---|---|---|---|---|"]
        for t in sorted(set(held) | set(test)):
            h, te = held.get(t, {}), test.get(t, {})
            lines.append(f"| {t:.2f} | {_opt_pct(h.get('coverage'))} | {_opt_pct(h.get('accuracy'))} | "
                         f"{_opt_pct(te.get('coverage'))} | {_opt_pct(te.get('accuracy'))} |")
        tf = f.get("threshold_for_target")
        if tf:
            floor = int(tf["threshold"] * 100) / 100  # shown rounded down: a threshold set to it keeps those images
            lines += ["", f"On the held-out images, answers scoring at least {floor:.2f} were "
                          f"{tf['accuracy']:.1%} accurate (target {tf['target_accuracy']:.0%}): {tf['accepted']} of "
                          f"{fmt.count(tf['images'], 'image')} kept."]
        lines.append("")
    lines += ["**Images of something else.** This is a closed-set classifier: it always answers with one of its "
              "classes, whatever the image shows. Calibration makes the scores honest on images like the training "
              "data; it does not make the model recognise an unrelated image, which can still get a class with a "
              "high score. Use a threshold with human review of low-scoring images, and keep unrelated images away "
              "from the model (or add an 'other' class with examples of them) where that matters.", ""]
    return lines


def _opt_pct(x) -> str:
    return "–" if x is None else _pct(x)


def _card_features(rep: dict) -> str:
    feat = ((rep.get("training") or {}).get("probe_selection") or {}).get("features")
    if not feat:
        return ""
    return (f"The head reads {feat['count']:,} features: the pooled outputs of blocks "
            f"{', '.join(map(str, feat['taps']))} ({feat['rule']}; chosen by cross-validation among "
            f"{len((rep['training']['probe_selection'].get('candidates') or []))} feature sets: {feat['reason']}). ")


def probe_features_lines(sel: dict) -> list[str]:
    """Which blocks' pooled outputs the cross-validated probe's head reads, why, and every candidate's CV figure."""
    feat = sel.get("features")
    if not feat:
        return []
    lines = [f"The head reads {feat['count']:,} features, `{feat['name']}`: {feat['rule']} (blocks "
             f"{', '.join(map(str, feat['taps']))}): {feat['reason']}. Candidates, by the same "
             "cross-validation:", "",
             "| features | blocks | count | C | CV accuracy ± s.e. | best's lead ± paired s.e. |", "|---|---|---|---|---|---|"]
    for c in sel.get("candidates") or []:
        lines.append(f"| {c['name']}{' (chosen)' if c['name'] == feat['name'] else ''} | "
                     f"{', '.join(map(str, c['taps']))} | {c['features']:,} | {c['C']:.3g} | "
                     f"{fmt.accuracy(c['cv_accuracy'])} ± {fmt.accuracy(c['cv_stderr'])} | "
                     f"{fmt.points(100 * c['lead_of_best'])} ± {fmt.points(100 * c['lead_stderr'], signed=False)} |")
    return lines + [""]


def model_card(rep: dict) -> str:
    d, b, models = rep.get("data", {}), rep.get("backbone", {}), rep.get("models", {})
    fp = models.get("fp32", {})
    worst = sorted(fp.get("per_class", {}).items(), key=lambda kv: kv[1]["recall"])[:3]
    impact = rep.get("quantization_impact", {})
    lines = [
        "# Model card", "",
        "## Model", "",
        f"An image classifier over {len(d.get('classes', []))} classes: {', '.join(map(markdown, d.get('classes', [])))}. "
        f"Backbone `{b.get('name')}` initialised from {b.get('pretrained_on')}, adapted with strategy "
        f"`{b.get('strategy')}`" + (f" (chosen automatically: {b['strategy_reason']})" if b.get("strategy_reason") else "")
        + (f"; {len(d['tasks']) + 1} tasks share the backbone, one head and one ONNX output each"
           if d.get("tasks") else "") + ". "
        + (f"Input {b['image_size']}×{b['image_size']} px ({b['image_size_reason']}). " if b.get("image_size_reason") else "")
        + _card_features(rep) + "Training took "
        f"{rep.get('training', {}).get('train_seconds', 0):.0f} s. Files: " + ", ".join(f"`{m['file']}`" for m in models.values()) + ".", "",
        "## Data", "",
        f"Source {code_span(d.get('source'))}; train {d.get('train')}, validation {d.get('val')}, held-out test {d.get('test')} "
        f"images. Training images per class: {markdown(d.get('train_per_class'))}. Imbalance (max/min): "
        f"{fmt.ratio(d.get('imbalance_ratio'))}."
        + (f" {fmt.count(d['labelled_left_out'], 'labelled image')} {'was' if d['labelled_left_out'] == 1 else 'were'} left out (--shots)." if d.get("labelled_left_out") else ""), "",
        "## Metrics (held-out test split, ONNX Runtime)", "",
        "| model | accuracy | macro-F1 |", "|---|---|---|",
        *[f"| {k} | {fmt.accuracy(m.get('accuracy'))} | {fmt.accuracy(m.get('macro_f1'))} |" for k, m in models.items()], "",
        task_table(rep), "",
        per_class_table(rep), "",
        "## Quantization impact", "",
    ]
    tr = rep.get("transfer")
    if tr:
        lines[lines.index("## Quantization impact"):lines.index("## Quantization impact")] = [
            "## Transfer", "",
            ("**Negative transfer:** " if tr["negative_transfer"] else "") +
            f"the pretrained start scored {fmt.accuracy(tr['pretrained_test_accuracy'])}, the same network trained from "
            f"scratch with the same budget {fmt.accuracy(tr['scratch_test_accuracy'])} ({fmt.points(tr['gain_points'])} "
            "points).", ""]
    if impact:
        lines += [f"INT8 changed accuracy by {fmt.points(-100 * impact['accuracy_drop'])} points overall; "
                  f"top-1 agreement with FP32 {fmt.pct(impact['top1_agreement_int8_vs_fp32'])}. "
                  + class_losses(impact), ""]
    else:
        lines += ["No quantized file in this run.", ""]
    ad = rep.get("adaptation")
    if ad:
        lines += ["## Domain adaptation", "",
                  (f"{ad['method']}: {ad['batchnorm_layers']} BatchNorm layers re-estimated on {ad['images']} unlabelled "
                   f"images from {code_span(ad['folder'])}" if ad.get("kept", True) else
                   f"**{ad['method']} on {fmt.count(ad['images'], 'unlabelled image')} from {code_span(ad['folder'])} was tried and reverted** "
                   "(label-free checks said it hurt; see report.md): this model carries the training images' BatchNorm "
                   "statistics") + ". The test metrics above are on the source data's test split; measure on labelled "
                  "target-domain images before relying on it there.", ""]
        lines += target_agreement_lines(rep)
    lines += thresholds_section(rep)
    lines += [
        "## Limitations", "",
        "- Served worst: " + ", ".join(f"{markdown(c)} (recall {fmt.accuracy(v['recall'])})" for c, v in worst) + ".",
        f"- The backbone's pretrained weights come from {b.get('pretrained_on')}; biases of that data set "
        "(what it over- and under-represents) can be inherited by this model.",
        f"- Measured on {fmt.count(d.get('test'), 'test image')} from the same source as the training data; accuracy on images "
        "from another camera, lighting or domain can be lower.",
        "- A closed-set classifier: an image of none of its classes still gets one of them, sometimes with a high "
        "score (see Confidence scores and thresholds).",
        "", "## Provenance", "",
        f"edgexfer {rep.get('edgexfer_version')}; checkpoint sha256 `{rep.get('training', {}).get('checkpoint_sha256')}`; "
        f"report updated {rep.get('updated')}.", "",
    ]
    return "\n".join(lines)


def class_losses(impact: dict) -> str:
    """The model card's sentence on per-class recall under INT8: the class(es) that lost most, or that none did."""
    deltas = impact.get("recall_delta_points", {})
    lost = {c: d for c, d in deltas.items() if d < 0}
    if not lost:
        return "No class lost accuracy (per-class recall)." if deltas else ""
    worst = min(lost.values())
    names = [c for c, d in lost.items() if d == worst]
    losing = impact.get("classes_losing_more_than", {})
    bound = losing.get("points", 3.0)
    return (f"The {'class' if len(names) == 1 else 'classes'} that lost most: {', '.join(map(markdown, names))} "
            f"({fmt.points(worst)} points). "
            + (f"**Warning:** {', '.join(map(markdown, losing['classes']))} lost more than {bound:g} points."
               if losing.get("classes") else f"No class lost more than {bound:g} points."))


def accuracy_name(t: dict) -> str:
    """What a run's `val_accuracy` is: the validation split's, or, when the probe was refitted on train + val
    (so validation is not held out), the cross-validation's out-of-fold accuracy."""
    refit = "val" in ((t.get("probe_selection") or {}).get("refit_on") or "")
    return "cross-validated (out-of-fold) accuracy" if refit else "validation accuracy"


def kept_weights(t: dict) -> str:
    """Which weights training kept and why it stopped, in words that agree with the epoch log: epoch 0 is the
    linear probe (kept when no fine-tuning epoch beat it on validation); early stopping compares fine-tuning
    epochs with each other, so it can stop several epochs after the kept one."""
    best, acc = t.get("best_epoch"), t.get("val_accuracy")
    hist = t.get("history") or []
    ft = [h for h in hist if h.get("phase") == "finetune"]
    if acc is None:
        return (f"no validation split, so the weights of epoch {best} (lowest training loss) were kept"
                if ft else "no validation split; the linear probe's weights")
    if best == 0:
        if not ft:
            return f"linear probe only (epoch 0, no fine-tuning epochs), {accuracy_name(t)} {fmt.accuracy(acc)}"
        out = (f"validation accuracy {fmt.accuracy(acc)} from the linear probe (epoch 0), kept because none of the "
               f"{len(ft)} fine-tuning epochs beat it")
    else:
        tied = [h["epoch"] for h in ft if h["epoch"] < best and h.get("val_accuracy") == acc]
        out = (f"validation accuracy {fmt.accuracy(acc)} from fine-tuning epoch {best} of {len(ft)} run"
               + (f" (tied with epoch {tied[0]}; ties keep the later weights)" if tied else ""))
    cfg = t.get("config") or {}
    scored = [h for h in ft if h.get("val_accuracy") is not None]
    if scored and cfg.get("epochs") and scored[-1]["epoch"] < cfg["epochs"]:
        top = max(h["val_accuracy"] for h in scored)
        at = next(h["epoch"] for h in scored if h["val_accuracy"] == top)  # early stopping counts from the first
        out += (f"; stopped early after epoch {scored[-1]['epoch']} of {cfg['epochs']}: no fine-tuning epoch beat "
                f"epoch {at}'s {fmt.accuracy(top)} in the {scored[-1]['epoch'] - at} epochs after it"
                + (f" (patience {cfg['patience']})" if cfg.get("patience") else ""))
    return out


def finalize(run, cfg) -> dict:
    rep = run.report()
    rep = run.update_report(checks=checks(rep, cfg.max_accuracy_drop),
                            recommendation=recommend(rep, cfg.max_accuracy_drop))
    atomic.write_text(run.file("report.md"), report_md(rep))
    atomic.write_text(run.file("model_card.md"), model_card(rep))
    return rep


def _selection_lines(sel: dict) -> list[str]:
    """`--backbone auto`: the comparison that chose the backbone, as a table."""
    lines = [f"Backbone chosen by `--backbone auto`: `{sel['chosen']}` at {sel['image_size']} px, {sel['reason']}. "
             "Latency: ONNX Runtime FP32, "
             "batch 1, this host.", "",
             "| backbone | input | probe leave-one-out accuracy (± s.e.) | LogME | p50 ms | within latency limit |",
             "|---|---|---|---|---|---|"]
    for r in sel["candidates"]:
        acc = f"{fmt.accuracy(r['cv_accuracy'])} ± {fmt.accuracy(r['cv_stderr'])}" if "cv_accuracy" in r else "n/a"
        chosen = " (chosen)" if (r["backbone"], r["image_size"]) == (sel["chosen"], sel["image_size"]) else ""
        lines.append(f"| {r['backbone']}{chosen} | {r['image_size']} | {acc} | {r['logme']:.3f} | {fmt.ms(r['latency_p50_ms'])} | "
                     f"{'yes' if r['within_latency'] else 'no'} |")
    lead = sel.get("lead")
    if lead and 0 < lead["points"] < 2 * lead["paired_stderr_points"]:
        lines.append(f"\nThe lead over {lead['over']} ({fmt.points(lead['points'])} points) is within two paired standard "
                     f"errors ({fmt.points(lead['paired_stderr_points'], signed=False)}): on {fmt.count(sel['images'], 'image')} the "
                     "two are not told "
                     "apart with confidence; either would do.")
    return lines + [""]
