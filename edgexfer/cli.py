"""The `edgexfer` command: the runtime's command tree (runtime/cli.py) with the training commands (the [train]
extra) added to it, thin click commands over the library's stage functions. They are listed in every `--help`
whatever is installed; run without their extra, they say which in one line. Importing this module imports
click and light modules only, so the tree starts with the runtime install alone.

    edgexfer run                       # the offline default: few-shot Fashion-MNIST -> runs/demo
    edgexfer run --data DIR --name mine --backbone mobilenet_v3_small
    edgexfer finetune|export|quantize|evaluate RUN
    edgexfer predict MODEL|RUN IMAGE...    edgexfer serve MODEL|RUN
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import click

from edgexfer.errors import EdgexferError
from edgexfer.runtime import atomic
from edgexfer.runtime.cli import Lent, command_tree, quiet_option, threads_option
from edgexfer.runtime.cli import main as tree_main
from edgexfer.config import build_config  # noqa: F401  (the training options' RunConfig)

log = logging.getLogger("edgexfer")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: printed as one line, exit 1, no traceback."""
    from edgexfer.runtime.errors import ImageError, MetadataError, ModelFileError, RuntimeInputError

    runtime = (MetadataError, ImageError, RuntimeInputError, FileNotFoundError, ModelFileError)
    try:
        from edgexfer.exporters.errors import ExportError
    except ImportError:  # the exporters need onnx ([train]); without it no command gets as far as raising theirs
        return (EdgexferError, *runtime)
    return (EdgexferError, ExportError, *runtime)


EXTRA = "train"
EXTRA_MODULES = ("torch", "torchvision", "onnx", "sklearn")  # what the [train] extra brings, checked before a command runs


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class TrainingCommand(click.Command):
    """A command of the [train] extra: "[train]" before its line in `edgexfer --help`; its own --help works without
    the extra, and run without it, it says in one line what to install."""

    def get_short_help_str(self, limit: int = 45) -> str:
        return f"[{EXTRA}] {super().get_short_help_str(limit=200)}"

    def invoke(self, ctx):
        missing = [m for m in EXTRA_MODULES if not _installed(m)]
        if missing:
            from edgexfer.runtime.cli import COMMANDS
            from edgexfer.runtime.errors import RuntimeInputError

            raise RuntimeInputError(
                f"`edgexfer {self.name}` needs the training toolchain: pip install 'edgexfer[{EXTRA}]' "
                f"(missing: {', '.join(missing)}; this install has the runtime commands: {', '.join(COMMANDS)})")
        return super().invoke(ctx)


# -- shared options --------------------------------------------------------------------------------

class ImageSize(click.ParamType):
    """An integer of at least 32, or "auto"."""
    name = "auto|N"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int) and value >= 32:
            return value
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither 'auto' nor an integer", param, ctx)
        if n < 32:
            self.fail(f"{n} is smaller than 32 pixels", param, ctx)
        return n


class Formats(click.ParamType):
    """--format onnx,openvino: the formats to write, ONNX always among them (`config.FORMATS` besides it)."""
    name = "FORMAT[,FORMAT...]"

    def convert(self, value, param, ctx):
        from edgexfer.config import FORMATS

        if isinstance(value, tuple):
            return value
        names = [v.strip().lower() for v in str(value).split(",") if v.strip()]
        bad = [n for n in names if n not in ("onnx", *FORMATS)]
        if bad or not names:
            self.fail(f"{bad[0] if bad else value!r} is not a format; choose from onnx, {', '.join(FORMATS)}", param, ctx)
        return tuple(dict.fromkeys(n for n in names if n != "onnx"))


def format_option(f):
    return click.option("--format", "formats", type=Formats(), default="onnx", show_default=True,
                        help="Formats to write besides model.onnx and model.int8.onnx: openvino (OpenVINO IR: "
                             "model.xml, model.int8.xml), executorch (ExecuTorch with XNNPACK: model.pte, "
                             "model.int8.pte), litert (LiteRT: model.tflite, model.int8.tflite), each with its "
                             "package (pip install \"edgexfer[openvino]\", \"edgexfer[executorch]\", "
                             "\"edgexfer[litert]\"), each checked against FP32 (report.json formats).")(f)


