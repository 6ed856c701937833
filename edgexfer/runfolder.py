"""The run folder: its files, report.json's read-modify-write, which stages are done, and the process's
shared state (`Workspace`: the data set and its preprocessed tensors, loaded once).

    runs/<name>/checkpoint.pt  model.onnx  model.int8.onnx  report.json  report.md  model_card.md  config.json
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
from functools import cached_property
from pathlib import Path

import numpy as np

from edgexfer import __version__
from edgexfer.config import RunConfig
from edgexfer.errors import RunFolderError
from edgexfer.runtime import atomic

log = logging.getLogger(__name__)

REPORT_SCHEMA = "edgexfer.report/2"  # edgexfer/schemas/report.schema.json (edgexfer/report_schema.py)
STAGES = ("finetune", "export", "quantize", "evaluate", "bench")
FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx",
         "int8_dynamic": "model.int8-dynamic.onnx"}


class RunFolder:
    # what a killed process can leave inside a run folder: atomic writes' `.NAME.XXXX.tmp` files, and the
    # temporary folders of export (`.export-`), quantize (`.quantize-`, `.guard-`, `.dynamic-`) and INC (`.inc-`)
    TEMP_DIR_PREFIXES = (".export-", ".quantize-", ".guard-", ".dynamic-", ".inc-")

    def __init__(self, path: str | Path):
        self.path = Path(path)

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
        if not self.is_run() and any(p.iterdir()):
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
        rep["schema"] = REPORT_SCHEMA
        rep["edgexfer_version"] = __version__
        rep["updated"] = _now()
        from edgexfer.report_schema import validate

        validate(rep, where=str(self.file("report.json")))  # never write a report that breaks its schema
        atomic.write_json(self.file("report.json"), rep)
        return rep

    def mark_done(self, stage: str, seconds: float) -> None:
        self.update_report(stages={stage: {"done": True, "seconds": round(seconds, 2), "at": _now()}})

    def done(self, stage: str) -> bool:
        return bool(self.report().get("stages", {}).get(stage, {}).get("done"))

    def require(self, name: str, stage: str) -> Path:
        p = self.file(name)
        if not p.is_file():
            raise RunFolderError(f"{p} not found; run `edgexfer {stage} {self.path}` first")
        return p


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- shared state of one process: the data set and its preprocessed tensors, loaded once ----------

class Workspace:
    def __init__(self, run: RunFolder, cfg: RunConfig):
        self.run, self.cfg = run, cfg

    @cached_property
    def dataset(self):
        from edgexfer.data import load_dataset

        d = self.cfg.data
        return load_dataset(d.source, shots=d.shots, val_fraction=d.val_fraction, test_size=d.test_size,
                            test_fraction=d.test_fraction, seed=d.seed, strict=d.strict)

    @cached_property
    def preprocessing(self):
        from edgexfer.model import model_config, preprocessing_of

        m = self.cfg.model
        return preprocessing_of(model_config(backbone=m.backbone, weights=m.weights, image_size=m.image_size,
                                             tasks={"label": ["_"]}))

    def tensors(self, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        key = f"_t_{split}"
        if key not in self.__dict__:
            from edgexfer.finetune import tensorize

            x, y = tensorize(getattr(self.dataset, split), self.preprocessing, f"preprocess {split}")
            self.__dict__[key] = (x.numpy(), y.numpy())
        x, y = self.__dict__[key]
        return (x, y) if limit is None else (x[:limit], y[:limit])
