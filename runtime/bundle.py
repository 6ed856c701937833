"""`edgexfer bundle RUN_DIR OUT`: what to copy to a board.

    OUT/
      model.int8.onnx      the chosen model (INT8 when it kept accuracy within the run's bound, else FP32)
      requirements.txt     numpy, onnxruntime, Pillow pinned to the versions this was tested with
      edgexfer/            the runtime package itself (pure Python), so nothing else needs installing
      example.py           an application embedding it (classify images, or watch a folder)
      README.md            how to install and run it
      bundle.json          what was bundled (model, why, requirements, arch): marks the folder as a bundle,
                           the only kind of folder `--force` replaces
      wheels/              with --arch arm64: aarch64 wheels (CPython 3.11, manylinux_2_28: Debian bookworm,
                           Raspberry Pi OS bookworm) of the requirements and their dependencies, so the
                           board installs with no network: pip install --no-index --find-links wheels -r requirements.txt

Standard library only; written to a temporary folder beside OUT, then renamed. Files get the umask's
mode (0644 under 022), whatever the mode of the run folder's files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from edgexfer.runtime.errors import RuntimeInputError

RUNTIME_REQUIREMENTS = ("numpy", "onnxruntime", "Pillow")
MANIFEST = "bundle.json"
MANIFEST_SCHEMA = "edgexfer.bundle/1"
# what a bundle written before bundle.json existed holds at its top level
_LEGACY_NAMES = {"README.md", "requirements.txt", "example.py", "edgexfer", "wheels"}


def choose_model(run_dir: Path) -> tuple[Path, str]:
    """The file to ship from a run folder, and why."""
    fp32, int8 = run_dir / "model.onnx", run_dir / "model.int8.onnx"
    rep_path = run_dir / "report.json"
    rep = json.loads(rep_path.read_text()) if rep_path.is_file() else {}
    impact = rep.get("quantization_impact", {})
    if int8.is_file() and impact.get("within_bound", True):
        why = ("INT8: accuracy within the run's bound "
               f"(drop {impact['accuracy_drop']:+.4f}, bound {impact['max_accuracy_drop']})" if impact
               else "INT8 (no evaluation in report.json)")
        return int8, why
    if fp32.is_file():
        return fp32, ("FP32: the INT8 file lost more accuracy than the run allows" if int8.is_file() else "FP32")
    raise FileNotFoundError(f"no model.onnx or model.int8.onnx in {run_dir}")


def pinned_requirements() -> list[str]:
    out = []
    for name in RUNTIME_REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(name)
    return out


def bundle(source: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, arch: str = "host") -> dict:
    """Write the bundle for a run folder (or a single ONNX file) to `out`; `arch="arm64"` adds the
    aarch64 wheels of the pinned requirements (downloaded with pip from the package index)."""
    source, out = Path(source), Path(out)
    if source.is_dir():
        model, why = choose_model(source)
    elif source.is_file():
        model, why = source, "the file given"
    else:
        raise FileNotFoundError(f"run folder or model not found: {source}")
    from edgexfer.runtime.model import EdgeModel

    EdgeModel(model)  # refuses a file without edgexfer metadata before anything is written
    if out.exists() or out.is_symlink():
        if not force:
            raise RuntimeInputError(f"{out} exists; pass --force to replace it")
        refusal = _why_not_replace(out, source)
        if refusal:
            raise RuntimeInputError(f"--force will not replace {out}: {refusal}; remove it yourself or choose another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    runtime_dir = Path(__file__).resolve().parent
    import edgexfer

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as td:
        tmp = Path(td) / "bundle"
        tmp.mkdir()
        # copyfile, not copy2: the copies get the umask's mode, not the source's (an artifact written 0600)
        shutil.copyfile(model, tmp / model.name)
        pkg = tmp / "edgexfer"
        shutil.copytree(runtime_dir, pkg / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        copy_function=shutil.copyfile)
        (pkg / "__init__.py").write_text(f'"""edgexfer runtime, bundled."""\n__version__ = "{edgexfer.__version__}"\n')
        shutil.copyfile(runtime_dir / "app.py", tmp / "example.py")
        reqs = pinned_requirements()
        (tmp / "requirements.txt").write_text("\n".join(reqs) + "\n")
        wheels = []
        if arch == "arm64":
            from edgexfer.runtime.emulate import download_wheels

            wheels = [p.name for p in download_wheels(tmp / "wheels", reqs)]
        elif arch != "host":
            raise RuntimeInputError(f"unknown --arch {arch!r}; choose host or arm64")
        (tmp / "README.md").write_text(_readme(model.name, why, reqs, arch))
        result = {"out": str(out), "model": model.name, "why": why, "requirements": reqs, "arch": arch, "wheels": wheels}
        (tmp / MANIFEST).write_text(json.dumps({"schema": MANIFEST_SCHEMA, "edgexfer": edgexfer.__version__,
                                                **{k: v for k, v in result.items() if k != "out"}}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    return result


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


def _readme(model: str, why: str, reqs: list[str], arch: str = "host") -> str:
    install = ("python3 -m venv .venv && .venv/bin/pip install --no-index --find-links wheels -r requirements.txt"
               if arch == "arm64" else "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt")
    board = ("\nFor arm64 boards with CPython 3.11 (Debian bookworm, Raspberry Pi OS bookworm): `wheels/` holds every "
             "package, so the install needs no network.\n" if arch == "arm64" else "")
    return f"""# edgexfer bundle: {model}

Chosen: {why}.
{board}
    {install}
    .venv/bin/python example.py {model} photo.jpg          # one JSON line per image
    .venv/bin/python example.py {model} --watch incoming/  # classify images as they arrive

In your own program (with this folder on `sys.path`, or `edgexfer` installed):

    from edgexfer.runtime import EdgeModel
    model = EdgeModel("{model}", threads=4)
    model.predict("photo.jpg", top_k=3)

Measure it on the board: `python -m edgexfer.runtime bench {model}` (with this folder as the working
directory). Requirements: {', '.join(reqs)} — nothing else; no PyTorch.
"""