def data_options(f):
    from edgexfer.config import DataConfig, ModelConfig, TrainConfig  # the defaults

    _D, _M, _T = DataConfig(), ModelConfig(), TrainConfig()
    opts = [
        click.option("--data", type=click.Path(path_type=str), default=None, show_default="offline Fashion-MNIST",
                     help="ImageFolder tree (one folder per class, or train/ val/ test/ subfolders), or a CSV file "
                          "(path,label[,label2,...]; several label columns: one head per task). "
                          "Default: offline Fashion-MNIST."),
        click.option("--shots", type=click.IntRange(min=1), default=None, show_default="all; 100 for Fashion-MNIST",
                     help="At most this many labelled images per class (validation included); the log and report "
                          "say how many were left out. Default: all of --data's images; 100 for Fashion-MNIST."),
        click.option("--all-labels", is_flag=True, help="Use every labelled image (ignore --shots)."),
        click.option("--test-size", type=click.IntRange(min=10), default=_D.test_size, show_default=True,
                     help="Fashion-MNIST only: held-out test images."),
        click.option("--seed", type=int, default=_D.seed, show_default=True,
                     help="Seed of the data split, the augmentation and the training."),
        click.option("--strict", is_flag=True, help="Refuse corrupt images instead of skipping them."),
        click.option("--follow-symlinks", is_flag=True,
                     help="Follow symbolic links (class folders or images) that lead out of the --data folder; "
                          "without it they are skipped and counted with the unreadable images."),
        click.option("--backbone", default=_M.backbone, show_default=True,
                     help="Backbone name (see `edgexfer backbones`), or auto: of the backbones with ImageNet "
                          "weights here offline, the one whose features a linear probe classifies best (held out) "
                          "on your labelled images (within --max-latency-ms); the report shows the comparison."),
        click.option("--max-latency-ms", type=click.FloatRange(0, min_open=True), default=None, show_default="no limit",
                     help="--backbone auto: only backbones at most this slow at batch 1 on this host (ONNX Runtime, "
                          "FP32, --threads). Default: no limit."),
        click.option("--weights", default=_M.weights, show_default=True,
                     help="imagenet | none | path to a local checkpoint."),
        click.option("--image-size", type=ImageSize(), default=_M.image_size, show_default=True,
                     help="Input size in pixels, or auto: the backbone's pretraining resolution (224 for "
                          "EfficientNet-Lite0) for photos, 96 when the images are small (median shorter side "
                          "under 64 px, e.g. Fashion-MNIST); the report says what was chosen and why."),
        click.option("--strategy", type=click.Choice(["auto", "lpft", "finetune", "partial", "linear"]),
                     default=_T.strategy, show_default=True,
                     help="lpft: linear probe, then fine-tune every layer; finetune: every layer from the start; "
                          "partial: probe, then the last --unfreeze-blocks blocks; linear: the head on cached "
                          "features; auto: linear when the validation split is too small to choose fine-tuning's "
                          "epochs (under 50 images or 10 per class), else by labels per class (the report says why)."),
        click.option("--unfreeze-blocks", type=click.IntRange(min=1), default=_T.unfreeze_blocks, show_default=True,
                     help="partial: how many of the backbone's last blocks train."),
        click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=_T.lr_decay, show_default=True,
                     help="Layer-wise learning-rate decay: each earlier block trains at this times the next "
                          "block's rate (1: one rate for the whole backbone)."),
        click.option("--adapt-bn", type=click.Path(exists=True, file_okay=False, path_type=str), default=None,
                     show_default="no adaptation",
                     help="Folder of unlabelled images from the target domain: re-estimate BatchNorm statistics "
                          "on them after training (AdaBN), kept unless the label-free checks say it hurt (target "
                          "entropy up, predictions collapsed onto one class, or a source validation drop with "
                          "no gain on the target): then reverted with a warning."),
        click.option("--adapt-bn-force", is_flag=True,
                     help="With --adapt-bn: keep the adapted statistics even when the checks say it hurt "
                          "(the report still says so)."),
        click.option("--epochs", type=click.IntRange(min=1), default=_T.epochs, show_default=True,
                     help="Training epochs (fine-tuning; the linear probe has its own schedule)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=_T.batch_size, show_default=True,
                     help="Images per training step."),
        click.option("--lr", type=float, default=_T.lr, show_default=True, help="Peak learning rate (AdamW)."),
        threads_option("Threads of ONNX Runtime (evaluation, benchmarks, the INT8 guard) and of the backbone "
                       "comparison."),
        click.option("--no-calibrate", is_flag=True,
                     help="Keep the softmax scores as trained: no temperature fitted on held-out images and folded "
                          "into the heads (the report still gives their calibration error)."),
        click.option("--compare-scratch/--no-compare-scratch", default=_T.scratch_baseline, show_default=True,
                     help="Also train the same network from random init with the same budget; the report says "
                          "how much the pretrained start beat it, and flags negative transfer."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def quant_options(f):
    # the defaults: QuantizeConfig's class attributes (an instance would import the exporters, and onnx, into
    # every command's start); the recipe's two are Int8Recipe's (tests/test_config_defaults.py checks them)
    from edgexfer.config import QuantizeConfig as _Q, RunConfig

    opts = [
        click.option("--target", type=click.Choice(["host", "avx2", "avx512", "avx512_vnni", "arm64"]), default=_Q.target,
                     show_default=True, help="CPU the INT8 recipe is for (optimum's presets); host: this CPU."),
        click.option("--calibration-method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
                     show_default=True, help="How INT8 ranges are set from the calibration images' activations."),
        click.option("--calibration-samples", type=click.IntRange(min=1), default=200, show_default=True,
                     help="Calibration images."),
        click.option("--calibration-data", type=click.Choice(["auto", "train", "adapt-bn"]), default=_Q.calibration,
                     show_default=True, help="Images that set the INT8 ranges: train, or adapt-bn (the run's "
                                             "--adapt-bn folder: the target domain); auto: adapt-bn when the run "
                                             "has one, else train."),
        click.option("--max-accuracy-drop", type=click.FloatRange(0, 1), default=RunConfig.max_accuracy_drop,
                     show_default=True,
                     help="Accuracy guard: INT8 may lose at most this much accuracy (fraction) against FP32, "
                          "bounded by its top-1 disagreement with FP32 on images the model was not fitted on "
                          "(out-of-fold or validation images, --guard-data, augmented views of them)."),
        click.option("--guard-data", type=click.Path(exists=True, file_okay=False), default=_Q.guard_data,
                     show_default="none", help="Folder of unlabelled photos of the domain (never used for training): "
                     "the accuracy guard measures INT8 on them too, so its 95%% bound can prove a small drop."),
        click.option("--min-target-agreement", type=click.FloatRange(0, 1), default=_Q.min_target_agreement,
                     show_default=True,
                     help="With --adapt-bn: the guard also wants INT8 to give FP32's top-1 on at least this "
                          "fraction of the unlabelled target-domain images."),
        click.option("--tuner", type=click.Choice(["auto", "inc", "builtin"]), default=_Q.tuner, show_default=True,
                     help="Who finds an INT8 file within the bound: Intel Neural Compressor (when `make inc` built "
                          "it), else the built-in search that keeps the layers INT8 hurts most in FP32."),
        click.option("--qat", type=click.Choice(["auto", "off"]), default=_Q.qat, show_default=True,
                     help="Quantization-aware fine-tuning (a few epochs, fake quantization, distillation from FP32) "
                          "when no post-training INT8 file keeps the bound at >= 1.2x FP32's speed; it ships "
                          "only if within the bound and faster. off: never."),
        click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx (half the file; ONNX Runtime's CPU "
                                                   "provider computes it in FP32, so no faster on CPUs)."),
        click.option("--dynamic", is_flag=True, help="Also write model.int8-dynamic.onnx (dynamic INT8: no "
                                                      "calibration, but slow for CNNs)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def apply_quant_options(cfg, *, target, calibration_method, calibration_samples, max_accuracy_drop, tuner, fp16,
                        dynamic, calibration_data="auto", min_target_agreement=0.90, qat="auto", guard_data=None):
    """`cfg` with its quantize section made from the options, and the EDGEXFER_* variables that change what the
    quantize stage writes applied here, at the edge (`QuantizeConfig.with_environment`): config.json records
    them, and the stage's provenance with it."""
    from edgexfer.config import QuantizeConfig

    recipe = dataclasses.replace(cfg.quantize.recipe, calibration_method=calibration_method,
                                 calibration_samples=calibration_samples)
    cfg.quantize = QuantizeConfig(
        recipe=recipe, target=target, tuner=tuner, calibration=calibration_data, qat=qat,
        guard_data=str(Path(guard_data).resolve()) if guard_data else None, min_target_agreement=min_target_agreement,
        extra_formats=tuple(f for f, on in (("fp16", fp16), ("int8_dynamic", dynamic)) if on)).with_environment()
    cfg.max_accuracy_drop = max_accuracy_drop
    return cfg


def default_run_name(data: str | None) -> str:
    """runs/<the data folder's name> (a CSV file's stem), runs/demo for the Fashion-MNIST default."""
    if not data:
        return "demo"
    p = Path(data).resolve()
    name = p.stem if p.is_file() else p.name
    return _plain_name(None, None, name) if name not in ("", ".", "..") else "data"


def run_dir_arg(f):
    return click.argument("run_dir", metavar="RUN", type=click.Path(exists=True, file_okay=False, path_type=Path))(f)


# -- commands ----------------------------------------------------------------------------------------

def _plain_name(ctx, param, value: str) -> str:
    """--name is one folder under --runs: no path separator, not '.' or '..' (`--force` removes it)."""
    if value is None:
        return None
    if value in ("", ".", "..") or any(c in value for c in ("/", "\\", "\0")):
        raise click.BadParameter(f"{value!r} is not a plain folder name (no '/', not '.' or '..'); "
                                 "choose the parent folder with --runs")
    return value


@click.command(cls=TrainingCommand)
@data_options
@click.option("--name", default=None, callback=_plain_name, show_default="the data's name, or demo",
              help="Run folder name under --runs (a plain name, no '/'). Default: the --data folder's name "
                   "(a CSV file's stem); demo for the Fashion-MNIST default.")
@click.option("--runs", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="Folder the run folder goes in.")
@quant_options
@format_option
@click.option("--bench-iters", type=click.IntRange(min=1), default=200, show_default=True,
              help="Interleaved batch-1 runs per model in the bench stage.")
@click.option("--force", is_flag=True, help="Replace an existing run folder made with another configuration.")
@quiet_option
def run(name, runs, force, bench_iters, target, calibration_method, calibration_samples, calibration_data,
        max_accuracy_drop, guard_data, min_target_agreement, tuner, fp16, dynamic, qat, formats, **kw):
    """The whole pipeline: finetune, export, quantize, evaluate, bench -> runs/NAME.

    With no options: 100 labelled Fashion-MNIST images per class (offline), on the ImageNet-pretrained
    backbone --backbone auto picks of those whose weights are here. An interrupted run resumes where it stopped.
    """
    from edgexfer import pipeline

    cfg = apply_quant_options(build_config(**kw), target=target, calibration_method=calibration_method,
                              calibration_samples=calibration_samples, max_accuracy_drop=max_accuracy_drop,
                              tuner=tuner, fp16=fp16, dynamic=dynamic, calibration_data=calibration_data,
                              min_target_agreement=min_target_agreement, qat=qat, guard_data=guard_data)
    cfg.bench.iters = bench_iters
    cfg.formats = formats
    if formats:
        _require_formats(formats)
    out = runs / (name or default_run_name(kw["data"]))

    from edgexfer.runtime.cli import Progress

    progress = Progress("run")

    def on_stage(stage, what):
        if what != "end":
            progress.begin(stage, None if what == "start" else what)

    with explain_interrupt(out), progress.ticking():  # a line at least every few seconds, whatever the stage
        rep = pipeline.run(out, cfg, force=force, on_stage=on_stage)
    print_headline(out, rep)


def _require_formats(formats: tuple) -> None:
    """Each format's converter installed, or one line naming the extra, before anything is written."""
    import importlib.util

    converter = {"openvino": "openvino", "executorch": "executorch", "litert": "litert_torch"}
    for f in formats:  # each format's converter (and its runtime) comes with the extra of the format's name
        if importlib.util.find_spec(converter[f]) is None:
            raise EdgexferError(f'--format {f} needs its converter, {converter[f].replace("_", "-")} '
                                f'(pip install "edgexfer[{f}]")')


FP32_FILE = "model.onnx"


@contextlib.contextmanager
def explain_interrupt(run_dir: Path):
    """Ctrl-C in a command that writes `run_dir`: say what the folder keeps and the command that resumes
    (printed by the command tree's main instead of a bare "aborted"; exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        raise click.exceptions.Abort(interrupted(run_dir)) from None


def interrupted(run_dir: Path) -> str:
    """What an interrupted command left in `run_dir` for the next one, and that command: this one again."""
    from edgexfer.pipeline import SELECTION_FILE
    from edgexfer.runfolder import STAGES, RunFolder, _command

    run, again = RunFolder(run_dir), _command()
    if not run.path.is_dir() or not run.is_run():
        return f"interrupted: nothing saved in {run_dir}. Run the same command to start again: {again}"
    done = [s for s in STAGES if run.done(s)]
    kept = [f"stages done: {', '.join(done)}" if done else "no stage finished"]
    if run.file(SELECTION_FILE).is_file() and not done:
        kept.append(f"the backbone choice ({SELECTION_FILE})")
    state = run.file("train_state.pt")
    if state.is_file():
        epoch = _saved_epoch(state)
        kept.append(f"fine-tuning state after epoch {epoch} (train_state.pt)" if epoch
                    else "a per-epoch fine-tuning state (train_state.pt)")
    elif "finetune" not in done:
        kept.append("no per-epoch fine-tuning state (finetune starts over)")
    nxt = next((s for s in STAGES if s not in done), None)
    return (f"interrupted: {run_dir} keeps {'; '.join(kept)}.\n"
            f"To resume{f' from {nxt}' if nxt else ''}, run the same command again: {again}")


def _saved_epoch(state: Path) -> int | None:
    """The last epoch a per-epoch training state holds (None when it cannot be read)."""
    try:
        import torch

        return int(torch.load(state, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # a state being written as the process stopped, or of another version: just say it exists
        return None


def _accuracy_se(m: dict) -> str:
    """A test accuracy with its binomial standard error when the image count is known: "0.9000 ± 0.0300"."""
    from edgexfer.runtime import fmt

    acc, n = m.get("accuracy"), m.get("n")
    if not isinstance(acc, (int, float)) or not n:
        return fmt.accuracy(acc)
    return f"{fmt.accuracy(acc)} ± {fmt.accuracy((acc * (1 - acc) / n) ** 0.5)}"


def test_accuracy(m: dict) -> str:
    """A model's test accuracy ± its standard error, each task's for a multi-task model (the top level is the
    first task's)."""
    tasks = m.get("tasks") or {}
    if len(tasks) > 1:
        return ", ".join(f"{t} {_accuracy_se(v)}" for t, v in tasks.items())
    return _accuracy_se(m)


def next_commands(out: Path, file: str | None) -> list[tuple[str, str]]:
    """The commands that use this run next, with the run's own path and `file` (the recommended file) where a
    command takes a file: (command, what it does)."""
    import shlex

    from edgexfer.runtime.dataplane import PREFERRED_FILES

    from edgexfer.runtime.bundle import choose_model

    run = shlex.quote(str(out))
    served = next((f for f in PREFERRED_FILES if (out / f).is_file()), None)  # what `serve RUN` serves
    try:
        shipped = choose_model(out)[0].name  # what `bundle RUN` ships: INT8 only when its guard proved it
    except (OSError, ValueError):
        shipped = None
    file = file or served or FP32_FILE
    model = shlex.quote(str(out / file))
    return [(f"edgexfer evaluate {run} --data DIR", "score every file on more labelled photos (one folder per class)"),
            (f"edgexfer predict {model} IMAGE", "classify images or folders of them (JSON lines)"),
            (f"edgexfer serve {run if served in (None, file) else model}",
             f"serve {file} over HTTP on 127.0.0.1:8000 (Open Inference Protocol)"),
            (f"edgexfer bundle {run} OUT", f"write what to copy to a board: {shipped or 'the chosen file'}, pinned "
                                           "requirements, the runtime and an example")]


def print_headline(out: Path, rep: dict) -> None:
    from edgexfer.report import check_value
    from edgexfer.runtime import fmt

    models = rep.get("models", {})
    click.echo("")
    click.secho(f"Results in {out}/  (report.md, report.json, model_card.md, model.onnx, model.int8.onnx)", bold=True)
    for k, m in models.items():
        lat = m.get("latency_ms", {})
        n = m.get("n")
        click.echo(f"  {k:5s} {m['file']:17s} {m['size_bytes'] / 1e6:6.2f} MB  test accuracy {test_accuracy(m)}"
                   + (f" ({fmt.count(n, 'image')})" if n else "") + f"  p50 {fmt.ms(lat.get('p50'))} ms")
    ref = rep.get("reference", {}).get("pytorch_eager")
    if ref:
        click.echo(f"  PyTorch eager reference: p50 {fmt.ms(ref['latency_ms']['p50'])} ms")
    for c in rep.get("checks", []):
        mark = (click.style("--", fg="yellow") if c["ok"] is None else
                click.style("ok", fg="green") if c["ok"] else click.style("NO", fg="red", bold=True))
        click.echo(f"  [{mark}] {c['name']}: {check_value(c)} ({c['bound']})")
    r = rep.get("recommendation")
    file = None
    if r and r.get("test_disagrees") and r["model"] != "fp32":
        # the test split chooses nothing, but no file is recommended beside a warning about it
        click.secho(f"  Not recommended with confidence: {r['file']} passed the accuracy guard, but the test split "
                    f"disagrees: {r['test_disagrees']}. Check it on more labelled photos (edgexfer evaluate "
                    f"{out} --data DIR) before shipping it; {FP32_FILE} is the safe choice.", fg="red", bold=True)
        file = FP32_FILE
    elif r:
        m = models.get(r["model"], {})
        click.secho(f"  Recommended here: {out / r['file']}, test accuracy {test_accuracy(m) if m else fmt.accuracy(r.get('test_accuracy'))} "
                    f"({r['why']})", bold=True)
        if r.get("note"):
            click.secho(f"  {r['note']}", fg="yellow")
        if r.get("test_disagrees"):
            click.secho(f"  WARNING: {r['test_disagrees']}.", fg="red", bold=True)
        file = r["file"]
    cmds = next_commands(out, file)
    width = max(len(c) for c, _ in cmds)
    click.secho("\nWhat next:", bold=True)
    for c, what in cmds:
        click.echo(f"  {c:{width}s}  # {what}")


@click.command(cls=TrainingCommand)
@data_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder to write.")
@quiet_option
def finetune(out, **kw):
    """Fine-tune a pretrained backbone; write OUT/checkpoint.pt (resumes after a kill)."""
    from edgexfer import pipeline
    from edgexfer.runtime.cli import Progress

    cfg = build_config(**kw)
    with explain_interrupt(out), Progress("finetune").ticking():
        if cfg.model.backbone == "auto":
            pipeline.select(out, cfg)  # the select stage writes its choice into cfg and config.json
        res = pipeline.finetune(out, cfg)
    acc = res["val_accuracy"]
    from edgexfer.report import accuracy_name

    click.echo(f"{out}/checkpoint.pt: {accuracy_name(res)} {'n/a (no validation split)' if acc is None else f'{acc:.4f}'} "
               f"(strategy {res['strategy']})")


@click.command(cls=TrainingCommand)
@run_dir_arg
@click.option("--atol", type=float, default=None, help="Max abs difference allowed vs PyTorch (default: the backbone's).")
@click.option("--triton-repo", type=click.Path(file_okay=False, path_type=Path), default=None, show_default="none",
              help="Also write a Triton/KServe model repository here (config.pbtxt + 1/model.onnx).")
@click.option("--triton-model", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Which file of the run folder goes into the repository.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="The Triton repository entry's max_batch_size.")
@click.option("--force", is_flag=True, help="Export again even when model.onnx is current (this removes the "
              "files quantize derived from the old one).")
@format_option
@quiet_option
def export(run_dir, atol, triton_repo, triton_model, max_batch_size, force, formats):
    """RUN/checkpoint.pt -> RUN/model.onnx (opset 17, dynamic batch), validated against PyTorch,
    cleaned up with onnxslim when that is smaller or faster, metadata inside. A model.onnx already exported
    from this checkpoint.pt is kept (and the INT8 file derived from it with it) unless --force or --atol."""
    from edgexfer import pipeline

    if formats:
        _require_formats(formats)  # before anything is exported
    run = pipeline.RunFolder(run_dir)
    with run.lock("export"):
        if not force and atol is None and run.why_stale("export", run.config()) is None:
            click.echo(f"{run_dir}/model.onnx is current (exported from this checkpoint.pt); --force exports again")
        else:
            from edgexfer.runtime.cli import Progress

            with Progress("export").ticking():
                v = pipeline.export(run_dir, atol=atol)
            click.echo(f"{run_dir}/model.onnx: max abs diff {v['max_abs_diff']:.2e} (atol {v['atol']:g}), "
                       f"top-1 agreement {v['top1_agreement']:.4f}")
        if formats:
            cfg = run.config()
            cfg.formats = formats
            run.write_config(cfg)
            rec = pipeline.convert(run_dir, cfg)
            for r in rec["files"]:
                click.echo(f"{run_dir}/{r['file']}: {r['format']} {r['precision']}, "
                           f"{'shippable' if r['shippable'] else 'NOT shippable'}: {r['why']}")
    if triton_repo:
        from edgexfer.exporters.triton import write_triton_repo

        src = pipeline.RunFolder(run_dir).require(pipeline.FILES[triton_model], "quantize")
        dest = write_triton_repo(src, triton_repo, run_dir.resolve().name, max_batch_size=max_batch_size)
        click.echo(f"{dest}: Triton model repository entry ({src.name}, max_batch_size {max_batch_size})")


@click.command(cls=TrainingCommand)
@run_dir_arg
@quant_options
@quiet_option
def quantize(run_dir, **kw):
    """RUN/model.onnx -> RUN/model.int8.onnx: static INT8 QDQ for --target, calibrated on training
    images, under the accuracy guard (INT8 must give FP32's top-1 on all but --max-accuracy-drop of images the
    model was not fitted on; layers are kept in FP32 until it does)."""
    from edgexfer import pipeline
    from edgexfer.report import finalize
    from edgexfer.runtime.cli import Progress

    run = pipeline.RunFolder(run_dir)
    cfg = apply_quant_options(run.config(), **kw)
    with explain_interrupt(run_dir), run.lock("quantize"):
        with Progress("quantize").ticking() as progress:
            progress.log("calibrating INT8 and measuring it against FP32 under the accuracy guard")
            rec = pipeline.quantize(run_dir, cfg)
        run.write_config(cfg)
        finalize(run, cfg)  # report.md and the model card describe the new file (evaluate and bench: not yet run)
    g = rec.get("guard", {})
    click.echo(f"{run_dir}/model.int8.onnx: target {rec['target']['target']}, "
               f"{g.get('chosen_fp32_layers', 0)} layers kept in FP32; "
               + ("within the bound with 95% confidence" if g.get("proven") else
                  "within the bound on the measured rate, unproven with 95% confidence" if g.get("within_bound") else
                  "outside the bound" if g else "no accuracy guard"))


@click.command(cls=TrainingCommand)
@click.argument("run_dir", metavar="RUN|MODEL", type=click.Path(exists=True, path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), default=None, show_default="the run's test split",
              help="Score this labelled folder instead of the run's test split: one subfolder per class (or a "
                   "test/ subfolder of them). Works on a run folder or one edgexfer .onnx file.")
@click.option("--out", type=click.Path(path_type=Path), default=None, show_default="RUN/evaluations/DATA",
              help="With --data: folder for evaluation.json, misclassified.csv and misclassified.png. Default: "
                   "RUN/evaluations/<data folder name>/, or evaluations/<data folder name>-<model name>/ "
                   "beside a MODEL file.")
@click.option("--skip-unknown", is_flag=True,
              help="With --data: leave out class folders the model does not know (default: an error naming them).")
@click.option("--json", "as_json", is_flag=True, help="With --data: print the evaluation (schema "
              "edgexfer.evaluation/1) to stdout instead of the table.")
@threads_option("With --data: ONNX Runtime intra-op threads (a run's test split is scored with the run's own).")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None, show_default="predict's",
              help="With --data: largest image decoded, as for predict (larger ones are skipped and counted).")
@click.option("--max-aspect-ratio", type=click.FloatRange(1, 1e6), default=None, show_default="predict's",
              help="With --data: largest longer/shorter side ratio, as for predict.")
@click.option("--follow-symlinks", is_flag=True, help="With --data: follow symbolic links that lead out of the "
              "folder (without it they are skipped and counted).")
@quiet_option
def evaluate(run_dir, data, out, skip_unknown, as_json, threads, max_image_pixels, max_aspect_ratio, follow_symlinks):
    """Accuracy of every ONNX file in RUN with ONNX Runtime on the run's test split; per-class metrics
    in report.json. With --data DIR: a run folder's files, or one MODEL file, on any labelled folder
    (per-class metrics, confusion matrix, misclassified images on a contact sheet); report.json is left
    as it is."""
    from edgexfer import pipeline
    from edgexfer.report import finalize

    if data is not None:
        return _evaluate_data(run_dir, data, out, skip_unknown=skip_unknown, as_json=as_json, threads=threads,
                              max_image_pixels=max_image_pixels, max_aspect_ratio=max_aspect_ratio,
                              follow_symlinks=follow_symlinks)
    if out or skip_unknown or as_json or follow_symlinks:
        raise EdgexferError("--out, --skip-unknown, --json and --follow-symlinks go with --data DIR")
    if not run_dir.is_dir():
        raise EdgexferError(f"{run_dir} is a file: without --data, evaluate scores a run folder's test split "
                            "(give --data DIR to score a model file on a labelled folder)")
    from edgexfer.runtime import fmt

    from edgexfer.runtime.cli import Progress

    run = pipeline.RunFolder(run_dir)
    with run.lock("evaluate"):
        with Progress("evaluate").ticking():
            out = pipeline.evaluate(run_dir)
        finalize(run, run.config())
    for k, m in out["models"].items():
        click.echo(f"{k}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} on {fmt.count(m['n'], 'test image')}")


def _evaluate_data(target: Path, data: Path, out: Path | None, *, skip_unknown, as_json, threads, max_image_pixels,
                   max_aspect_ratio, follow_symlinks=False) -> None:
    """`evaluate RUN|MODEL --data DIR`: score, write OUT/evaluation.json, misclassified.csv/.png, print."""
    from edgexfer.evaluate import (check_out_dir, evaluate_folder, find_labelled_folder, format_evaluation,
                                   image_limits, write_evaluation)
    from edgexfer.pipeline import FILES, RunFolder

    folder = find_labelled_folder(data, follow_symlinks=follow_symlinks)
    if target.is_dir():
        models = {k: target / f for k, f in FILES.items() if (target / f).is_file()}
        if not models:
            raise EdgexferError(f"no edgexfer ONNX file ({', '.join(FILES.values())}) in {target}")
        out = out or target / "evaluations" / folder.name
    else:
        name = target.name[:-5] if target.name.endswith(".onnx") else target.name
        key = next((k for k, f in FILES.items() if f == target.name), name)
        models = {key: target}
        out = out or target.parent / "evaluations" / f"{folder.name}-{name}"
    inside = target.is_dir() and target.resolve() in Path(out).resolve().parents  # writes into the run folder
    with RunFolder(target).lock("evaluate") if inside else contextlib.nullcontext():
        check_out_dir(out)  # before minutes of scoring, not after
        if folder.used_test:
            click.echo(f"scoring {folder.root} ({data} has a test/ folder of classes)", err=True)
        limits = image_limits(max_image_pixels, max_aspect_ratio)
        from edgexfer.runtime.cli import Progress

        with Progress("evaluate").ticking() as progress:
            doc = evaluate_folder(models, folder, threads=threads, skip_unknown=skip_unknown, limits=limits,
                                  progress=lambda done, total: progress.count(done, total, "images scored"))
        paths = write_evaluation(doc, out, limits=limits)
    for s in doc["data"]["skipped"][:5]:
        click.echo(f"skipped {s['path']}: {s['why']}", err=True)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(format_evaluation(doc))
    shown = ", ".join(f"{m['file']} {m['contact_sheet_shows']} of {len(m['misclassified'])}"
                      for m in doc["models"].values())
    click.echo(f"\n{out}/: evaluation.json, misclassified.csv, misclassified.png (misclassified shown: {shown})")


@click.command(cls=TrainingCommand)
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="ImageFolder tree or CSV file (default: offline Fashion-MNIST).")
@click.option("--shots", type=click.IntRange(min=1), default=None, show_default="all; 100 for Fashion-MNIST",
              help="At most this many labelled images per class to score on, as for run. Default: all of --data's "
                   "images; 100 for Fashion-MNIST.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sample of images scored.")
@click.option("--strict", is_flag=True, help="Refuse corrupt images instead of skipping them.")
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links that lead out of the --data folder "
              "(without it they are skipped and counted with the unreadable images).")
