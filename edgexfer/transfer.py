"""Transfer diagnostics: which backbone to start from (LogME), and what the pretrained start buys
as labels grow (the label-efficiency curve against training from scratch).

    edgexfer rank                      # LogME of candidate backbones on the target data, in seconds
    edgexfer curve --out runs/curve    # accuracy vs labels per class: pretrained vs scratch

LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021) scores frozen features by the evidence of a Bayesian linear model on the labels: no
training, one SVD per candidate. A higher score predicts a higher fine-tuned accuracy.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from edgexfer.errors import EdgexferError
from edgexfer.runtime import atomic

log = logging.getLogger(__name__)


# -- LogME ----------------------------------------------------------------------------------------

def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 11, tol: float = 1e-3) -> float:
    """LogME of (N, D) features for integer labels (N,): the log marginal evidence per sample of a
    Bayesian linear regression onto each class's one-hot column, averaged over classes; the prior and
    noise precisions (alpha, beta) maximise it by MacKay's fixed-point updates (at most 11, as in the
    authors' implementation: with fewer images than features the evidence has no finite maximum, and
    the capped iteration keeps scores comparable across candidates)."""
    f = np.asarray(features, np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    if n < 2:
        raise EdgexferError("LogME needs at least two labelled images")
    u, s, _ = np.linalg.svd(f, full_matrices=False)   # f = u diag(s) v^T; k = min(n, d) components
    sigma = s ** 2                                     # eigenvalues of f^T f (the other d - k are zero)
    k = len(sigma)
    evidences = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        x = u.T @ t
        x2 = x ** 2
        res_out = max(float(t @ t - x2.sum()), 0.0)   # the part of t outside f's column space
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            r = alpha / beta
            gamma = float((sigma / (sigma + r)).sum())
            m2 = float((sigma * x2 / (sigma + r) ** 2).sum())
            res2 = float((x2 / (1 + sigma / r) ** 2).sum()) + res_out
            alpha, beta = gamma / (m2 + 1e-10), (n - gamma) / (res2 + 1e-10)
            if abs(alpha / beta - r) / r <= tol:
                break
        r = alpha / beta
        m2 = float((sigma * x2 / (sigma + r) ** 2).sum())
        res2 = float((x2 / (1 + sigma / r) ** 2).sum()) + res_out
        ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * sigma))
              - 0.5 * (d - k) * np.log(alpha) - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
        evidences.append(ev / n)
    return float(np.mean(evidences))


def parse_candidate(spec: str) -> tuple[str, str]:
    """'name' -> (name, 'imagenet'); 'name@none' or 'name@/path/to/ckpt.pt' -> (name, weights)."""
    name, _, weights = spec.partition("@")
    return name.strip(), (weights.strip() or "imagenet")


def default_candidates() -> list[str]:
    """Every registered backbone whose ImageNet weights are here offline, and the first one from random
    init (the floor any pretrained start should clear)."""
    from edgexfer.backbones import get_backbone_info, list_backbones

    offline = [n for n in list_backbones() if get_backbone_info(n).offline()]
    return offline + [f"{offline[0]}@none"] if offline else []


def rank(data, candidates: list[str], *, image_size: int = 96, seed: int = 0, batch_size: int = 64) -> dict:
    """LogME of each candidate's frozen features on `data`'s labelled images (train + val, the first
    task), with the time each took. Sorted best first."""
    import torch

    from edgexfer.backbones import build_backbone, get_backbone_info, preprocessing_for
    from edgexfer.runtime.preprocess import preprocess

    images = list(data.train.images) + list(data.val.images)
    labels = np.concatenate([data.train.labels, data.val.labels])
    rows = []
    for spec in candidates:
        name, weights = parse_candidate(spec)
        info = get_backbone_info(name)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        net = build_backbone(name, weights=weights, image_size=image_size).eval()
        pp = preprocessing_for(name, image_size)
        x = torch.from_numpy(np.stack([preprocess(im, pp) for im in images]))
        t1 = time.perf_counter()
        with torch.inference_mode():
            feats = torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()
        t2 = time.perf_counter()
        score = logme(feats, labels)
        t3 = time.perf_counter()
        rows.append({"candidate": spec, "backbone": name, "weights": weights, "feature_dim": info.feature_dim,
                     "logme": score, "seconds": round(t3 - t0, 2),
                     "seconds_detail": {"build_and_preprocess": round(t1 - t0, 2), "features": round(t2 - t1, 2),
                                        "logme": round(t3 - t2, 3)}})
        log.info("%-28s LogME %.4f (%.1f s)", spec, score, t3 - t0)
    rows.sort(key=lambda r: -r["logme"])
    return {"schema": "edgexfer.rank/1", "method": "LogME (You et al., 2021) on frozen features",
            "data": data.source, "images": len(images), "classes": len(data.classes), "image_size": image_size,
            "candidates": rows, "total_seconds": round(sum(r["seconds"] for r in rows), 2)}


# -- --backbone auto: the backbone the data itself prefers, within a latency budget -----------------

SELECT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 7))


def probe_cv(features: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> dict | None:
    """How well a linear probe on frozen `features` classifies `labels`: the exact leave-one-out accuracy of a
    ridge-regression classifier (scikit-learn's RidgeClassifierCV: one decomposition gives every image's
    held-out prediction in closed form, the way LogME shares one SVD, so a thousand images take a second),
    its strength the best of SELECT_ALPHAS on those same predictions. Returns that accuracy, its binomial
    standard error, and each image's held-out correctness (for paired comparisons between backbones); None
    with fewer than 2 images in some class. `seed` is unused: leave-one-out has no random folds."""
    from sklearn.linear_model import RidgeClassifierCV

    x, y = np.asarray(features, np.float64), np.asarray(labels)
    counts = np.bincount(y)
    counts = counts[counts > 0]
    if len(counts) < 2 or counts.min() < 2:
        return None
    clf = RidgeClassifierCV(alphas=SELECT_ALPHAS, store_cv_results=True, scoring="accuracy").fit(x, y)
    v = np.asarray(clf.cv_results_)  # (N, 1 or classes, alphas): each image's held-out decision values
    pred = clf.classes_[(v[:, 0, :] > 0).astype(int)] if v.shape[1] == 1 else clf.classes_[v.argmax(1)]
    correct = (pred == y[:, None]).astype(np.float64)  # (N, alphas)
    best = int(np.argmax(correct.mean(0)))
    acc = float(correct[:, best].mean())
    return {"cv_accuracy": acc, "cv_stderr": float(np.sqrt(acc * (1 - acc) / len(y))), "alpha": SELECT_ALPHAS[best],
            "method": "ridge classifier, exact leave-one-out", "images": int(len(y)), "correct": correct[:, best]}


def _latencies_ms(nets: dict[str, tuple], threads: int, iters: int = 40) -> dict[str, float]:
    """Batch-1 p50 latency of each backbone (name -> (module, image size)) as ONNX Runtime runs it on this
    host: each exported to a temporary ONNX file, all timed interleaved in one go so that they share the
    host's noise (a pooled-feature backbone: the head adds a negligible matrix-vector product)."""
    import tempfile
    import warnings

    import torch

    from edgexfer.runtime.bench import Candidate, interleaved, onnx_candidate

    with tempfile.TemporaryDirectory(prefix="edgexfer-latency-") as td:
        cands = []
        for name, (net, size) in nets.items():
            path = Path(td) / f"{name.replace('/', '_')}.onnx"
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the exporter's tracing chatter: this file is timed, not shipped
                torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["features"])
            c = onnx_candidate(name, path, threads)
            x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
            cands.append(Candidate(name, (lambda _x, f=c.fn, xi=x: f(xi))))
        res = interleaved(cands, np.zeros(1, np.float32), warmup=5, iters=iters)
    return {n: round(r["p50"], 3) for n, r in res.items()}


