"""The runtime on arm64, on an x86 host: a Debian bookworm arm64 root filesystem run under qemu
user-mode emulation, with the aarch64 wheels of the runtime installed the way a board installs them.

    python -m edgexfer.runtime.emulate setup     # build (or check) the cached root filesystem; needs root
    python -m edgexfer.runtime.emulate status    # what is there, what is missing

The root filesystem lives in ~/.cache/edgexfer/arm64/ (EDGEXFER_ARM64_CACHE moves it):

    rootfs/                 debootstrap --arch=arm64 --variant=minbase bookworm (a few hundred MB, minutes, once)
    rootfs/opt/edgexfer/venv  python3 -m venv + pip install --no-index of the wheels below
    wheels/                 `pip download --only-binary=:all: --platform manylinux_2_{36..17}_aarch64
                            --python-version 311` of requirements-runtime.txt (the Docker image's pins)

Models run in a plain chroot with neither /proc nor /sys mounted: onnxruntime segfaulted at import
when the emulated process saw both. Each job copies this very runtime package (the code being
tested, not an installed copy) into the root filesystem, runs it, and removes it.

Emulated timing means nothing (far slower than the host): nothing here reports latency.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from edgexfer.runtime.errors import RuntimeInputError

SUITE = "bookworm"               # its python3 is 3.11
PYTHON_VERSION = "311"
# bookworm has glibc 2.36: every manylinux tag up to it (OpenVINO's aarch64 wheels are manylinux_2_35)
WHEEL_PLATFORMS = (*(f"manylinux_2_{v}_aarch64" for v in range(36, 16, -1)), "manylinux2014_aarch64")
VENV = "/opt/edgexfer/venv"
BINFMT = "/proc/sys/fs/binfmt_misc"
QEMU_CONF = "/usr/lib/binfmt.d/qemu-aarch64.conf"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RUNTIME_DIR = Path(__file__).resolve().parent


class EmulationUnavailable(RuntimeInputError):
    """This host cannot run arm64 code (not root, qemu or debootstrap missing, root fs not set up)."""


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEXFER_ARM64_CACHE") or Path.home() / ".cache" / "edgexfer" / "arm64")


def rootfs() -> Path:
    return cache_dir() / "rootfs"


def requirements_file() -> Path | None:
    """requirements-runtime.txt of the source tree (the Docker image installs the same file)."""
    p = RUNTIME_DIR.parent / "requirements-runtime.txt"
    return p if p.is_file() else None


def requirements() -> list[str]:
    """The pins the emulated board installs: requirements-runtime.txt, else this host's versions."""
    p = requirements_file()
    if p is not None:
        return [ln.split("#")[0].strip() for ln in p.read_text().splitlines() if ln.split("#")[0].strip()]
    from edgexfer.runtime.bundle import pinned_requirements

    return pinned_requirements()


def _stamp() -> Path:
    key = hashlib.sha256("\n".join(requirements()).encode()).hexdigest()[:12]
    return rootfs() / "opt" / "edgexfer" / f".installed-{key}"


# -- what is missing -----------------------------------------------------------------------------------

def native() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def missing() -> str | None:
    """Why arm64 code cannot run here (one line), or None when it can (set-up may still be needed)."""
    if sys.platform != "linux":
        return "arm64 emulation needs Linux (chroot + qemu-user binfmt_misc)"
    if os.geteuid() != 0:
        return "arm64 emulation needs root (chroot and binfmt_misc registration); run it as root or with sudo"
    if not Path(_chroot_bin()).exists():
        return "chroot not found (coreutils)"
    if not native() and not Path("/usr/bin/qemu-aarch64-static").exists() and not shutil.which("qemu-aarch64-static"):
        return "qemu-aarch64-static not found: apt-get install qemu-user-static debootstrap"
    if not (rootfs() / "usr" / "bin" / "python3").exists() and not shutil.which("debootstrap"):
        return "debootstrap not found: apt-get install qemu-user-static debootstrap"
    return None


def ready() -> bool:
    """The root filesystem is built with the current pins, and arm64 binaries can run now."""
    return missing() is None and _stamp().is_file() and (native() or _binfmt_enabled())


def _binfmt_enabled() -> bool:
    entry = Path(BINFMT) / "qemu-aarch64"
    try:
        return entry.read_text().startswith("enabled")
    except OSError:
        return False


