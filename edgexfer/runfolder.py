"""The run folder: its files, report.json's read-modify-write, which stages are done, the stage protocol (`stage`:
what every stage does around its own work) and the process's shared state (`Workspace`: the data set and its
preprocessed tensors, loaded once).

    runs/<name>/checkpoint.pt  model.onnx  model.int8.onnx  report.json  report.md  model_card.md  config.json
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgexfer import __version__
from edgexfer.config import QuantizeConfig, RunConfig
from edgexfer.errors import EdgexferError, RunFolderError
from edgexfer.runtime import atomic

log = logging.getLogger(__name__)

REPORT_SCHEMA = "edgexfer.report/2"  # edgexfer/schemas/report.schema.json (edgexfer/report_schema.py)
STAGES = ("finetune", "export", "quantize", "evaluate", "bench")  # every run's stages
# `--backbone auto`: the select stage chooses the backbone (and its input size) before finetune and writes the
# choice into config.json; a run folder keeps its choice (`stages_for`)
SELECT = "select"
# `--format openvino`: the convert stage writes each ONNX model in the other formats asked for, after quantize
CONVERT = "convert"
STAGE_ORDER = (SELECT, "finetune", "export", "quantize", CONVERT, "evaluate", "bench")
SELECTION_FILE = "backbone_selection.json"  # the select stage's comparison of the candidates
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx",
         "int8_dynamic": "model.int8-dynamic.onnx"}
# the convert stage's files: each format's file of the FP32 and INT8 models (OpenVINO IR: the .xml and its .bin)
FORMAT_FILES = {"openvino": {"fp32": ("model.xml", "model.bin"), "int8": ("model.int8.xml", "model.int8.bin")},
                "executorch": {"fp32": ("model.pte",), "int8": ("model.int8.pte",)},
                "litert": {"fp32": ("model.tflite",), "int8": ("model.int8.tflite",)}}

# Stage provenance. A stage is done only if the settings it was run with (these config.json entries) and the
# files it read (their hashes) still match; running a stage again clears what it and every later stage
# recorded (their report.json sections) and removes the later stages' files, which were derived from the old.
# the config.json entries each stage's output depends on ("section.field": one field of a section): every field of
# the quantize section (the recipe, the guard's and QAT's settings, the EDGEXFER_* variables among them:
# `config.QuantizeConfig`), so that a changed one marks the stage stale and is named
# select: the request (the chosen backbone and size are its output, in the same section)
STAGE_SETTINGS = {SELECT: ("data", "model.requested_backbone", "model.weights", "model.max_latency_ms"),
                  "finetune": ("data", "model", "train"), "export": (),
                  "quantize": (*(f"quantize.{f}" for f in QuantizeConfig.__dataclass_fields__), "max_accuracy_drop"),
                  CONVERT: ("formats",), "evaluate": ("max_accuracy_drop",), "bench": ("bench",)}
STAGE_INPUTS = {SELECT: (), "finetune": (), "export": ("checkpoint.pt",),
                "quantize": (FILES["fp32"], "checkpoint.pt"), CONVERT: (FILES["fp32"], FILES["int8"], "checkpoint.pt"),
                "evaluate": tuple(FILES.values()), "bench": tuple(FILES.values())}  # model files: those present
# which earlier stages' outputs a stage reads: running a stage again clears the later stages that read it (evaluate
# writes test metrics, which bench never reads: bench's latencies outlive a new evaluation)
STAGE_READS = {SELECT: (), "finetune": (SELECT,), "export": (SELECT, "finetune"),
               "quantize": (SELECT, "finetune", "export"), CONVERT: (SELECT, "finetune", "export", "quantize"),
               "evaluate": (SELECT, "finetune", "export", "quantize"),
               "bench": (SELECT, "finetune", "export", "quantize")}
# fields of a report.json "models" entry that bench writes (the rest are evaluate's)
BENCH_MODEL_FIELDS = ("threads", "batch", "latency_ms", "throughput")
STAGE_SECTIONS = {SELECT: (), "finetune": (), "export": ("export",),
                  "quantize": ("quantize", "quantize_fp16", "quantize_dynamic"), CONVERT: ("formats",),
                  "evaluate": ("models", "quantization_impact"),
                  "bench": ("machine", "bench", "reference", "checks", "recommendation")}
# files a stage writes; `begin` removes those of later stages (and the optional ones of its own)
STAGE_FILES = {SELECT: (SELECTION_FILE,), "export": (FILES["fp32"], "model.e2e.onnx"),
               "quantize": (FILES["int8"], "model.int8.e2e.onnx", FILES["fp16"], FILES["int8_dynamic"]),
               CONVERT: tuple(f for per in FORMAT_FILES.values() for pair in per.values() for f in pair)}
OPTIONAL_OWN = {"quantize": (FILES["fp16"], FILES["int8_dynamic"])}  # written only when asked for again


def stages_for(cfg: RunConfig) -> tuple[str, ...]:
    """The stages of a run with `cfg`, in order: select first when the backbone is chosen (`--backbone auto`), convert
    after quantize when other formats than ONNX are asked for (`--format`)."""
    chooses = "auto" in (cfg.model.backbone, cfg.model.requested_backbone)
    return tuple(s for s in STAGE_ORDER if (s != SELECT or chooses) and (s != CONVERT or cfg.formats))


LOCK_FILE = ".lock"  # one writer per run folder: `RunFolder.lock`
_HELD: dict[str, dict] = {}  # run folders this process holds the lock of (resolved path -> state): re-entrant


def _command() -> str:
    """This process's command line, as a user typed it, on one line."""
    import shlex

    argv = list(sys.argv) or ["?"]
    head = Path(argv[0])
    if head.name == "edgexfer" or (head.name == "__main__.py" and "edgexfer" in head.parts):
        argv[0] = "edgexfer"
    text = shlex.join(argv)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class RunFolder:
    # what a killed process can leave inside a run folder: atomic writes' `.NAME.XXXX.tmp` files, and the
    # temporary folders of export (`.export-`), quantize (`.quantize-`, `.guard-`, `.dynamic-`, `.qat-`) and INC (`.inc-`)
    TEMP_DIR_PREFIXES = (".export-", ".quantize-", ".guard-", ".dynamic-", ".inc-", ".qat-", ".openvino-", ".litert-")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextlib.contextmanager
    def lock(self, stage: str):
        """One writer per run folder: an advisory lock (flock) on RUN/.lock for as long as the block runs,
        holding the pid, host and command of the process, so a second writer refuses in one line naming
        them. The kernel drops the lock when its process dies, however it dies, so a killed run's lock is
        simply taken over. Re-entrant within a process (`run` holds it around its stages). On release the
        file goes, and so do the folders the lock had to create, if nothing else was written in them."""
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            yield
            return
        key = str(self.path.resolve())
        if key in _HELD:
            yield
            return
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path} is not a folder")
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]
        path = self.file(LOCK_FILE)
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # a holder that created the folder removed it as it let go: again
                continue
            except (FileExistsError, NotADirectoryError) as e:
                raise RunFolderError(f"cannot create {self.path}: {e.strerror} ({e.filename})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(path)
                os.close(fd)
                raise RunFolderError(f"{self.path} is in use by another edgexfer process ({holder}); one writer per "
                                     "run folder: wait for it to finish, or stop it") from None
            try:
                a, b = os.fstat(fd), os.stat(path)
                same = (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file its holder removed as it let go: lock the one there now
        import socket

        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "command": _command(),
                "started": _now()}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        _HELD[key] = info
        try:
            yield
        finally:
            del _HELD[key]
            with contextlib.suppress(OSError):
                os.unlink(path)  # still holding it: a process waiting on this file sees it gone and retries
            os.close(fd)
            for p in created:  # the folders the lock made, if they hold nothing (a data error wrote nothing)
                with contextlib.suppress(OSError):
                    p.rmdir()

    def clear(self) -> None:
        """Remove everything in the folder but the lock (`run --force`, holding it)."""
        import shutil

        for p in self.path.iterdir():
            if p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def is_run(self) -> bool:
        """Does the folder hold an edgexfer run: a config.json that parses as one of ours?"""
        try:
            d = json.loads(self.file("config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(d, dict) and "edgexfer" in d and all(isinstance(d.get(k), dict)
                                                                 for k in ("data", "model", "train"))

    def why_not_remove(self) -> str | None:
        """Why `run --force` must not remove this folder (None: it may). It removes only a run folder
        (or an empty one), never a symbolic link, the working directory or a folder above it."""
        p = self.path
        if p.is_symlink():
            return "it is a symbolic link"
        if not p.is_dir():
            return "it is not a folder"
        here, cwd = p.resolve(), Path.cwd().resolve()
        if here == cwd or here in cwd.parents:
            return "it is the working directory or holds it"
        if not self.is_run() and any(c.name != LOCK_FILE for c in p.iterdir()):
            return "it is not an edgexfer run folder (no config.json of ours)"
        return None

    def remove_temporaries(self) -> list[str]:
        """Remove the temporary files and folders a killed stage left behind (names only our code makes);
        returns their names."""
        import shutil

        gone = []
        for p in sorted(self.path.iterdir()) if self.path.is_dir() else []:
            n = p.name
            if p.is_symlink() or not n.startswith("."):
                continue
            if p.is_file() and n.endswith(".tmp"):
                p.unlink(missing_ok=True)
            elif p.is_dir() and n.startswith(self.TEMP_DIR_PREFIXES):
                shutil.rmtree(p, ignore_errors=True)
            else:
                continue
            gone.append(n)
        if gone:
            log.info("removed %d temporary file(s) an interrupted run left in %s: %s", len(gone), self.path,
                     ", ".join(gone))
        return gone

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def read_json(self, name: str) -> dict:
        p = self.file(name)
        return json.loads(p.read_text()) if p.is_file() else {}

    def config(self) -> RunConfig:
        d = self.read_json("config.json")
        if not d:
            raise RunFolderError(f"{self.path} is not a run folder (no config.json); run `edgexfer finetune` first")
        return RunConfig.from_dict(d)

    def write_config(self, cfg: RunConfig) -> None:
        atomic.write_json(self.file("config.json"), cfg.to_dict())

    def report(self) -> dict:
        return self.read_json("report.json") or {"schema": REPORT_SCHEMA}

    def update_report(self, **sections) -> dict:
        rep = self.report()
        for k, v in sections.items():
            if isinstance(v, dict) and isinstance(rep.get(k), dict):
                rep[k] = _deep_merge(rep[k], v)
            else:
                rep[k] = v
        return self._write_report(rep)

    def _write_report(self, rep: dict) -> dict:
        rep["schema"] = REPORT_SCHEMA
        rep["edgexfer_version"] = __version__
        rep["updated"] = _now()
        from edgexfer.report_schema import validate

        validate(rep, where=str(self.file("report.json")))  # never write a report that breaks its schema
        atomic.write_json(self.file("report.json"), rep)
        return rep

    def mark_done(self, stage: str, seconds: float, cfg: RunConfig | None = None) -> None:
        """Record `stage` as finished; with `cfg`, also the settings it ran with and the files it read."""
        rec = {"done": True, "seconds": round(seconds, 2), "at": _now(), **(self.provenance(stage, cfg) if cfg else {})}
        rep = self.report()
        rep.setdefault("stages", {})[stage] = rec  # replaced, not merged: no input of an older run lingers
        self._write_report(rep)

    def done(self, stage: str) -> bool:
        return bool(self.report().get("stages", {}).get(stage, {}).get("done"))

    def provenance(self, stage: str, cfg: RunConfig) -> dict:
        """What `stage` depends on: a hash of each config.json entry it reads, and of each input file present
        (an ONNX file's content less its metrics, which evaluate writes into it; other files' bytes)."""
        d = cfg.training_key() if stage == "finetune" else cfg.to_dict()
        settings = {k: _sha(json.dumps(_setting(d, k), sort_keys=True, default=str).encode()) for k in STAGE_SETTINGS[stage]}
        inputs = {}
        for name in STAGE_INPUTS[stage]:
            p = self.file(name)
            if p.is_file():
                if name.endswith(".onnx"):
                    from edgexfer.exporters.metadata_io import content_sha256

                    inputs[name] = content_sha256(p)
                else:
                    inputs[name] = atomic.sha256_file(p)
        return {"settings": settings, "inputs": inputs}

    def why_stale(self, stage: str, cfg: RunConfig) -> str | None:
        """None when `stage` is done with these settings on these files; else why it must run (again)."""
        rec = self.report().get("stages", {}).get(stage, {})
        if not rec and stage == SELECT and cfg.model.requested_backbone == "auto" and cfg.model.backbone != "auto":
            return None  # chosen before select was a stage of its own: config.json holds the choice, which stands
        if not rec.get("done"):
            return "not done"
        if stage == "finetune":  # `run` refuses a run folder made with another training configuration
            return None
        if "settings" not in rec or "inputs" not in rec:
            return "recorded before edgexfer tracked each stage's settings and input files"
        now = self.provenance(stage, cfg)
        if any(k not in rec["settings"] for k in STAGE_SETTINGS[stage]):
            return "recorded before edgexfer tracked each of its settings (" + ", ".join(
                k for k in STAGE_SETTINGS[stage] if k not in rec["settings"]) + ")"
        changed = [k for k in STAGE_SETTINGS[stage] if rec["settings"].get(k) != now["settings"][k]]
        if changed:
            return "its settings changed since (" + ", ".join(changed) + ")"
        files = sorted(set(rec["inputs"]) | set(now["inputs"]))
        changed = [f for f in files if rec["inputs"].get(f) != now["inputs"].get(f)]
        if changed:
            return "its input files changed since (" + ", ".join(changed) + ")"
        return None

    def begin(self, stage: str) -> None:
        """A stage starts writing: what it and the later stages recorded no longer holds. Their records and
        report sections go, and the files of the later stages (derived from what this stage replaces), so
        no file in the folder is described by settings it was not built with."""
        later = [stage] + [s for s in STAGE_ORDER[STAGE_ORDER.index(stage) + 1:] if stage in STAGE_READS[s]]
        rep = self.report()
        before = json.dumps(rep, sort_keys=True)
        for s in later:
            rep.get("stages", {}).pop(s, None)
            for section in STAGE_SECTIONS[s]:
                if not (section == "models" and "bench" not in later):
                    rep.pop(section, None)
        if "bench" not in later and isinstance(rep.get("models"), dict):  # evaluate again: bench's figures stay
            rep["models"] = {k: {f: v for f, v in m.items() if f in ("file", "size_bytes", *BENCH_MODEL_FIELDS)}
                             for k, m in rep["models"].items() if isinstance(m, dict) and "latency_ms" in m}
        if json.dumps(rep, sort_keys=True) != before and self.file("report.json").is_file():
            self._write_report(rep)
        for s in later[1:]:
            for name in STAGE_FILES.get(s, ()):
                self._remove(name, f"derived by {s} from what {stage} now replaces")
        for name in OPTIONAL_OWN.get(stage, ()):
            self._remove(name, f"{stage} writes it again only when asked to")

    def start_report(self, stage: str, cfg: RunConfig) -> None:
        """`stage` makes a new model (finetune): report.json starts over, keeping only the records of the stages
        of this run it reads (the backbone choice)."""
        kept = self.report().get("stages", {})
        keep = [s for s in STAGE_READS[stage] if s in stages_for(cfg) and s in kept]
        atomic.write_json(self.file("report.json"), {"schema": REPORT_SCHEMA, "stages": {s: kept[s] for s in keep}})

    def _remove(self, name: str, why: str) -> None:
        p = self.file(name)
        if p.is_file() and not p.is_symlink():
            p.unlink()
            log.info("removed %s: %s", p, why)

    def require(self, name: str, stage: str) -> Path:
        p = self.file(name)
        if not p.is_file():
            raise RunFolderError(f"{p} not found; run `edgexfer {stage} {self.path}` first")
        return p


def _holder(path: Path) -> str:
    """Who holds the lock at `path`, as its file says: 'pid N on HOST, since T: COMMAND'."""
    try:
        d = json.loads(path.read_text())
        return f"pid {d['pid']} on {d['host']}, since {d['started']}: {d['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not recorded its pid yet"


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _setting(d: dict, key: str):
    """config.json's entry `key` ("section" or "section.field") in `d`."""
    section, _, name = key.partition(".")
    return (d.get(section) or {}).get(name) if name else d.get(section)


def _sha(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- the stage protocol: what every stage does around its own work ------------------------------------

class Stage:
    """One stage at work, as `stage` hands it to the stage's function: the run folder (`run`), the config (`cfg`)
    and the process's shared state (`ws`), and the protocol's one step the stage takes at its own moment, `begin`:
    from there it replaces what it and the later stages recorded. Everything else is the protocol's: the lock,
    the timing, clearing the report sections and files (`RunFolder.begin`), the report sections it writes
    (`report`), and on success its provenance and done mark (`RunFolder.mark_done`)."""

    def __init__(self, name: str, run: RunFolder, cfg: RunConfig, ws: Workspace, *, starts_over: bool = False,
                 chooses: bool = False):
        self.name, self.run, self.cfg, self.ws = name, run, cfg, ws
        self.starts_over, self.chooses = starts_over, chooses
        self.begun = False
        self._t0 = time.perf_counter()

    def begin(self) -> None:
        """The stage starts writing (once; at the latest with its first report section): what it and the later
        stages recorded goes (`RunFolder.begin`). A stage that `starts_over` (finetune: a new model) also writes
        config.json and starts report.json afresh. What a stage reads and checks before this leaves the folder
        as it was when it fails."""
        if self.begun:
            return
        self.begun = True
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.run.begin(self.name)
        if self.starts_over:
            self.run.write_config(self.cfg)
            self.run.start_report(self.name, self.cfg)

    def report(self, **sections) -> dict:
        """Write these report.json sections (merged into what is there: `RunFolder.update_report`)."""
        self.begin()
        return self.run.update_report(**sections)

    def finish(self) -> None:
        """The stage's work succeeded: config.json with what a choosing stage chose (select), then its record:
        done, in how many seconds, with the settings and input files it ran on (`RunFolder.provenance`)."""
        self.begin()
        if self.chooses:
            self.run.write_config(self.cfg)
        self.run.mark_done(self.name, time.perf_counter() - self._t0, self.cfg)


def stage(name: str, *, starts_over: bool = False, chooses: bool = False):
    """The stage protocol, as a decorator: `fn(st: Stage, **kw) -> result` becomes the stage
    `NAME(run_dir, cfg=None, ws=None, **kw) -> result`, which holds the run folder's lock (`RunFolder.lock`), reads
    config.json when no `cfg` is given, makes the `Workspace` when none is given, times the stage and, when `fn`
    returns, records it done with its provenance (`Stage.finish`). A stage that raises leaves no done mark.
    `starts_over`: the stage makes a new model (config.json and a fresh report.json as it begins);
    `chooses`: the stage decides settings in `st.cfg` (config.json is written with them as it finishes)."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run_stage(run_dir: str | Path, cfg: RunConfig | None = None, ws: Workspace | None = None, **kw):
            run = RunFolder(run_dir)
            with run.lock(name):
                cfg = cfg or run.config()
                st = Stage(name, run, cfg, ws or Workspace(run, cfg), starts_over=starts_over, chooses=chooses)
                result = fn(st, **kw)
                st.finish()
                return result

        run_stage.stage = name
        return run_stage
    return wrap


# -- shared state of one process: the data set and its preprocessed tensors, loaded once ----------

class Workspace:
    """What the stages of one process share, made once: the data set, the preprocessing of the chosen backbone,
    the preprocessed splits, and whatever a stage keeps through `cached` (the --adapt-bn images). What depends on
    the backbone and input size is kept under them, so it is never one made before the select stage chose."""

    def __init__(self, run: RunFolder, cfg: RunConfig):
        self.run, self.cfg = run, cfg
        self._cache: dict[tuple, Any] = {}

    def cached(self, key: tuple, make: Callable[[], Any], enough: Callable[[Any], bool] | None = None) -> Any:
        """`make()`, made once per `key` in this process; made again when `enough(value)` says the value kept
        falls short (a larger sample asked for)."""
        if key not in self._cache or (enough is not None and not enough(self._cache[key])):
            self._cache[key] = make()
        return self._cache[key]

    @property
    def model_key(self) -> tuple:
        """The backbone and input size that preprocessed tensors depend on (a key part for `cached`)."""
        m = self.cfg.model
        if m.backbone == "auto":
            raise EdgexferError("--backbone auto: no backbone chosen yet (the select stage chooses it before finetune)")
        return m.backbone, m.image_size

    @property
    def dataset(self):
        def load():
            from edgexfer.data import load_dataset

            d = self.cfg.data
            return load_dataset(d.source, shots=d.shots, val_fraction=d.val_fraction, test_size=d.test_size,
                                test_fraction=d.test_fraction, seed=d.seed, strict=d.strict,
                                follow_symlinks=d.follow_symlinks)
        return self.cached(("dataset",), load)

    @property
    def preprocessing(self):
        from edgexfer.backbones import preprocessing_for

        key = self.model_key
        return self.cached(("preprocessing", *key), lambda: preprocessing_for(*key))

    def tensors(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        def make():
            from edgexfer.finetune import tensorize

            x, y = tensorize(getattr(self.dataset, split), self.preprocessing, f"preprocess {split}")
            return x.numpy(), y.numpy()

        x, y = self.cached(("tensors", split, *self.model_key), make)
        return (x, y) if limit is None else (x[:limit], y[:limit])