def select_backbone(data, candidates: list[str], image_sizes: dict[str, int | list[int]], *, threads: int = 2,
                    max_latency_ms: float | None = None, seed: int = 0, batch_size: int = 32) -> dict:
    """`--backbone auto`: the backbone, and its input size, whose frozen features a linear probe classifies
    best, held out, on the run's labelled images (train + validation; never the test split), among the
    candidates within `max_latency_ms` at batch 1 on this host. `image_sizes` gives each backbone's size, or
    sizes: each (backbone, size) pair is a candidate (`data.auto_image_sizes`: photos also at 1.15x the
    pretraining size).

    Why held-out accuracy decides, not LogME: with fewer labelled images than feature dimensions (150
    photos vs 1,280 features on a 30-per-class set) LogME's evidence has no finite maximum and its ranking
    rests on where the fixed-point iteration is cut off; a linear probe's held-out accuracy is the quantity
    the choice is about, and its exact leave-one-out form costs about what LogME does (probe_cv). LogME is
    reported beside it.
    Ties go to the faster backbone. Each row carries the accuracy's standard error, and the choice the
    paired standard error of its lead over the runner-up: with a few hundred images a lead of a few points
    is often within noise, which the report says."""
    import torch

    from edgexfer.backbones import build_backbone, preprocessing_for
    from edgexfer.features import OnnxFeatures
    from edgexfer.runtime.preprocess import preprocess

    t_all = time.perf_counter()
    images = list(data.train.images) + list(data.val.images)
    labels = np.concatenate([data.train.labels, data.val.labels])  # the first task's (-1: unlabelled)
    keep = labels >= 0
    def sizes(spec: str) -> list[int]:
        s = image_sizes[parse_candidate(spec)[0]]
        return [int(s)] if isinstance(s, (int, np.integer)) else [int(v) for v in s]

    pairs = [(spec, size) for spec in candidates for size in sizes(spec)]

    def label(row: dict) -> str:  # a candidate is a backbone at a size
        return f"{row['backbone']} at {row['image_size']} px"

    rows, nets = [], {}
    for spec, size in pairs:
        name, weights = parse_candidate(spec)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        net = build_backbone(name, weights=weights, image_size=size).eval()
        pp = preprocessing_for(name, size)
        x = torch.from_numpy(np.stack([preprocess(im, pp) for im, k in zip(images, keep) if k]))
        # the frozen features through ONNX Runtime, exported once (edgexfer.features: PyTorch where that fails)
        feats = OnnxFeatures(net, size, x.shape[1], what=f"backbone auto: {name} features")(x, batch_size)[0].numpy()
        del x
        cv = probe_cv(feats, labels[keep], seed=seed)
        row = {"backbone": name, "weights": weights, "image_size": size, "logme": logme(feats, labels[keep]),
               "seconds": round(time.perf_counter() - t0, 1)}
        if cv is not None:
            row.update({k: v for k, v in cv.items() if k != "correct"}, _correct=cv["correct"])
        rows.append(row)
        nets[label(row)] = (net, size)
        log.info("backbone auto: %-22s %3d px  probe leave-one-out accuracy %s  LogME %.4f  (%.1f s)", name, size,
                 f"{row['cv_accuracy']:.4f} ± {row['cv_stderr']:.4f}" if cv else "n/a", row["logme"], row["seconds"])
    lat = _latencies_ms(nets, threads)
    for r in rows:
        r["latency_p50_ms"] = lat[label(r)]
        r["within_latency"] = max_latency_ms is None or r["latency_p50_ms"] <= max_latency_ms
    ok = [r for r in rows if r["within_latency"]]
    if not ok:
        fastest = min(rows, key=lambda r: r["latency_p50_ms"])
        raise EdgexferError(f"--max-latency-ms {max_latency_ms:g}: no backbone runs that fast here (fastest: "
                            f"{label(fastest)}, {fastest['latency_p50_ms']:.2f} ms at batch 1)")
    by = "cv_accuracy" if all("cv_accuracy" in r for r in ok) else "logme"
    ok.sort(key=lambda r: (-r[by], r["latency_p50_ms"]))
    chosen = ok[0]
    lead = None
    if by == "cv_accuracy" and len(ok) > 1:
        d = chosen["_correct"] - ok[1]["_correct"]
        lead = {"over": label(ok[1]), "points": round(100 * (chosen[by] - ok[1][by]), 2),
                "paired_stderr_points": round(100 * float(d.std(ddof=1) / np.sqrt(len(d))), 2)}
    for r in rows:
        r.pop("_correct", None)
    rows.sort(key=lambda r: (not r["within_latency"], -r[by], r["latency_p50_ms"]))
    why = (f"highest {'leave-one-out linear-probe accuracy' if by == 'cv_accuracy' else 'LogME'} on {int(keep.sum())} "
           f"labelled images (train + validation)"
           + (f" among backbones within {max_latency_ms:g} ms at batch 1 on this host" if max_latency_ms else "")
           + ("" if not lead else f"; tied with {lead['over']}, and faster" if lead["points"] == 0 else
              f"; {lead['points']:+.1f} points over {lead['over']} (paired standard error "
              f"{lead['paired_stderr_points']:.1f})"))
    return {"schema": "edgexfer.backbone-selection/1", "method": by, "chosen": chosen["backbone"],
            "image_size": chosen["image_size"], "reason": why, "lead": lead, "max_latency_ms": max_latency_ms,
            "images": int(keep.sum()), "candidates": rows, "seconds": round(time.perf_counter() - t_all, 1)}