def ensure_binfmt() -> None:
    """Mount binfmt_misc and register qemu-aarch64 (with the F flag: the interpreter is opened now, so a
    chroot needs no copy of qemu inside)."""
    if native() or _binfmt_enabled():
        return
    if not Path(BINFMT, "register").exists():
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], capture_output=True, text=True)
        if r.returncode:
            raise EmulationUnavailable(f"cannot mount binfmt_misc at {BINFMT}: {r.stderr.strip()}")
    conf = Path(QEMU_CONF)
    if not conf.is_file():
        raise EmulationUnavailable(f"{QEMU_CONF} not found: apt-get install qemu-user-static")
    try:
        Path(BINFMT, "register").write_text(conf.read_text().strip() + "\n")
    except OSError as e:
        if not _binfmt_enabled():
            raise EmulationUnavailable(f"cannot register qemu-aarch64 with binfmt_misc: {e}") from None
    if not _binfmt_enabled():
        raise EmulationUnavailable("qemu-aarch64 is registered with binfmt_misc but not enabled")


# -- set-up --------------------------------------------------------------------------------------------

def debian_mirror() -> str:
    """The mirror apt uses on this host (deb822 or one-line sources), unless EDGEXFER_DEBIAN_MIRROR says."""
    if os.environ.get("EDGEXFER_DEBIAN_MIRROR"):
        return os.environ["EDGEXFER_DEBIAN_MIRROR"]
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]:
        try:
            for line in src.read_text().splitlines():
                line = line.strip()
                if line.startswith("URIs:") and "security" not in line:
                    return line.split()[1]
                if line.startswith("deb ") and "security" not in line:
                    return next(w for w in line.split()[1:] if "://" in w)
        except (OSError, StopIteration, IndexError):
            continue
    return DEFAULT_MIRROR