@click.option("--image-size", type=ImageSize(), default="auto", show_default=True,
              help="Input size in pixels the features are computed at, or auto: as run chooses it for the first "
                   "candidate (its pretraining resolution for photos, 96 for small images).")
@click.option("--candidates", default=None, show_default="every offline backbone, and one from scratch",
              help="Comma-separated backbones, each NAME or NAME@WEIGHTS (WEIGHTS: imagenet, none or a checkpoint "
                   "path). Default: every backbone with offline ImageNet weights, and the first from random init.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranking (JSON) to stdout instead of the table.")
@click.option("--json-out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None, show_default="none",
              help="Write the ranking (JSON) to this file.")
@click.option("--out", "out_old", type=click.Path(dir_okay=False, path_type=Path), default=None, hidden=True,
              help="Former name of --json-out.")
@quiet_option
def rank(data, shots, seed, strict, follow_symlinks, image_size, candidates, as_json, out, out_old):
    """Score candidate backbones on your data before any fine-tuning (LogME on frozen features): higher
    predicts better transfer. Seconds per candidate, no training."""
    from edgexfer.data import load_dataset
    from edgexfer.transfer import default_candidates, rank as rank_fn, rank_markdown

    if data is not None and not Path(data).exists():
        raise EdgexferError(f"data folder or CSV file not found: {data}")
    specs = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else default_candidates()
    if not specs:
        raise EdgexferError("no candidates: pass --candidates (no backbone has ImageNet weights offline)")
    from edgexfer.backbones import build_backbone, get_backbone_info
    from edgexfer.transfer import parse_candidate

    for spec in specs:  # unknown names and missing weight files fail before any image is read
        name, w = parse_candidate(spec)
        get_backbone_info(name)
        if w not in ("imagenet", "none") and not Path(w).is_file():
            raise EdgexferError(f"weights file not found: {w} (candidate {spec})")
        if w == "imagenet" and not get_backbone_info(name).offline():
            build_backbone(name, weights="imagenet")  # raises the backbone's own "how to get the weights" error
    out = out or out_old
    if shots is None and data is None:
        shots = 100  # the Fashion-MNIST demo, as run
    if image_size == "auto":
        from edgexfer.data import auto_image_size

        image_size, why = auto_image_size(data, get_backbone_info(parse_candidate(specs[0])[0]).default_size, seed=seed,
                                          follow_symlinks=follow_symlinks)
        log.info("--image-size auto: %d px (%s)", image_size, why)
    ds = load_dataset(data, shots=shots, val_fraction=0.2, test_size=10, seed=seed, strict=strict,
                      follow_symlinks=follow_symlinks)
    from edgexfer.runtime.cli import Progress

    with Progress("rank").ticking():
        res = rank_fn(ds, specs, image_size=image_size, seed=seed)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(rank_markdown(res))
        click.echo(f"\n{len(specs)} candidates scored in {res['total_seconds']:.1f} s.")
    if out:
        atomic.write_json(out, res)


