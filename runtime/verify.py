"""`edgexfer verify --arch arm64 RUN|MODEL`: does the model predict the same on an arm64 board?

Runs the runtime install (aarch64 wheels, the Docker image's pins) under qemu user-mode emulation
(`edgexfer.runtime.emulate`) on a sample of held-out images and compares it with this host:

    top-1 agreement      share of images whose arm64 top-1 equals this host's
    max abs difference   of the raw outputs (logits), over the sample
    accuracy             measured by the arm64 build (and by this host, beside it) when labels are known

Both sides preprocess the same image files with the runtime's own code. The wall time of the check is
reported as what it is; emulated timing is never reported as latency (emulation is orders of magnitude slower).

    edgexfer verify --arch arm64 runs/demo --samples 200      # -> runs/demo/verify_arm64.json
    edgexfer verify --arch arm64 model.int8.onnx --images photos/   # ImageFolder (labelled) or plain folder
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgexfer.runtime.errors import RuntimeInputError
from edgexfer.runtime.fmt import count

SCHEMA = "edgexfer.verify/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
NOTE = "emulated (qemu user mode): timing is not latency and is not reported as such; measure latency on the board"


def sample(n_total: int, n: int | None, seed: int = 0) -> np.ndarray:
    """`n` indices of `n_total`, drawn without replacement with `seed`, in order (all when n is None)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def scan_images(folder: Path, labels: Sequence[str]) -> tuple[list[Path], np.ndarray | None, str]:
    """Images of a folder: an ImageFolder tree (sub-folders named after the model's labels -> labelled)
    or a plain folder of images (unlabelled: agreement only)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:
        unknown = [d.name for d in subdirs if d.name not in labels]
        if unknown:
            raise RuntimeInputError(f"{folder}: class folders {unknown[:3]} are not labels of the model")
        paths, ys = [], []
        for d in subdirs:
            for p in sorted(d.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                    paths.append(p)
                    ys.append(list(labels).index(d.name))
        kind = f"ImageFolder {folder}"
        y = np.asarray(ys, np.int64)
    else:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        kind, y = f"images in {folder} (no labels: agreement only)", None
    if not paths:
        raise RuntimeInputError(f"no images in {folder}")
    return paths, y, kind


def verify_inputs(target: Path, images: Path | None, held_out: Callable | None = None, formats: Sequence[str] = ("onnx",)
                  ) -> tuple[list[Path], list, np.ndarray | None, str, Path | None]:
    """What `edgexfer verify TARGET` checks: (models, images, labels or None, where the images come from, where the
    result goes unless told: RUN/verify_arm64.json, None for a MODEL file). A run folder's models are its
    model*.onnx files (model.onnx first), and with `formats` ("all", or some of "openvino", "executorch",
    "litert") its converted files of those formats; a MODEL file (of any format) needs `images`. `images`: an
    ImageFolder tree (labelled) or a folder of images; without it, a run folder's test split as
    `held_out(run_dir)` reads it (images, labels, classes, source; the training package lends it, the runtime
    alone has none)."""
    from edgexfer.runtime.bench import FORMAT_SUFFIXES, model_files
    from edgexfer.runtime.model import EdgeModel

    if target.is_dir():
        wanted = list(FORMAT_SUFFIXES) if "all" in formats else list(dict.fromkeys(["onnx", *formats]))
        try:  # in `wanted`'s order, FP32 first within each format
            models = [p for p in model_files([target], wanted)[0] if p.name.startswith("model")]
        except FileNotFoundError:
            models = []
        if not any(p.suffix == ".onnx" for p in models):
            raise FileNotFoundError(f"no model*.onnx in {target}")
        missing = [f for f in formats if f not in ("onnx", "all") and not any(p.suffix == FORMAT_SUFFIXES[f] for p in models)]
        if missing:
            raise FileNotFoundError(f"no {', '.join(missing)} file in {target}: run `edgexfer export {target} --format "
                                    f"{','.join(missing)}` first")
        if images:
            found, labels, source = scan_images(images, EdgeModel(models[0]).labels)
        elif held_out is None:
            raise RuntimeInputError("reading a run folder's test split needs the edgexfer package's data module; "
                                    "pass --images FOLDER")
        else:
            found, labels, classes, source = held_out(target)
            names = list(EdgeModel(models[0]).labels)
            if classes != names:  # map the data set's class order onto the model's
                labels = np.asarray([names.index(classes[k]) for k in labels])
        return models, found, None if labels is None else np.asarray(labels), source, target / "verify_arm64.json"
    if target.is_file():
        if not images:
            raise RuntimeInputError("verifying a bare ONNX file needs --images FOLDER (ImageFolder or plain images)")
        found, labels, source = scan_images(images, EdgeModel(target).labels)
        return [target], found, labels, source, None
    raise FileNotFoundError(f"run folder or model not found: {target}")


def _as_files(images: Sequence, folder: Path) -> list[Path]:
    """Paths stay; uint8 arrays (Fashion-MNIST) become lossless PNG files, so both sides read the same bytes."""
    from PIL import Image

    out = []
    for i, im in enumerate(images):
        if isinstance(im, (str, Path)):
            out.append(Path(im))
        else:
            p = folder / f"{i:05d}.png"
            Image.fromarray(np.asarray(im, np.uint8)).save(p)
            out.append(p)
    return out


def verify_arm64(models: Sequence[Path], images: Sequence, labels: np.ndarray | None, *, source: str,
                 threads: int = 1, min_agreement: float = 0.995, leave_out_unverifiable: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> dict:
    """Run `models` on `images` here and under emulated arm64; the comparison as a result document. A model whose
    runtime cannot run on the emulated board (`emulate.NOT_ON_BOARD`) is refused in one line, or, with
    `leave_out_unverifiable` (`--formats all`), left out and listed with why (`not_verified`)."""
    from edgexfer.runtime import emulate
    from edgexfer.runtime.model import EdgeModel

    t0 = time.perf_counter()
    from edgexfer.runtime.backends import format_of, runtime_version

    models = [Path(m) for m in models]
    not_verified = {m.name: emulate.NOT_ON_BOARD[format_of(m)] for m in models
                    if leave_out_unverifiable and format_of(m) in emulate.NOT_ON_BOARD}
    models = [m for m in models if m.name not in not_verified]
    host = [EdgeModel(m, threads=threads) for m in models]
    extras = emulate.setup_extras(sorted({format_of(m) for m in models} - {None}), log=log)
    if labels is not None and len(labels) != len(images):
        raise RuntimeInputError("labels and images differ in number")
    with tempfile.TemporaryDirectory(prefix="edgexfer-verify-") as td:
        files = _as_files(images, Path(td))
        x = host[0].preprocess(files)  # (N, C, H, W)
        ref = [m.run(x) for m in host]
        log(f"running {count(len(models), 'model')} on {count(len(files), 'image')} under emulated arm64")
        arm = emulate.run_models(models, images=files, threads=threads)
    rows = {}
    for m, hm, h, a in zip(models, host, ref, arm["outputs"]):
        task = hm.meta.tasks[0].name
        ph, pa = h[task].argmax(1), a[task].argmax(1)
        row = {"file": m.name, "n": int(len(ph)), "top1_agreement": float(np.mean(ph == pa)),
               "max_abs_diff": float(max(np.max(np.abs(h[t].astype(np.float64) - a[t])) for t in h)),
               "disagreements": [int(i) for i in np.flatnonzero(ph != pa)]}
        if labels is not None:
            row["accuracy_arm64"] = float(np.mean(pa == labels))
            row["accuracy_host"] = float(np.mean(ph == labels))
        row["passed"] = row["top1_agreement"] >= min_agreement
        rows[m.name] = row
    info = arm["info"]
    return {
        "schema": SCHEMA, "arch": "arm64", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sample": {"n": len(x), "source": source, "labelled": labels is not None},
        "min_agreement": min_agreement, "passed": all(r["passed"] for r in rows.values()),
        "input_max_abs_diff": float(np.max(np.abs(x - arm["inputs"]))),  # the runtime's preprocessing, both sides
        "models": rows, **({"not_verified": not_verified} if not_verified else {}),
        "arm64": {**{k: info.get(k) for k in ("arch", "python", "onnxruntime", "numpy", "pillow")},
                  **({"runtimes": info["runtimes"]} if extras and info.get("runtimes") else {})},
        "host": {"arch": __import__("platform").machine(), **_host_versions(),
                 **({"runtimes": {m.name: runtime_version(m) for m in models if format_of(m)}} if extras else {})},
        "emulation": {"rootfs": str(emulate.rootfs()), "debian": emulate.SUITE, "qemu": "user mode (binfmt_misc)"},
        "check_seconds": round(time.perf_counter() - t0, 1), "emulated_process_seconds": round(arm["seconds"], 1),
        "note": NOTE,
    }


def _host_versions() -> dict:
    import onnxruntime
    import PIL

    return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def to_markdown(res: dict) -> str:
    s = res["sample"]
    lines = [f"arm64 (emulated) vs {res['host']['arch']} host — {count(s['n'], 'image')} from {s['source']}; "
             f"check took {res['check_seconds']:.0f} s (not latency)", "",
             "| model | n | top-1 agreement | max abs diff | accuracy arm64 | accuracy host | ok |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in res["models"].values():
        acc = lambda k: f"{r[k]:.4f}" if k in r else "—"  # noqa: E731
        lines.append(f"| {r['file']} | {r['n']} | {r['top1_agreement']:.4f} | {r['max_abs_diff']:.3g} | "
                     f"{acc('accuracy_arm64')} | {acc('accuracy_host')} | {'yes' if r['passed'] else 'NO'} |")
    a = res["arm64"]
    others = sorted({v for k, v in (a.get("runtimes") or {}).items() if not v.startswith("onnxruntime")})
    lines += ["", f"arm64: Python {a.get('python')}, onnxruntime {a.get('onnxruntime')}"
                  + "".join(f", {v}" for v in others) + f", numpy {a.get('numpy')}, "
                  f"Pillow {a.get('pillow')}; preprocessing max abs diff {res['input_max_abs_diff']:.3g}; "
                  f"bound: agreement >= {res['min_agreement']}"]
    lines += [f"Not verified: {name}: {why}." for name, why in (res.get("not_verified") or {}).items()]
    return "\n".join(lines)
