"""Partial fine-tuning on cached activations against the cross-validated probe, by the same folds (issue 28).

Issue 28 asks for candidates the probe's cross-validation can afford: the probe, and training the last k blocks and
the head on cached activations of the frozen part (each labelled image and its augmented views pass the frozen
part once). Before such candidates join the default's cross-validation, this measures whether they could win it:
on a photo set's labelled images (train + val), with the probe's own four augmented views, stratified 5-fold, it
scores

- the probe: multinomial logistic regression on the last layer's pooled features, its strength the best of the
  probe's 25 by the folds' mean accuracy (as the default chooses it: optimistic by that choice),
- partial fine-tuning, k = 0 (the 1x1 head convolution, its BatchNorm and the classifier) and k = 1 (also the last
  MBConv block): started from the pretrained weights and, for the classifier, the probe fitted on the training
  folds at the chosen strength (LP-FT's start), AdamW for EPOCHS epochs with a cosine schedule, batch 32,
  BatchNorm statistics frozen (batches of 32 views of a few images are no population), dropout 0.2 before the
  classifier, cross-entropy; at two backbone learning rates (1e-4, LP-FT's tenth of the head's 1e-3, and 1e-3),
  each reported, neither chosen,

with each candidate's paired lead over the probe (per image, held-out correct minus correct) and its standard
error, and, for information only, the test split's accuracy of each refitted on every labelled image. The test
split chooses nothing here.

    .venv/bin/python benchmarks/bench_partial_ft.py [--data DIR ...]   # -> benchmarks/results/partial_ft.json
    .venv/bin/python benchmarks/bench_partial_ft.py --markdown
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "partial_ft.json"
DEFAULT_DATA = [ROOT.parent / "shared" / "data" / "flowers-dev", ROOT.parent / "shared" / "data" / "aerial-dev"]
BACKBONE, SIZE, VIEWS, FOLDS, EPOCHS, HEAD_LR = "efficientnet_lite0", 224, 4, 5, 10, 1e-3
BACKBONE_LRS = (1e-4, 1e-3)
KS = (0, 1)


def one_set(data: Path, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from edgexfer.augment import probe_view
    from edgexfer.backbones import block_outputs, build_backbone, preprocessing_for
    from edgexfer.data import load_image_folder
    from edgexfer.probe import PROBE_CS
    from edgexfer.runtime.preprocess import preprocess

    torch.set_num_threads(2)
    t_start = time.perf_counter()
    ds = load_image_folder(data, seed=seed)
    imgs = list(ds.train.images) + list(ds.val.images)
    y = np.concatenate([ds.train.labels, ds.val.labels])
    n, k_cls = len(y), len(ds.classes)
    pp = preprocessing_for(BACKBONE, SIZE)
    net = build_backbone(BACKBONE, weights="imagenet", image_size=SIZE).eval()
    nb = len(net.blocks)  # stem, MBConv blocks, head convolution
    idx = sorted({nb - 2 - k for k in KS} | {nb - 1})  # the trained suffixes' inputs, and the last output

    def centre(paths):
        return torch.from_numpy(np.stack([preprocess(p, pp) for p in paths]).astype(np.float32))

    @torch.no_grad()
    def acts(x):
        out = [block_outputs(net, x[i:i + 64]) for i in range(0, len(x), 64)]
        return [torch.cat([o[j] for o in out]) for j in idx]

    views = [acts(centre(imgs))] + [acts(probe_view(imgs, pp, v, seed)) for v in range(VIEWS)]
    test = acts(centre(list(ds.test.images)))
    yt = ds.test.labels
    t_features = time.perf_counter() - t_start
    last = idx.index(nb - 1)
    pooled = lambda a: a.mean((2, 3)).numpy().astype(np.float64)  # noqa: E731
    f_all = np.concatenate([pooled(v[last]) for v in views])  # rows: originals, then view 1, view 2, ...
    y_all = np.tile(y, VIEWS + 1)
    folds = list(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros(n), y))
    rows = lambda tr: np.concatenate([tr + v * n for v in range(VIEWS + 1)])  # noqa: E731

    def logreg(x, t, c):
        mu = x.mean(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(C=c, max_iter=3000).fit(x - mu, t)
        return clf.coef_, clf.intercept_ - clf.coef_ @ mu

    correct = np.zeros((len(PROBE_CS), n), bool)
    for tr, te in folds:
        for i, c in enumerate(PROBE_CS):
            w, b = logreg(f_all[rows(tr)], y_all[rows(tr)], c)
            correct[i, te] = (f_all[te] @ w.T + b).argmax(1) == y[te]
    best = int(correct.mean(1).argmax())
    c_best, probe_correct = float(PROBE_CS[best]), correct[best]
    w_all, b_all = logreg(f_all, y_all, c_best)
    probe_test = float(((pooled(test[last]) @ w_all.T + b_all).argmax(1) == yt).mean())
    res = {"data": str(data), "images": n, "test_images": int(len(yt)), "classes": k_cls,
           "features_seconds": round(t_features, 1),
           "probe": {"C": c_best, "cv_accuracy": float(probe_correct.mean()), "test_accuracy": probe_test},
           "partial": []}

    def suffix(k):
        m = net.net
        return (copy.deepcopy(torch.nn.ModuleList(list(m._blocks)[len(m._blocks) - k:] if k else [])).eval(),
                copy.deepcopy(m._conv_head), copy.deepcopy(m._bn1).eval())

    def forward(mods, a):
        blocks, conv, bn = mods
        for blk in blocks:
            a = blk(a)
        return net.net._swish(bn(conv(a))).mean((2, 3))

    def train(k, lr, tr_rows, w0, b0):
        j = idx.index(nb - 2 - k)
        x = torch.cat([v[j] for v in views])[tr_rows]
        t = torch.as_tensor(y_all[tr_rows])
        mods = suffix(k)
        torch.manual_seed(seed)  # dropout's masks: the same run gives the same figures
        fc = torch.nn.Linear(w0.shape[1], k_cls)
        with torch.no_grad():
            fc.weight.copy_(torch.as_tensor(w0, dtype=torch.float32))
            fc.bias.copy_(torch.as_tensor(b0, dtype=torch.float32))
        params = [p for blk in mods[0] for p in blk.parameters()] + list(mods[1].parameters()) + list(mods[2].parameters())
        opt = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": 0.0},
                                 {"params": fc.parameters(), "lr": HEAD_LR, "weight_decay": 0.0}])
        g = torch.Generator().manual_seed(seed)
        steps, s = EPOCHS * ((len(x) + 31) // 32), 0
        for _ in range(EPOCHS):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 32):
                for group, base in zip(opt.param_groups, (lr, HEAD_LR)):
                    group["lr"] = base * 0.5 * (1 + np.cos(np.pi * s / steps))
                batch = perm[i:i + 32]
                loss = F.cross_entropy(fc(F.dropout(forward(mods, x[batch]), 0.2, True)), t[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                s += 1
        return mods, fc, j

    @torch.no_grad()
    def predict(mods, fc, a):
        return torch.cat([fc(forward(mods, a[i:i + 128])) for i in range(0, len(a), 128)]).argmax(1).numpy()

    for lr in BACKBONE_LRS:
        for k in KS:
            t0 = time.perf_counter()
            cv = np.zeros(n, bool)
            for tr, te in folds:
                w0, b0 = logreg(f_all[rows(tr)], y_all[rows(tr)], c_best)
                mods, fc, j = train(k, lr, rows(tr), w0, b0)
                cv[te] = predict(mods, fc, views[0][j][te]) == y[te]
            t_cv = time.perf_counter() - t0
            mods, fc, j = train(k, lr, rows(np.arange(n)), w_all, b_all)
            d = cv.astype(float) - probe_correct
            res["partial"].append({"blocks": k, "backbone_lr": lr, "cv_accuracy": float(cv.mean()),
                                   "lead_over_probe": float(d.mean()), "lead_stderr": float(d.std(ddof=1) / np.sqrt(n)),
                                   "test_accuracy": float((predict(mods, fc, test[j]) == yt).mean()),
                                   "cv_seconds": round(t_cv, 1)})
            print(Path(data).name, res["partial"][-1], flush=True)
    return res


def markdown(res: dict) -> str:
    out = [f"`{res['command']}` at {res['commit']}, {res['machine'].get('cpu')}, {res['cores']} cores; "
           f"{BACKBONE} at {SIZE} px, {VIEWS} augmented views per image, stratified {FOLDS}-fold, {EPOCHS} epochs. "
           "Lead: the candidate's cross-validated accuracy minus the probe's, paired over images, ± its standard "
           "error. The test column only reports.", ""]
    for s in res["sets"]:
        p = s["probe"]
        out += [f"**{Path(s['data']).name}** ({s['images']} labelled images, {s['test_images']} test)", "",
                "| candidate | backbone lr | CV accuracy | lead over the probe | test accuracy | CV seconds |",
                "|---|---|---|---|---|---|",
                f"| probe (C={p['C']:.3g}) | – | {p['cv_accuracy']:.3f} | – | {p['test_accuracy']:.3f} | – |"]
        for r in s["partial"]:
            what = "head conv + classifier" if r["blocks"] == 0 else f"last {r['blocks']} block(s) + head conv + classifier"
            out.append(f"| {what} | {r['backbone_lr']:g} | {r['cv_accuracy']:.3f} | "
                       f"{100 * r['lead_over_probe']:+.1f} ± {100 * r['lead_stderr']:.1f} points | "
                       f"{r['test_accuracy']:.3f} | {r['cv_seconds']:.0f} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", type=Path, help="an ImageFolder photo set (repeatable)")
    ap.add_argument("--markdown", action="store_true", help="print the RESULTS.md section from the JSON")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(OUT.read_text())))
        return 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_results import provenance

    data = args.data or DEFAULT_DATA
    res = {"command": "python benchmarks/bench_partial_ft.py" + "".join(f" --data {d}" for d in args.data or []),
           **provenance(), "cores": os.cpu_count(), "sets": [one_set(d) for d in data]}
    OUT.write_text(json.dumps(res, indent=2) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