CURVE_BACKBONE = "efficientnet_lite0"


@click.command(cls=TrainingCommand)
@data_options
@click.option("--labels", "shots_list", default="1,5,10,50,100", show_default=True,
              help="Comma-separated labelled images per class, one point each.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/curve"),
              show_default=True, help="Folder for curve.json, curve.md and curve.png.")
@click.option("--no-scratch", is_flag=True, hidden=True, help="Former name of --no-compare-scratch.")
@quiet_option
@click.pass_context
def curve(ctx, shots_list, out, no_scratch, **kw):
    """Accuracy against labels per class, pretrained vs the same network from scratch with the same budget
    (table, JSON and PNG; --no-compare-scratch skips the scratch half). --strategy defaults to auto here; --backbone auto means EfficientNet-Lite0 (one
    backbone for every point). A killed curve resumes."""
    from edgexfer.transfer import curve as curve_fn, curve_markdown

    try:
        shots = sorted({int(k) for k in shots_list.split(",") if k.strip()})
    except ValueError:
        raise EdgexferError(f"--labels takes comma-separated integers; got {shots_list!r}") from None
    if not shots or shots[0] < 1:
        raise EdgexferError(f"--labels needs positive integers; got {shots_list!r}")
    if ctx.get_parameter_source("strategy") == click.core.ParameterSource.DEFAULT:
        kw["strategy"] = "auto"
    kw["all_labels"] = False
    # one scratch flag: --compare-scratch is on by default here (the curve's comparison), off with
    # --no-compare-scratch (or the former --no-scratch); each point's training itself trains no second baseline
    scratch = kw["compare_scratch"] and not no_scratch
    kw["compare_scratch"] = False
    if kw["backbone"] == "auto":  # the curve compares label counts on one backbone, not backbones
        kw["backbone"] = CURVE_BACKBONE
        click.echo(f"--backbone auto: the curve compares label counts on one backbone, {CURVE_BACKBONE}", err=True)
    cfg = build_config(**kw)

    from edgexfer.runtime import fmt

    def on_point(p):
        pre, s = p["pretrained"], p.get("scratch")
        click.echo(f"  {p['labels_per_class']:4d} labels/class: pretrained {fmt.accuracy(pre['test_accuracy'])} "
                   f"({pre['strategy']})"
                   + (f", scratch {fmt.accuracy(s['test_accuracy'])}, {fmt.points(p['gain_points'])} points" if s else ""),
                   err=True)

    from edgexfer.runfolder import RunFolder

    with RunFolder(out).lock("curve"):  # a killed curve resumes from its folder: one writer at a time
        res = curve_fn(cfg, shots, out, scratch=scratch, on_point=on_point)
    click.echo(curve_markdown(res))
    click.echo(f"{out}/curve.json, curve.md, curve.png")


