"""One command tree (edgexfer/cli.py's, on runtime/cli.py's; click): `edgexfer --help` lists every command and exits 0 with the
runtime install alone (torch & co. blocked in a subprocess), the training commands name their extra in one
line, every option has help and shows its default, and `predict` takes a run folder and writes CSV too."""
import csv
import io
import json
import subprocess
import sys

import click
import pytest

from edgexfer.cli import cli
from edgexfer.runtime.cli import COMMANDS, TRAINING

HEAVY = ("torch", "torchvision", "onnx", "onnxslim", "sklearn", "matplotlib", "timm", "optimum", "tqdm")
BLOCKED = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {HEAVY!r}:
            raise ImportError(f"No module named {{name!r}} (blocked)", name=name)
sys.meta_path.insert(0, Blocker())
import atexit
atexit.register(lambda: print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}), file=sys.stderr))
from edgexfer.entry import main
main(sys.argv[1:])
"""


def without_training(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command_without_torch():
    p = without_training("--help")
    assert p.returncode == 0, p.stderr
    listed = p.stdout.split("Commands:", 1)[1]
    for name in (*COMMANDS, *TRAINING):
        assert f"\n  {name} " in listed, name
    for name in TRAINING:  # the extra each needs, on its line
        assert any(line.strip().startswith(f"{name} ") and "[train]" in line for line in listed.splitlines()), name
    assert "HEAVY []" in p.stderr, p.stderr


def test_training_command_without_its_extra_is_one_line():
    p = without_training("run", "--epochs", "1")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    first = p.stderr.splitlines()[0]
    assert first.startswith("error: `edgexfer run` needs") and "pip install 'edgexfer[train]'" in first
    assert "missing: torch" in first
    h = without_training("quantize", "--help")  # help still works without the extra
    assert h.returncode == 0 and "--max-accuracy-drop" in h.stdout, h.stderr


def _options(ctx_parent, name):
    cmd = cli.get_command(ctx_parent, name)
    ctx = click.Context(cmd, parent=ctx_parent, info_name=name)
    return cmd, ctx, [p for p in cmd.params if isinstance(p, click.Option)]


def test_every_option_has_help_and_shows_its_default():
    root = click.Context(cli, info_name="edgexfer", show_default=True)
    missing = []
    for name in (*COMMANDS, *TRAINING):
        cmd, ctx, opts = _options(root, name)
        for o in opts:
            if o.hidden or o.name == "help":
                continue
            record = o.get_help_record(ctx)
            if not o.help:
                missing.append(f"{name} {o.opts[0]}: no help")
            elif not o.is_flag and "default:" not in record[1] and not o.required:
                missing.append(f"{name} {o.opts[0]}: no default shown")
    assert not missing, "\n".join(missing)


def test_predict_takes_a_run_folder_and_writes_csv(tiny_run, image_folder):
    from edgexfer.runtime import EdgeModel

    imgs = sorted(image_folder.rglob("*.png"))[:3]

    def predict(*args):
        return subprocess.run([sys.executable, "-m", "edgexfer", "predict", *map(str, args)], capture_output=True,
                              text=True, timeout=120, check=True).stdout

    lines = [json.loads(x) for x in predict(tiny_run, *imgs, "--top-k", "2").splitlines()]
    want = EdgeModel(tiny_run / "model.int8.onnx")  # the run folder's chosen file
    assert [x["predictions"][0]["label"] for x in lines] == [want.predict(i, top_k=1)[0]["label"] for i in imgs]
    rows = list(csv.DictReader(io.StringIO(predict(tiny_run, *imgs, "--top-k", "2", "--format", "csv"))))
    assert len(rows) == 2 * len(imgs) and rows[0].keys() == {"image", "task", "rank", "label", "index", "score"}
    assert [r["label"] for r in rows if r["rank"] == "1"] == [x["predictions"][0]["label"] for x in lines]
    assert abs(float(rows[0]["score"]) - lines[0]["predictions"][0]["score"]) < 1e-6


def test_usage_mistake_is_one_line():
    p = subprocess.run([sys.executable, "-m", "edgexfer", "serve", "x.onnx", "--port", "99999"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("error: ") and "--port" in p.stderr and "0 to 65535" in p.stderr


def test_inspect_takes_a_run_folder(tiny_run):
    p = subprocess.run([sys.executable, "-m", "edgexfer", "inspect", "--json", str(tiny_run)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    infos = json.loads(p.stdout)
    assert [i["file"] if "file" in i else i.get("path") for i in infos] and len(infos) >= 2


@pytest.mark.parametrize("args, want", [([], None), (["--sweep"], ()), (["--sweep", "1,2"], (1, 2))])
def test_bench_sweep_takes_an_optional_value(args, want):
    root = click.Context(cli, info_name="edgexfer")
    cmd = cli.get_command(root, "bench")
    assert cmd.make_context("bench", ["m.onnx", *args], parent=root).params["sweep"] == want