def _run(cmd: Sequence[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
        raise EmulationUnavailable(f"{what} failed: {tail[0]}")
    return r


def download_wheels(dest: Path, reqs: Sequence[str], python: str = sys.executable) -> list[Path]:
    """aarch64 wheels of `reqs` and their dependencies, resolved for bookworm's Python 3.11."""
    dest.mkdir(parents=True, exist_ok=True)
    plats = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    _run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:", *plats,
          "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest), *reqs],
         "pip download of the aarch64 wheels")
    return sorted(dest.glob("*.whl"))


def _chroot_bin() -> str:
    return shutil.which("chroot") or next((p for p in ("/usr/sbin/chroot", "/sbin/chroot") if Path(p).exists()), "chroot")


def chroot(args: Sequence[str], *, env: dict | None = None, timeout: float | None = None,
           root: Path | None = None) -> subprocess.CompletedProcess:
    """Run an arm64 command in the root filesystem: plain chroot, no /proc, no /sys."""
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([_chroot_bin(), str(root or rootfs()), *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def setup(log: Callable[[str], None] = lambda s: None) -> Path:
    """Build what is missing: binfmt registration, the root filesystem, the wheels, the venv. Idempotent."""
    why = missing()
    if why:
        raise EmulationUnavailable(why)
    ensure_binfmt()
    root = rootfs()
    if not (root / "usr" / "bin" / "python3").exists():
        tmp = cache_dir() / "rootfs.partial"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        mirror = debian_mirror()
        log(f"debootstrap arm64 {SUITE} from {mirror} into {root} (about 4.5 min, once)")
        t0 = time.perf_counter()
        _run(["debootstrap", "--arch=arm64", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
              SUITE, str(tmp), mirror], "debootstrap")
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
        log(f"root filesystem ready in {time.perf_counter() - t0:.0f} s")
    stamp = _stamp()
    if not stamp.is_file():
        reqs = requirements()
        wheels = cache_dir() / "wheels" / stamp.name.split("-", 1)[1]
        log(f"aarch64 wheels for {', '.join(reqs)}")
        download_wheels(wheels, reqs)
        inside = root / "opt" / "edgexfer" / "wheels"
        if inside.exists():
            shutil.rmtree(inside)
        shutil.copytree(wheels, inside)
        (root / "opt" / "edgexfer" / "requirements.txt").write_text("\n".join(reqs) + "\n")
        log("installing them offline into the emulated venv (pip under emulation: a minute or two)")
        for old in [*stamp.parent.glob(".installed-*"), *stamp.parent.glob(".extra-*")]:  # a venv holds one set of pins
            old.unlink()
        if (root / VENV.lstrip("/")).exists():
            shutil.rmtree(root / VENV.lstrip("/"))
        for cmd, what in (
            (["python3", "-m", "venv", VENV], "python3 -m venv in the arm64 root filesystem"),
            ([f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--find-links",
              "/opt/edgexfer/wheels", "-r", "/opt/edgexfer/requirements.txt"], "pip install in the arm64 root filesystem"),
        ):
            r = chroot(cmd, timeout=1800)
            if r.returncode:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
                raise EmulationUnavailable(f"{what} failed: {tail[0]}")
        stamp.write_text(json.dumps({"requirements": reqs, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return root


# -- the other runtimes: installed into the emulated venv when a file of theirs is verified --------------------

# why a runtime's Python package cannot run on the emulated board (measured: `resolve_wheels` for executorch 1.5.1;
# `edgexfer verify --formats openvino` with openvino 2026.4.1)
NOT_ON_BOARD = {"executorch": (
    "ExecuTorch's Python runtime imports torch, and PyPI's aarch64 torch wheel is a CUDA build: without the several "
    "GB of NVIDIA libraries it depends on, `import torch` fails (libcublasLt not found), and one of ExecuTorch's "
    "dependencies is an sdist only (antlr4-python3-runtime); the torch-free "
    "executorch-numpy-runtime needs Python >= 3.12, and the emulated board is Debian bookworm's 3.11. Check the .pte "
    "file on the board with ExecuTorch's own C++ runtime, or verify the LiteRT or ONNX file here"),
    "openvino": (
    "OpenVINO's aarch64 wheel installs, but its CPU plugin generates its kernels' machine code at run time, which "
    "qemu user mode emulates instruction by instruction: 24 images of a 96 px EfficientNet-Lite0 did not finish in 15 "
    "minutes, where ONNX Runtime and LiteRT took 28 s. Check the IR on the board, or verify the ONNX file here (the IR "
    "is converted from it)")}
# the arm64 board's Python (bookworm's 3.11) as environment markers see it
TARGET_MARKERS = {"implementation_name": "cpython", "implementation_version": "3.11.2", "os_name": "posix",
                  "platform_machine": "aarch64", "platform_python_implementation": "CPython", "platform_release": "",
                  "platform_system": "Linux", "platform_version": "", "python_full_version": "3.11.2",
                  "python_version": "3.11", "sys_platform": "linux", "extra": ""}


def resolve_wheels(dest: Path, reqs: Sequence[str], pins: Sequence[str] = (), python: str = sys.executable) -> list[Path]:
    """The aarch64 wheels of `reqs` and of everything they need on the board, in `dest`.

    `pip download --platform` evaluates the packages' environment markers for this x86 host, not the board: it
    asks for x86-only dependencies (torch's CUDA libraries, executorch's coremltools) that have no aarch64
    wheel. So this walks the requirements itself, level by level, keeping those whose markers hold on the board
    (TARGET_MARKERS), each at the version `pins` name (the runtime's own), else at the version installed here
    (a set that pip resolved and that this host runs), else the newest; each level is one `pip download
    --no-deps`. The board's pip then installs them with its own resolver (--no-index), which checks the set."""
    import email.parser
    import zipfile
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip's own copy
        from pip._vendor.packaging.requirements import Requirement

    fixed = {canonical(Requirement(p).name): p for p in pins}
    if dest.exists():  # a fresh set: wheels of an earlier resolution would be read as this one's
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    seen: dict[str, set] = {}   # package -> the extras walked for it
    asked: dict[str, set] = {}  # package -> extras its requirers asked for (what its METADATA is read with)
    level = list(reqs)
    while level:
        want = {}
        for r in level:
            req = Requirement(r)
            name = canonical(req.name)
            extras = set(req.extras)
            if name in seen and extras <= seen[name]:
                continue
            if req.marker is not None and not any(req.marker.evaluate({**TARGET_MARKERS, "extra": e})
                                                  for e in sorted(asked.get(name, set())) or [""]):
                continue
            seen.setdefault(name, set()).update(extras)
            asked.setdefault(name, set()).update(extras)
            if name in fixed:
                want[name] = fixed[name]
                continue
            try:
                mine = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                mine = None
            if mine and "+" not in mine and req.specifier.contains(mine, prereleases=True):
                want[name] = f"{req.name}=={mine}"  # this host's version, where the requirement allows it
            else:
                want[name] = f"{req.name}{req.specifier}"
        if not want:
            break
        plats = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
        _run([python, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--only-binary=:all:", "--no-deps",
              *plats, "--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", str(dest),
              *want.values()], f"pip download of the aarch64 wheels ({', '.join(want.values())})")
        level = []
        for whl in sorted(dest.glob("*.whl")):
            name = canonical(whl.name.split("-")[0])
            if name not in want:
                continue
            with zipfile.ZipFile(whl) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                for r in email.parser.Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []:
                    req = Requirement(r)
                    # a dependency that only an extra of this package brings: kept when a requirer asked for it
                    if req.marker is not None and not any(
                            req.marker.evaluate({**TARGET_MARKERS, "extra": e}) for e in sorted(asked[name]) or [""]):
                        continue
                    level.append(str(Requirement(r)).split(";")[0].strip())
    return sorted(dest.glob("*.whl"))


def extra_pins(fmts: Sequence[str]) -> dict[str, str]:
    """Each runtime's package pinned to the version installed here ("ai-edge-litert==2.3.0"): the board runs
    what this host checks against. A runtime not installed here cannot be compared: one line says how."""
    from edgexfer.runtime.backends import PACKAGES, package_version

    out = {}
    for fmt in fmts:
        if package_version(fmt) is None:
            raise EmulationUnavailable(f"verifying a {fmt} file compares it with this host, which lacks "
                                       f'{PACKAGES[fmt]}: pip install "edgexfer[{fmt}]" here first')
        out[fmt] = f"{PACKAGES[fmt]}=={package_version(fmt)}"
    return out


def _extra_stamp(pin: str) -> Path:
    return rootfs() / "opt" / "edgexfer" / f".extra-{canonical(pin.replace('==', '-'))}"


def setup_extras(fmts: Sequence[str], log: Callable[[str], None] = lambda s: None) -> dict[str, str]:
    """Install the runtime of each format in `fmts` ("litert", "executorch", "openvino") into the emulated venv,
    as a board installs it: its aarch64 wheels and their dependencies, resolved against the runtime's own pins
    (requirements-runtime.txt, so numpy stays the one the runtime was checked with), installed with pip
    --no-index. Idempotent: a stamp per package and version; the base set-up removes them when it rebuilds the
    venv. Needs the base set-up (`setup`) first. Returns the pins."""
    for fmt in sorted(set(fmts) & set(NOT_ON_BOARD)):
        raise EmulationUnavailable(f"a {fmt} file cannot be verified under emulated arm64: {NOT_ON_BOARD[fmt]}")
    pins = extra_pins(sorted(set(fmts)))
    if not pins:
        return pins
    if not ready():
        raise EmulationUnavailable(missing() or "the arm64 root filesystem is not set up: run "
                                   "`python -m edgexfer.runtime.emulate setup` (or `make arm64`) as root")
    root = rootfs()
    for fmt, pin in pins.items():
        stamp = _extra_stamp(pin)
        if stamp.is_file():
            continue
        name = stamp.name.removeprefix(".extra-")
        wheels = cache_dir() / "wheels" / f"extra-{name}"
        log(f"aarch64 wheels for {pin} (the {fmt} runtime) and what it needs on arm64, at this host's versions")
        resolve_wheels(wheels, [pin], requirements())
        inside = root / "opt" / "edgexfer" / f"extra-{name}"
        if inside.exists():
            shutil.rmtree(inside)
        shutil.copytree(wheels, inside)
        log(f"installing {pin} offline into the emulated venv (pip under emulation: minutes for a large one)")
        r = chroot([f"{VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--find-links",
                    f"/opt/edgexfer/extra-{name}", "--find-links", "/opt/edgexfer/wheels", "-c",
                    "/opt/edgexfer/requirements.txt", pin], timeout=3600)
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit {r.returncode}"]
            raise EmulationUnavailable(f"pip install of {pin} in the arm64 root filesystem failed: {tail[0]}")
        shutil.rmtree(inside, ignore_errors=True)  # installed: the cache keeps the wheels
        stamp.write_text(json.dumps({"package": pin, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return pins


def installed_versions() -> dict[str, str]:
    """Distribution versions installed in the emulated venv (canonical names), as its own metadata says."""
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    r = chroot([f"{VENV}/bin/python", "-c", code], timeout=300)
    if r.returncode:
        raise EmulationUnavailable(f"arm64 python failed: {r.stderr.strip().splitlines()[-1:]}")
    return {canonical(k): v for k, v in json.loads(r.stdout).items()}


def canonical(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503): Prometheus_Client -> prometheus-client."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


# -- running the runtime there -----------------------------------------------------------------------------

class Job:
    """A scratch folder inside the root filesystem holding a copy of this runtime package; removed on exit."""

    def __init__(self, root: Path | None = None):
        self.root = root or rootfs()

    def __enter__(self) -> "Job":
        base = self.root / "tmp"
        base.mkdir(exist_ok=True)
        self.host = Path(tempfile.mkdtemp(prefix="edgexfer-job-", dir=base))
        self.inside = "/tmp/" + self.host.name
        pkg = self.host / "edgexfer"
        shutil.copytree(RUNTIME_DIR, pkg / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        import edgexfer

        (pkg / "__init__.py").write_text(f'"""edgexfer runtime (emulated arm64 job)."""\n'
                                         f'__version__ = "{edgexfer.__version__}"\n')
        return self

    def put(self, src: Path, name: str | None = None) -> str:
        """Copy a host file in; returns its path as the arm64 process sees it."""
        dest = self.host / (name or Path(src).name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
        return f"{self.inside}/{dest.relative_to(self.host)}"

    def python(self, args: Sequence[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        return chroot([f"{VENV}/bin/python", *args], env={"PYTHONPATH": self.inside}, timeout=timeout, root=self.root)

    def popen(self, args: Sequence[str], env: dict | None = None) -> subprocess.Popen:
        """Start an arm64 process in the background (a server); the caller ends it."""
        base = {"PATH": f"{VENV}/bin:/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "PYTHONPATH": self.inside}
        return subprocess.Popen([_chroot_bin(), str(self.root), *args], env={**base, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.host, ignore_errors=True)


def run_models(models: Sequence[Path], *, images: Sequence[Path] | None = None, x=None, threads: int = 1,
               batch: int = 16, timeout: float | None = 3600) -> dict:
    """Logits of each model under arm64 for `images` (preprocessed there, by the runtime's own code) or
    for a preprocessed float32 array `x` (N, C, H, W).

    Returns {"outputs": [{task: logits} per model], "inputs": the preprocessed array the arm64 process
    fed in, "info": the arm64 interpreter's machine info, "seconds": wall time of the emulated process}.
    """
    import numpy as np

    if not ready():
        raise EmulationUnavailable(missing() or "the arm64 root filesystem is not set up: run "
                                   "`python -m edgexfer.runtime.emulate setup` (or `make arm64`) as root")
    with Job() as job:
        for i, m in enumerate(models):  # an OpenVINO IR's weights travel beside its .xml
            if Path(m).suffix == ".xml" and Path(m).with_suffix(".bin").is_file():
                job.put(Path(m).with_suffix(".bin"), f"m{i}/{Path(m).with_suffix('.bin').name}")
        spec = {"models": [job.put(m, f"m{i}/{Path(m).name}") for i, m in enumerate(models)],
                "threads": threads, "batch": batch, "out": f"{job.inside}/out.npz", "info": f"{job.inside}/info.json"}
        if images is not None:
            spec["images"] = [job.put(p, f"img/{i:05d}{Path(p).suffix}") for i, p in enumerate(images)]
        else:
            np.save(job.host / "x.npy", np.ascontiguousarray(x, dtype=np.float32))
            spec["x"] = f"{job.inside}/x.npy"
        (job.host / "job.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        r = job.python(["-m", "edgexfer.runtime.emulate", "worker", f"{job.inside}/job.json"], timeout=timeout)
        seconds = time.perf_counter() - t0
        if r.returncode:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            raise EmulationUnavailable(f"the arm64 runtime failed (exit {r.returncode}): {' | '.join(tail)}")
        with np.load(job.host / "out.npz") as z:
            data = {k: z[k] for k in z.files}
        info = json.loads((job.host / "info.json").read_text())
    outputs = [{k.split("/", 1)[1]: v for k, v in data.items() if k.startswith(f"{i}/")} for i in range(len(models))]
    return {"outputs": outputs, "inputs": data["input"], "info": info, "seconds": seconds}


def install_bundle(bundle_dir: Path, image: Path, *, timeout: float = 1800) -> dict:
    """Install an `edgexfer bundle --arch arm64` folder as its README says — a fresh venv, pip with
    --no-index from its wheels/ — in the root filesystem, and classify `image` with its example.py."""
    if not ready():
        raise EmulationUnavailable(missing() or "the arm64 root filesystem is not set up (make arm64)")
    bundle_dir = Path(bundle_dir)
    model = next((p.name for p in bundle_dir.glob("*.onnx") if not p.name.endswith(".e2e.onnx")), None)
    if model is None or not (bundle_dir / "wheels").is_dir():
        raise RuntimeInputError(f"{bundle_dir} is not an arm64 bundle (no .onnx file or no wheels/)")
    with Job() as job:
        shutil.copytree(bundle_dir, job.host / "bundle")
        img = job.put(image, f"bundle/{Path(image).name}")
        b = f"{job.inside}/bundle"
        steps = {}
        for key, cmd in (
            ("venv", ["python3", "-m", "venv", f"{b}/.venv"]),
            ("pip_install", [f"{b}/.venv/bin/pip", "install", "-q", "--disable-pip-version-check", "--no-index",
                             "--find-links", f"{b}/wheels", "-r", f"{b}/requirements.txt"]),
            ("example", ["/bin/sh", "-c", f"cd {b} && .venv/bin/python example.py {model} {img} --top-k 3"]),
        ):
            t0 = time.perf_counter()
            r = chroot(cmd, timeout=timeout, env={"PIP_NO_INDEX": "1"})
            steps[key] = round(time.perf_counter() - t0, 1)
            if r.returncode:
                tail = (r.stderr or r.stdout).strip().splitlines()[-2:]
                raise EmulationUnavailable(f"bundle {key} failed under arm64: {' | '.join(tail)}")
        return {"model": model, "prediction": json.loads(r.stdout.strip().splitlines()[-1]), "seconds": steps}


def _worker(job_json: str) -> None:
    """Inside the arm64 root filesystem: run the job's models on its inputs with EdgeModel."""
    import numpy as np

    from edgexfer.runtime.machine import machine_info
    from edgexfer.runtime.model import EdgeModel

    spec = json.loads(Path(job_json).read_text())
    models = [EdgeModel(p, threads=spec["threads"]) for p in spec["models"]]
    x = models[0].preprocess(spec["images"]) if "images" in spec else np.load(spec["x"])
    out = {"input": x}
    for i, m in enumerate(models):
        parts = [m.run(x[j:j + spec["batch"]]) for j in range(0, len(x), spec["batch"])]
        for task in parts[0]:
            out[f"{i}/{task}"] = np.concatenate([p[task] for p in parts])
    np.savez(spec["out"], **out)
    info = machine_info()
    import numpy
    import PIL

    from edgexfer.runtime import backends

    info.update(numpy=numpy.__version__, pillow=PIL.__version__,
                runtimes={Path(p).name: backends.runtime_version(p) if backends.format_of(p) else
                          f"onnxruntime {info.get('onnxruntime')}" for p in spec["models"]})
    Path(spec["info"]).write_text(json.dumps(info))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = args[0] if args else "status"
    if cmd == "worker":
        _worker(args[1])
        return 0
    if cmd == "setup":
        try:
            root = setup(log=lambda s: print(f"==> {s}", file=sys.stderr))
        except EmulationUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"arm64 root filesystem ready: {root} ({', '.join(requirements())})")
        return 0
    if cmd == "status":
        why = missing()
        print(json.dumps({"cache": str(cache_dir()), "rootfs": (rootfs() / "usr/bin/python3").exists(),
                          "installed": _stamp().is_file(), "binfmt": native() or _binfmt_enabled(),
                          "ready": ready(), "missing": why}, indent=2))
        return 0
    print("usage: python -m edgexfer.runtime.emulate [status|setup]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