def kendall_tau(a, b) -> float:
    """Kendall's tau-b between two score lists (ties counted as neither concordant nor discordant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    conc = disc = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                conc += 1
            else:
                disc += 1
    denom = np.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return float((conc - disc) / denom) if denom else float("nan")


def rank_markdown(res: dict) -> str:
    lines = [f"LogME on {res['images']} labelled images ({res['classes']} classes, {res['image_size']}px) of "
             f"`{res['data']}`; higher predicts better transfer.", "",
             "| rank | candidate | weights | LogME | seconds |", "|---|---|---|---|---|"]
    for i, r in enumerate(res["candidates"], 1):
        lines.append(f"| {i} | {r['backbone']} | {r['weights']} | {r['logme']:.4f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


# -- the label-efficiency curve --------------------------------------------------------------------

def _nested_subsets(labels: np.ndarray, shots: list[int], seed: int) -> dict[int, np.ndarray]:
    """For each k in `shots`, k items per class; each subset contains the smaller ones."""
    rng = np.random.default_rng(seed)
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)}
    return {k: np.sort(np.concatenate([idx[:k] for idx in order.values()])) for k in shots}


def curve(cfg, shots: list[int], out_dir: str | Path, *, scratch: bool = True, on_point=None) -> dict:
    """Test accuracy against labels per class, pretrained (the configured strategy) vs the same network
    from random init with the same budget. One data set, one test split, nested label subsets; each
    finished point is saved, so a killed curve resumes."""
    from edgexfer.backbones import preprocessing_for
    from edgexfer.data import load_dataset, split_labelled
    from edgexfer.finetune import tensorize

    shots = sorted(set(int(k) for k in shots))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d, m = cfg.data, cfg.model
    key = {"data": dataclasses.asdict(d), "model": dataclasses.asdict(m), "train": dataclasses.asdict(cfg.train),
           "scratch": scratch}
    key["data"]["shots"] = None
    state_file = out / "curve.json"
    res = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if res.get("key") != key:
        res = {"schema": "edgexfer.curve/1", "key": key, "points": {}}
    ds = load_dataset(d.source, shots=max(shots), val_fraction=d.val_fraction, test_size=d.test_size,
                      test_fraction=d.test_fraction, seed=d.seed, strict=d.strict, follow_symlinks=d.follow_symlinks)
    pool = _concat(ds.train, ds.val)
    have = np.bincount(pool.labels, minlength=len(ds.classes))
    pp = preprocessing_for(m.backbone, m.image_size)
    xt, yt = tensorize(ds.test, pp, "preprocess test")
    yt = yt if yt.ndim == 1 else yt[:, 0]
    subsets = _nested_subsets(pool.labels, shots, d.seed)
    res.update(data=ds.source, classes=len(ds.classes), test_images=len(ds.test), backbone=m.backbone,
               weights=m.weights, image_size=m.image_size, strategy=cfg.train.strategy)

    def fit(sub_ds, weights, tcfg, work):
        return fit_and_score(sub_ds, pp, (xt, yt), backbone=m.backbone, weights=weights, image_size=m.image_size,
                             train_cfg=tcfg, work_dir=work, dropout=m.dropout)

    for k in shots:
        if str(k) in res["points"]:
            continue
        rng = np.random.default_rng(d.seed + k)
        sub = pool.subset(subsets[k])
        tr, va = split_labelled(sub.labels, None, d.val_fraction, rng)
        sub_ds = dataclasses.replace(ds, train=sub.subset(tr), val=sub.subset(va))
        point = {"labels_per_class": k, "labels_available_min": int(have.min())}
        acc, info = fit(sub_ds, m.weights, cfg.train, out / f".work-{k}-pretrained")
        info.pop("model")
        point["pretrained"] = {"test_accuracy": acc, **info}
        if scratch:
            acc_s, info_s = fit(sub_ds, "none", scratch_config(cfg.train), out / f".work-{k}-scratch")
            info_s.pop("model")
            point["scratch"] = {"test_accuracy": acc_s, **info_s}
            point["gain_points"] = round(100 * (acc - acc_s), 2)
            point["negative_transfer"] = acc <= acc_s
        res["points"][str(k)] = point
        atomic.write_json(state_file, res)
        if on_point:
            on_point(point)
    res["points"] = {str(k): res["points"][str(k)] for k in shots}
    atomic.write_json(state_file, res)
    atomic.write_text(out / "curve.md", curve_markdown(res))
    _curve_plot(res, out / "curve.png")
    return res


def fit_and_score(ds, pp, test, *, backbone: str, weights: str, image_size: int, train_cfg, work_dir: Path,
                  dropout: float = 0.2) -> tuple[float, dict]:
    """Train a fresh model on `ds` (its train and val splits) and score it on `test` = (x, y) tensors,
    the first task, in PyTorch: (test accuracy, what the training did)."""
    import torch

    from edgexfer.finetune import predict_logits, train
    from edgexfer.model import build_model, model_config

    xt, yt = test
    mcfg = model_config(backbone=backbone, weights=weights, image_size=image_size, tasks=ds.tasks, dropout=dropout)
    torch.manual_seed(train_cfg.seed)
    model = build_model(mcfg)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    r = train(model, ds, pp, train_cfg, work_dir, weights=weights)
    shutil.rmtree(work_dir, ignore_errors=True)
    acc = float((predict_logits(model, xt).argmax(1) == yt).float().mean())
    return acc, {"strategy": r.strategy, "train_seconds": round(r.train_seconds, 2), "val_accuracy": r.val_accuracy,
                 "train_images": len(ds.train), "val_images": len(ds.val), "probe_seconds": r.probe_seconds,
                 "trainable_parameters": r.trainable_parameters, "model": model}


def scratch_config(train_cfg):
    """The from-scratch baseline's budget: the same epochs and schedule, every layer trained from the
    start with BatchNorm in training mode, a learning rate of at least 1e-3, nothing to probe."""
    return dataclasses.replace(train_cfg, strategy="finetune", freeze_bn=False, lr=max(train_cfg.lr, 1e-3),
                               lr_decay=1.0, scratch_baseline=False, adapt_bn=None, source_bn=False)


def _concat(a, b):
    from edgexfer.data import Split

    return Split(list(a.images) + list(b.images), np.concatenate([a.labels, b.labels]),
                 {k: np.concatenate([a.extra[k], b.extra[k]]) for k in a.extra})


def curve_markdown(res: dict) -> str:
    pts = list(res["points"].values())
    scratch = any("scratch" in p for p in pts)
    lines = [f"Accuracy vs labels per class on `{res['data']}` ({res['test_images']} held-out test images), "
             f"{res['backbone']} at {res['image_size']}px, strategy `{res['strategy']}`"
             + (", against the same network from random init with the same budget" if scratch else "") + ".", "",
             "| labels/class | pretrained | strategy | seconds |" + (" scratch | seconds | gain (points) |" if scratch else ""),
             "|---|---|---|---|" + ("---|---|---|" if scratch else "")]
    for p in pts:
        pre = p["pretrained"]
        row = f"| {p['labels_per_class']} | {pre['test_accuracy']:.4f} | {pre['strategy']} | {pre['train_seconds']:.0f} |"
        if "scratch" in p:
            s = p["scratch"]
            flag = " **negative transfer**" if p["negative_transfer"] else ""
            row += f" {s['test_accuracy']:.4f} | {s['train_seconds']:.0f} | {p['gain_points']:+.1f}{flag} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def _curve_plot(res: dict, path: Path) -> None:
    from edgexfer.runtime.plotting import save_plot

    pts = list(res["points"].values())
    ks = [p["labels_per_class"] for p in pts]

    def draw(plt):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        ax.plot(ks, [p["pretrained"]["test_accuracy"] for p in pts], marker="o",
                label=f"pretrained ({res['weights']})")
        if all("scratch" in p for p in pts):
            ax.plot(ks, [p["scratch"]["test_accuracy"] for p in pts], marker="s", label="from scratch")
        ax.axhline(1 / max(1, res["classes"]), color="grey", lw=0.8, ls=":", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("labelled images per class")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{res['backbone']}: accuracy vs labels")
        ax.grid(alpha=0.3)
        ax.legend()
        return fig

    save_plot(path, draw)