next(p for p in curve.params if p.name == "compare_scratch").default = True  # the curve's own comparison


@click.command(cls=TrainingCommand)
@click.argument("models", nargs=-1, required=True, metavar="MODEL|RUN...", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect(models, as_json):
    """Metadata, opset, inputs and outputs, size and operator counts (quantized vs float) of ONNX files, or of
    every model file of a run folder."""
    from edgexfer.exporters.inspect_model import format_text, inspect as inspect_file

    files = []
    for m in models:
        if m.is_dir():
            found = sorted((p for p in m.glob("model*.onnx") if not p.name.endswith(".e2e.onnx")),
                           key=lambda p: (p.name != "model.onnx", p.name))
            if not found:
                raise EdgexferError(f"no model*.onnx in {m}")
            files += found
        else:
            files.append(m)
    infos = [inspect_file(m) for m in files]
    if as_json:
        click.echo(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    else:
        click.echo("\n\n".join(format_text(i) for i in infos))


@click.command(cls=TrainingCommand)
def backbones():
    """List the registered backbones: parameters, feature size, blocks, and whether ImageNet weights are
    available offline. timm/<name> works too when timm is installed."""
    from edgexfer.backbones import get_backbone_info, list_backbones, build_backbone

    click.echo(f"{'name':22s} {'params':>8s} {'features':>8s} {'blocks':>6s} {'size':>5s}  imagenet weights offline")
    for n in list_backbones():
        info = get_backbone_info(n)
        bb = build_backbone(n, weights="none")
        params = sum(p.numel() for b in bb.blocks for p in b.parameters())
        click.echo(f"{n:22s} {params / 1e6:7.2f}M {info.feature_dim:8d} {len(bb.blocks):6d} {info.default_size:5d}  "
                   f"{'yes' if info.offline() else 'no (needs download or a local path)'}")


# -- the tree ------------------------------------------------------------------------------------------

def _bench_references() -> tuple:
    """bench RUN's reference backends: PyTorch eager from the run's checkpoint, where torch is installed."""
    if not _installed("torch"):
        return ()
    from edgexfer.pipeline import pytorch_reference

    return (pytorch_reference,)


def _held_out():
    """verify RUN's images: the run's test split, rebuilt from its config (where torch is installed, as before)."""
    if not _installed("torch"):
        return None
    from edgexfer.heldout import test_split

    return test_split


def _e2e_writer():
    """bundle's end-to-end writer (the exporters', which needs onnx); None without it: bundle copies the file."""
    try:
        from edgexfer.exporters.e2e import write
    except ImportError:  # the runtime install: no onnx
        return None
    return write


TRAINING_COMMANDS = (run, finetune, export, quantize, evaluate, rank, curve, inspect, backbones)
cli = command_tree(*TRAINING_COMMANDS,
                   lent=Lent(bench_references=_bench_references, held_out=_held_out, write_e2e=_e2e_writer))


def main(argv=None) -> None:
    """`edgexfer`: the runtime's command tree with the training commands."""
    tree_main(argv, tree=cli, user_errors=_user_errors())


if __name__ == "__main__":
    main()
