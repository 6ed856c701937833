"""`edgexfer bundle RUN OUT`: what to copy to a board.

    OUT/
      model.int8.onnx      the chosen model: INT8 when the run's accuracy guard passed it (validation-side
                           evidence, report.json quantize.guard), else FP32; the test split never chooses
      model.int8.e2e.onnx  the same model with its preprocessing in the graph (edgexfer.exporters.e2e):
                           decoded uint8 image in, probabilities out, for any ONNX Runtime binding; built
                           afresh by the writer the caller passes (`edgexfer bundle` passes the exporters'
                           where onnx is installed), else copied when current with the model
      labels.txt           the class names, one per line, in the model's output order
      requirements.txt     numpy, onnxruntime, Pillow pinned to the versions this was tested with
      edgexfer/            the runtime package itself (pure Python), so nothing else needs installing
      example.py           an application embedding it (classify images, or watch a folder)
      README.md            how to install and run it
      bundle.json          what was bundled (model, why, a warning where the test split disagrees with the
                           choice, requirements, arch): marks the folder as a bundle,
                           the only kind of folder `--force` replaces
      wheels/              the requirements and their dependencies as wheels, so the machine installs with no
                           network: pip install --no-index --find-links wheels -r requirements.txt. For the host
                           (the default): this interpreter's platform (pip download here); with --arch arm64:
                           aarch64 wheels (CPython 3.11, manylinux up to 2_36: Debian bookworm, Raspberry Pi OS
                           bookworm). --no-wheels leaves it out (the machine then installs from the package index).

Standard library only; written to a temporary folder beside OUT, then renamed. Files get the umask's
mode (0644 under 022), whatever the mode of the run folder's files.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable

from edgexfer.runtime.errors import RuntimeInputError
from edgexfer.runtime.fmt import count
from edgexfer.runtime.labels import lines

RUNTIME_REQUIREMENTS = ("numpy", "onnxruntime", "Pillow", "click")  # click: `python -m edgexfer.runtime ...`
MANIFEST = "bundle.json"
MANIFEST_SCHEMA = "edgexfer.bundle/1"
# what a bundle written before bundle.json existed holds at its top level
_LEGACY_NAMES = {"README.md", "requirements.txt", "example.py", "edgexfer", "wheels"}


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def guard_evidence(g: dict) -> str:
    """What the INT8 accuracy guard measured for the file it kept, in a few words (report.json quantize.guard)."""
    parts = []
    d = g.get("disagreement")
    if d:
        parts.append(f"disagrees with FP32's top-1 on {_pct(d['rate'])} of {count(d['images'], 'image')}, at most "
                     f"{_pct(d['upper95'])} with 95% confidence")
    elif "shipped_accuracy" in g:
        parts.append(f"guard accuracy {g['shipped_accuracy']:.4f} vs FP32 {g['fp32_accuracy']:.4f}"
                     + (f" on {g['measured_on']}" if g.get("measured_on", "this host") != "this host" else ""))
    v = g.get("validation")
    if v:
        parts.append(f"labelled drop {100 * v['drop']:+.1f} ± {100 * v['drop_se']:.1f} points on "
                     + count(v['images'], f"{v.get('held_out_as', 'validation')} image"))
    return "; ".join(parts) or "no figures recorded"


def guard_verdict(g: dict) -> tuple[bool, str]:
    """Whether an accuracy-guard record (report.json `quantize.guard`) lets its INT8 file ship, and why: a
    candidate within the bound and, where the record says how sure it is, its 95% upper bound proving the bound
    (`proven`). The guard writes this into its record once (edgexfer.guard.verdict: `shippable`, `verdict`);
    `int8_verdict` reads that, and derives it here only for records made before."""
    bound = g.get("max_accuracy_drop")
    skipped = (g.get("search_skipped") or {}).get("short")  # plain INT8 only: no file could have been proven
    if not g.get("within_bound"):
        stop = skipped or (g.get("stopped_early") or {}).get("why")
        return False, (f"the accuracy guard found no INT8 candidate within the {bound} bound ({guard_evidence(g)})"
                       + (f"; {stop}" if stop else ""))
    if g.get("proven") is False:  # not with the stated 95% confidence
        d = g.get("disagreement") or {}
        if isinstance(bound, (int, float)) and isinstance(d.get("rate"), (int, float)) and d["rate"] > bound + 1e-9:
            # the search's candidate met the bound on the images it chose on; the certificate reads over it
            return False, (f"INT8, unproven: the candidate met the {bound} bound on the images the search chose it on, "
                           f"but on the images held out to certify it, it {guard_evidence(g)}: over the bound"
                           + (f"; {skipped}" if skipped else ""))
        return False, (f"INT8, unproven: within the {bound} bound on the measured rate but not with 95% confidence "
                       f"({guard_evidence(g)}); " + (skipped or "more unseen images (--guard-data DIR) can prove it"))
    return True, f"the accuracy guard passed it within the {bound} bound ({guard_evidence(g)})"


def int8_verdict(rep: dict, *, on_this_host: bool = False) -> tuple[bool, str]:
    """Whether validation-side evidence lets the INT8 file ship, and why: the verdict the accuracy guard wrote
    into report.json `quantize.guard` (`shippable`, `verdict`), from label-free INT8/FP32 agreement on images the
    model was not fitted on and whether its 95% upper bound proves the bound; records made before the guard
    wrote it are read as `guard_verdict` (their decision, and `proven` where they have it). The test split is
    never read. `on_this_host`: also require that the guard measured on this host (an arm64 guard measured
    under emulation speaks for the device)."""
    g = (rep.get("quantize") or {}).get("guard")
    if not g or "within_bound" not in g:
        return False, ("the INT8 file has no accuracy-guard record in report.json (quantized without a "
                       "validation-side check), so nothing that may choose shows it keeps accuracy")
    ok, why = (bool(g["shippable"]), g["verdict"]) if "shippable" in g else guard_verdict(g)
    where = g.get("measured_on", "this host")
    if ok and on_this_host and where != "this host":
        return False, f"the accuracy guard passed INT8 on {where}, not on this host ({guard_evidence(g)})"
    return ok, why


def file_verdicts(rep: dict, *, arch: str | None = None) -> dict[str, dict]:
    """Every model file a run's record (report.json `rep`) speaks for, by name: whether the run offers it as
    shippable and why, and its top-1 agreement with the FP32 model on the images it was checked on (`agreement`,
    over `agreement_images`; None where the record has none). model.onnx is the FP32 model itself; model.int8.onnx
    ships on the accuracy guard's verdict (`int8_verdict`), which speaks for the machine it was measured on: a
    guard measured under arm64 emulation counts on an `arch` of aarch64/arm64 only (None: this machine's);
    FP16 and dynamic INT8 no guard checked; the converted files ship on the `formats` record's verdict
    (`edgexfer.pipeline.conversion_verdict`)."""
    import platform

    arch = (arch or platform.machine()).lower()
    out = {"model.onnx": {"shippable": True, "why": "the FP32 model, which every other file is checked against",
                          "agreement": 1.0, "agreement_images": None}}
    q = rep.get("quantize") or {}
    if q:
        g = q.get("guard") or {}
        where = g.get("measured_on", "this host")
        ok, why = int8_verdict(rep, on_this_host=not ("arm64" in where and arch in ("aarch64", "arm64")))
        d = g.get("disagreement") or {}
        out["model.int8.onnx"] = {"shippable": ok, "why": why,
                                  "agreement": 1 - d["rate"] if isinstance(d.get("rate"), (int, float)) else None,
                                  "agreement_images": d.get("images")}
    for key, name in (("quantize_fp16", "model.fp16.onnx"), ("quantize_dynamic", "model.int8-dynamic.onnx")):
        if rep.get(key):
            out[name] = {"shippable": False, "agreement": None, "agreement_images": None,
                         "why": "no accuracy guard checked it (scored on the test split only, which never chooses)"}
    for r in (rep.get("formats") or {}).get("files") or []:
        if isinstance(r, dict) and r.get("file"):
            check = r.get("check") or {}
            out[r["file"]] = {"shippable": bool(r.get("shippable")), "why": r.get("why") or "",
                              "agreement": check.get("top1_agreement_with_fp32"),
                              "agreement_images": check.get("images")}
    return out


def disagreement_on_test(rep: dict) -> str | None:
    """A warning when the test split (reported only) disagrees with the guard's verdict on INT8: INT8 over
    the bound on test while the guard passed it, or within it while the guard rejected it. It never changes
    the choice. None when they agree, or when the two cannot be compared (no evaluation; a guard measured
    on another device; a host that does not measure the target's INT8 faithfully)."""
    q = rep.get("quantize") or {}
    g, impact = q.get("guard"), rep.get("quantization_impact")
    if not g or "within_bound" not in g or not impact or "within_bound" not in impact:
        return None
    if g.get("measured_on", "this host") != "this host" or not (q.get("target") or {}).get("host_measures_faithfully", True):
        return None
    if bool(g["within_bound"]) == bool(impact["within_bound"]):
        return None
    n = (rep.get("models", {}).get("int8") or {}).get("n")
    on = f"the {count(n, 'test image')} (one image is {100 / n:.1f} points)" if n else "the test split"
    pts, bound = 100 * impact["accuracy_drop"], impact.get("max_accuracy_drop", g.get("max_accuracy_drop"))
    if g["within_bound"]:
        return (f"the test split disagrees with the accuracy guard: INT8 loses {pts:+.1f} points of accuracy on {on}, "
                f"over the {bound} bound, though the guard passed it ({guard_evidence(g)}). The choice stands: the "
                "test split only reports, it never picks what ships. If you distrust the guard, re-run with a lower "
                "--max-accuracy-drop or more labelled validation images, or ship FP32 yourself "
                "(edgexfer bundle RUN/model.onnx OUT)")
    return (f"the test split disagrees with the accuracy guard: INT8 changes accuracy by {-pts:+.1f} points on {on}, "
            f"within the {bound} bound, though the guard rejected it ({guard_evidence(g)}). FP32 stays the choice: "
            "the test split only reports, it never picks what ships")


# --runtime: the run folder's files of each runtime (FP32, INT8); backends.PACKAGES names the package that runs them
RUNTIME_FILES = {"onnxruntime": ("model.onnx", "model.int8.onnx"), "openvino": ("model.xml", "model.int8.xml"),
                 "executorch": ("model.pte", "model.int8.pte"), "litert": ("model.tflite", "model.int8.tflite")}



def choose_converted(run_dir: Path, runtime: str) -> tuple[Path, str, str | None]:
    """`choose_model` for a run folder's OpenVINO IR or ExecuTorch files (`edgexfer export RUN --format ...`):
    INT8 when the run's `formats` record offers it as shippable, else FP32 when that is shippable; the record says
    why (`pipeline.conversion_verdict`)."""
    fp32, int8 = (run_dir / n for n in RUNTIME_FILES[runtime])
    rep_path = run_dir / "report.json"
    rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    rows = {r.get("file"): r for r in ((rep.get("formats") or {}).get("files") or []) if isinstance(r, dict)}
    if not fp32.is_file() or fp32.name not in rows:
        fmt = runtime
        raise FileNotFoundError(f"no checked {fp32.name} in {run_dir}: run `edgexfer export {run_dir} --format {fmt}` "
                                "first")
    warning = disagreement_on_test(rep)
    r8 = rows.get(int8.name)
    if int8.is_file() and r8 and r8.get("shippable"):
        return int8, f"INT8: {r8.get('why')}", warning
    r32 = rows[fp32.name]
    if not r32.get("shippable"):
        raise RuntimeInputError(f"{fp32.name} is not offered as shippable ({r32.get('why')}); bundle the file itself "
                                "to ship it anyway")
    why = (f"FP32: {int8.name} is not shippable ({r8.get('why')})" if r8 else f"FP32: no {int8.name}") + \
        f"; {fp32.name} {r32.get('why')}"
    return fp32, why, warning


def choose_model(run_dir: Path) -> tuple[Path, str, str | None]:
    """The file to ship from a run folder, why, and a warning where the test split disagrees (or None).

    Validation-side evidence only: INT8 when the run's accuracy guard passed it (`int8_verdict`), else
    FP32. The test split is reported (`disagreement_on_test`), never read to choose. Latency is not weighed:
    the board is not the machine the run benchmarked on."""
    fp32, int8 = run_dir / "model.onnx", run_dir / "model.int8.onnx"
    rep_path = run_dir / "report.json"
    rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    warning = disagreement_on_test(rep)
    if int8.is_file():
        ok, why = int8_verdict(rep)
        if ok:
            return int8, f"INT8: {why}", warning
        if fp32.is_file():
            return fp32, (f"FP32: {why}; to ship INT8 anyway, bundle the file itself "
                          "(edgexfer bundle RUN/model.int8.onnx OUT)"), warning
        raise FileNotFoundError(f"no model.onnx in {run_dir}, and model.int8.onnx has no passing accuracy guard "
                                f"({why}); bundle {int8} itself to ship it anyway")
    if fp32.is_file():
        return fp32, "FP32: the run has no INT8 file", warning
    raise FileNotFoundError(f"no model.onnx or model.int8.onnx in {run_dir}")


def pinned_requirements(runtime: str = "onnxruntime") -> list[str]:
    from edgexfer.runtime.backends import PACKAGES

    out = []
    extra = PACKAGES.get(runtime)  # None: ONNX Runtime, already in the base runtime
    for name in (*RUNTIME_REQUIREMENTS, *((extra,) if extra else ())):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def download_host_wheels(dest: Path, reqs: list[str], python: str = sys.executable) -> list[Path]:
    """Wheels of `reqs` and their dependencies for this interpreter's platform (pip download, binary only: an
    install from them builds nothing and needs no network)."""
    import subprocess

    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
                        "-d", str(dest), *reqs], capture_output=True, text=True)
    if r.returncode:
        if "[Errno 28]" in r.stderr or "No space left on device" in r.stderr:  # atomic.writing names OUT
            import errno

            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        tail = ((r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise RuntimeInputError(f"pip download of this platform's wheels failed ({tail}); pass --no-wheels to bundle "
                                "without them (the machine then installs from the package index)")
    return sorted(dest.glob("*.whl"))


def platform_name() -> str:
    """This interpreter's platform in words: "CPython 3.12, linux x86_64"."""
    import platform

    return (f"{platform.python_implementation()} {sys.version_info.major}.{sys.version_info.minor}, "
            f"{sys.platform} {platform.machine()}")


def bundle(source: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, arch: str = "host",
           wheels: bool | None = None, log=lambda s: None, write_e2e: Callable[[Path, Path], object] | None = None,
           runtime: str | None = None) -> dict:
    """Write the bundle for a run folder (or a single ONNX file) to `out`; `wheels`: with the wheels of the pinned
    requirements (downloaded with pip from the package index) for this host's platform, or with `arch="arm64"`
    for aarch64 boards (default: only for arm64; `edgexfer bundle` carries them unless --no-wheels).
    `write_e2e(model, dest)`: builds the model's end-to-end file at dest (edgexfer.exporters.e2e.write, which
    needs onnx: `edgexfer bundle` passes it where onnx is installed), so that it carries the model's current
    metrics; None: the end-to-end file beside the model is copied when current with it."""
    wheels = arch == "arm64" if wheels is None else wheels
    source, out = Path(source), Path(out)
    if runtime is not None and runtime not in RUNTIME_FILES:
        raise RuntimeInputError(f"unknown --runtime {runtime!r}; choose {', '.join(RUNTIME_FILES)}")
    def refuse_executorch_wheels(runtime: str | None) -> None:  # the board's wheels: cp311 aarch64, as emulated
        if arch == "arm64" and wheels and runtime == "executorch":
            from edgexfer.runtime.emulate import NOT_ON_BOARD

            raise RuntimeInputError(f"--runtime executorch --arch arm64 cannot carry its runtime's wheels: "
                                    f"{NOT_ON_BOARD['executorch']} (--no-wheels bundles the file alone)")

    refuse_executorch_wheels(runtime)  # before anything is read
    warning = None
    if source.is_dir():
        model, why, warning = (choose_converted(source, runtime) if runtime not in (None, "onnxruntime")
                               else choose_model(source))
    elif source.is_file():
        model, why = source, "the file given"
    else:
        raise FileNotFoundError(f"run folder or model not found: {source}")
    from edgexfer.runtime import backends

    fmt = backends.format_of(model)
    if runtime is None:
        runtime = fmt or "onnxruntime"
        refuse_executorch_wheels(runtime)  # a .pte file named: its runtime is ExecuTorch
    elif (fmt or "onnxruntime") != runtime:
        raise RuntimeInputError(f"{model.name} is not a file for --runtime {runtime}; --runtime {fmt or 'onnxruntime'} bundles it")
    from edgexfer.runtime.model import EdgeModel

    EdgeModel(model)  # refuses a file without edgexfer metadata before anything is written
    if out.exists() or out.is_symlink():
        if not force:
            raise RuntimeInputError(f"{out} exists; pass --force to replace it")
        refusal = _why_not_replace(out, source)
        if refusal:
            raise RuntimeInputError(f"--force will not replace {out}: {refusal}; remove it yourself or choose another OUT")
    for above in (out.parent, *out.parent.parents):  # OUT under a file: say so, before anything is written
        if above.exists():
            if not above.is_dir():
                raise RuntimeInputError(f"cannot write {out}: {above} is a file, not a folder")
            break
    runtime_dir = Path(__file__).resolve().parent
    needed = 2 * model.stat().st_size + sum(p.stat().st_size for p in runtime_dir.rglob("*.py"))  # model, e2e, runtime
    from edgexfer.runtime import atomic

    with atomic.writing(out, needed):
        out.parent.mkdir(parents=True, exist_ok=True)
        return _write(model, out, why, warning, arch, runtime_dir, wheels, log, write_e2e, runtime)


def _write(model: Path, out: Path, why: str, warning: str | None, arch: str, runtime_dir: Path, with_wheels: bool,
           log, write_e2e, runtime: str = "onnxruntime") -> dict:
    """The bundle, written into a temporary folder beside `out`, then renamed to it."""
    import edgexfer
    from edgexfer.runtime.model import EdgeModel

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as td:
        tmp = Path(td) / "bundle"
        tmp.mkdir()
        # copyfile, not copy2: the copies get the umask's mode, not the source's (an artifact written 0600)
        shutil.copyfile(model, tmp / model.name)
        if model.suffix == ".xml":  # OpenVINO IR: its weights beside it
            shutil.copyfile(model.with_suffix(".bin"), tmp / model.with_suffix(".bin").name)
        e2e_name, e2e_why = (_e2e_file(model, tmp, write_e2e) if runtime == "onnxruntime"
                             else (None, f"the end-to-end file is ONNX Runtime's (--runtime {runtime})"))
        (tmp / "labels.txt").write_text(lines(EdgeModel(model).labels, f"{model}"), encoding="utf-8")
        pkg = tmp / "edgexfer"
        shutil.copytree(runtime_dir, pkg / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        copy_function=shutil.copyfile)
        (pkg / "__init__.py").write_text(f'"""edgexfer runtime, bundled."""\n__version__ = "{edgexfer.__version__}"\n')
        shutil.copyfile(runtime_dir / "app.py", tmp / "example.py")
        reqs = pinned_requirements(runtime)
        (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
        wheels = []
        if arch not in ("host", "arm64"):
            raise RuntimeInputError(f"unknown --arch {arch!r}; choose host or arm64")
        if with_wheels:
            log(f"downloading the {'aarch64' if arch == 'arm64' else platform_name()} wheels of "
                f"{', '.join(reqs)} (pip download)")
        if with_wheels and arch == "arm64":
            from edgexfer.runtime.emulate import download_wheels

            wheels = [p.name for p in download_wheels(tmp / "wheels", reqs)]
        elif with_wheels:
            wheels = [p.name for p in download_host_wheels(tmp / "wheels", reqs)]
        (tmp / "README.md").write_text(_readme(model.name, why, reqs, arch, warning, bool(wheels))
                                       + _e2e_readme(e2e_name, e2e_why))
        result = {"out": str(out), "model": model.name, "why": why, **({"warning": warning} if warning else {}),
                  "e2e": e2e_name, **({"e2e_why_not": e2e_why} if e2e_why else {}),
                  "requirements": reqs, "arch": arch, "wheels": wheels, "runtime": runtime}
        (tmp / MANIFEST).write_text(json.dumps({"schema": MANIFEST_SCHEMA, "edgexfer": edgexfer.__version__,
                                                **{k: v for k, v in result.items() if k != "out"}}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return result


def _e2e_file(model: Path, folder: Path, write) -> tuple[str | None, str | None]:
    """The end-to-end file of `model` into `folder`: built from it by `write` when given (so it carries the
    model's current metrics), else copied from beside it when current. (name, None), or (None, why not)."""
    from edgexfer.runtime.e2e import e2e_path

    dest = folder / e2e_path(model).name
    if write is None:  # the runtime install: no onnx, no writer
        from edgexfer.runtime.model import EdgeModel

        m = EdgeModel(model)
        if m._e2e() is None:
            return None, m.e2e_why
        shutil.copyfile(e2e_path(model), dest)
        return dest.name, None
    try:
        write(model, dest)
    except ValueError as e:  # ExportError, MetadataError: a preprocessing the graph cannot express
        return None, str(e)
    return dest.name, None


def _why_not_replace(out: Path, source: Path) -> str | None:
    """Why `--force` must not remove the existing `out` (None: it is a bundle, safe to replace). It removes
    only a folder this command wrote: never the working directory or a folder above it, never the source
    or a folder holding it, never a symlink or a file, never a folder without a bundle's marker."""
    if out.is_symlink():
        return "it is a symbolic link"
    if not out.is_dir():
        return "it is not a folder"
    o, src, cwd = out.resolve(), source.resolve(), Path.cwd().resolve()
    if o == cwd or o in cwd.parents:
        return "it is the working directory or holds it"
    if o == src or o in src.parents:
        return "it is the source or holds it"
    if not is_bundle(o):
        return f"it is not an edgexfer bundle (no {MANIFEST})"
    return None


def is_bundle(folder: Path) -> bool:
    """A folder `bundle` wrote: its bundle.json, or (bundles written before bundle.json) nothing at its
    top level but what a bundle holds, with the bundle's README."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            return json.loads(manifest.read_text()).get("schema") == MANIFEST_SCHEMA
        except (ValueError, AttributeError, OSError):
            return False
    try:
        names = {p.name for p in folder.iterdir()}
        readme = (folder / "README.md").read_text(errors="replace")
    except OSError:
        return False
    models = {n for n in names if n.endswith(".onnx")}
    return (len(models) == 1 and names - models <= _LEGACY_NAMES and {"edgexfer", "example.py"} <= names
            and readme.startswith("# edgexfer bundle: "))


def _e2e_readme(name: str | None, why_not: str | None) -> str:
    """How to call the end-to-end file from each ONNX Runtime binding."""
    if name is None:
        return f"\nNo end-to-end file ({why_not}): applications in other languages preprocess as the metadata says.\n"
    return f"""
## From any language: `{name}`

`{name}` is the same model with its preprocessing (resize, centre crop, colour, normalisation) inside the
graph, in standard ONNX operators (opset 18): give it the decoded pixels, get probabilities. Any ONNX
Runtime binding runs it as it is.

- input `image`: **uint8**, shape **[H, W, 3]**, RGB, row by row (HWC) as image decoders give it; any H and W.
  Also accepted: [H, W, 1] grey, [H, W, 4] RGBA (alpha ignored), and [N, H, W, C] for N images of one size.
- output `probabilities`: float32 [1, classes] (or [N, classes]), softmax, in the order of `labels.txt`.
- output `top_k_indices`: int64 [1, k], best first; `top_k_scores`: float32 [1, k], their probabilities.
- labels: `labels.txt`, one per line; also in the file, metadata entry `labels` (one per line), and the whole
  edgexfer metadata (JSON) under `edgexfer.meta`.

Python (tested): `EdgeModel("{name[:-len('.e2e.onnx')]}.onnx").predict("photo.jpg")` uses it when it is beside the model, or:

    import numpy as np, onnxruntime as ort
    from PIL import Image
    s = ort.InferenceSession("{name}")
    probs, top, scores = s.run(None, {{"image": np.asarray(Image.open("photo.jpg").convert("RGB"))}})

JavaScript, Node.js (tested: examples/node in the edgexfer repository) or the browser (onnxruntime-web;
examples/web):

    const ort = require("onnxruntime-node");              // or: import * as ort from "onnxruntime-web"
    const s = await ort.InferenceSession.create("{name}");
    const out = await s.run({{ image: new ort.Tensor("uint8", rgb, [h, w, 3]) }});   // rgb: Uint8Array
    const top = out.top_k_indices.data;                    // BigInt64Array, best first

The pixels decide the answer: a JPEG decoded by libjpeg-turbo without colour-profile conversion (Pillow,
sharp in Node.js as examples/node uses it, Chromium) gives the Python path's pixels to the bit; other
decoders can differ by a few levels.

C/C++ (onnxruntime_cxx_api.h):

    Ort::Env env; Ort::Session s(env, "{name}", Ort::SessionOptions{{}});
    int64_t shape[] = {{h, w, 3}};
    auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    auto in = Ort::Value::CreateTensor<uint8_t>(mem, rgb, h * w * 3, shape, 3);
    const char* ins[] = {{"image"}}; const char* outs[] = {{"probabilities", "top_k_indices"}};
    auto out = s.Run(Ort::RunOptions{{nullptr}}, ins, &in, 1, outs, 2);
    const int64_t* top = out[1].GetTensorData<int64_t>();

C# (Microsoft.ML.OnnxRuntime):

    using var s = new InferenceSession("{name}");
    var t = new DenseTensor<byte>(rgb, new[] {{ h, w, 3 }});
    using var r = s.Run(new[] {{ NamedOnnxValue.CreateFromTensor("image", t) }});
    var top = r.First(v => v.Name == "top_k_indices").AsTensor<long>();

Java/Kotlin (ai.onnxruntime; Android: onnxruntime-android):

    val env = OrtEnvironment.getEnvironment()
    val s = env.createSession("{name}")
    val t = OnnxTensor.createTensor(env, ByteBuffer.wrap(rgb), longArrayOf(h, w, 3), OnnxJavaType.UINT8)
    val top = (s.run(mapOf("image" to t)).get("top_k_indices").get().value as Array<LongArray>)[0]

Swift (onnxruntime-objc / onnxruntime-swift-package-manager):

    let s = try ORTSession(env: ORTEnv(loggingLevel: .warning), modelPath: path, sessionOptions: nil)
    let t = try ORTValue(tensorData: NSMutableData(data: rgb), elementType: .uInt8, shape: [h, w, 3])
    let out = try s.run(withInputs: ["image": t], outputNames: ["probabilities", "top_k_indices"], runOptions: nil)

Only the Python and Node.js calls are run by edgexfer's tests; the others follow each binding's documented API.
"""


def _readme(model: str, why: str, reqs: list[str], arch: str = "host", warning: str | None = None,
            wheels: bool = False) -> str:
    install = ("python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheels -r requirements.txt"
               if wheels else "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt")
    warn = f"\n**Warning:** {warning}.\n" if warning else ""
    if not wheels:
        board = "\nThe install downloads the requirements from the package index (bundled with --no-wheels).\n"
    elif arch == "arm64":
        board = ("\nFor arm64 boards with CPython 3.11 (Debian bookworm, Raspberry Pi OS bookworm): `wheels/` holds every "
                 "package, so the install needs no network.\n")
    else:
        board = (f"\nFor machines like the one that wrote it ({platform_name()}): `wheels/` holds every package, so the "
                 "install needs no network. For another platform, bundle again there, or with --arch arm64 for "
                 "aarch64 boards.\n")
    return f"""# edgexfer bundle: {model}

Chosen: {why}.
{warn}{board}
    {install}
    .venv/bin/python example.py {model} photo.jpg          # one JSON line per image
    .venv/bin/python example.py {model} --watch incoming/  # classify images as they arrive

In your own program (with this folder on `sys.path`, or `edgexfer` installed):

    from edgexfer.runtime import EdgeModel
    model = EdgeModel("{model}", threads=4)
    model.predict("photo.jpg", top_k=3)

Measure it on the board: `python -m edgexfer.runtime bench {model}` (with this folder as the working
directory). Requirements: {', '.join(reqs)} — nothing else{"" if any(r.startswith("executorch") for r in reqs)
                                                             else "; no PyTorch"}.
"""
