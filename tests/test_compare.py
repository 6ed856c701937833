"""`edgexfer compare`: bench results of several machines in one table, keyed by each result's machine info."""
import copy
import json
from pathlib import Path

import pytest

from edgexfer.runtime.compare import compare, machine_key, to_markdown
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _results(tmp_path):
    """The committed x86 result and a Raspberry Pi 5 made from it (3x slower), as two JSON files."""
    x86 = json.loads((ROOT / "benchmarks/results/runtime_bench.json").read_text())
    pi = copy.deepcopy(x86)
    pi["machine"].update(cpu="Cortex-A76", arch="aarch64", cores=4, flags=["asimd", "asimddp"],
                         providers=["CPUExecutionProvider"])
    for r in pi["models"].values():
        r["latency_ms"] = {k: v * 3 for k, v in r["latency_ms"].items()}
    a, b = tmp_path / "laptop.json", tmp_path / "pi5.json"
    a.write_text(json.dumps(x86))
    b.write_text(json.dumps(pi))
    return a, b, x86, pi


def test_compare_merges_by_machine(tmp_path):
    a, b, x86, pi = _results(tmp_path)
    doc = compare([a, b])
    assert list(doc["machines"]) == [machine_key(x86["machine"]), "Cortex-A76 (aarch64, 4 cores)"]
    rows = [r for r in doc["rows"] if r["model"] == "model.int8.onnx"]
    assert [r["machine"] for r in rows] == list(doc["machines"])  # fastest first
    assert rows[0]["p50_ratio_to_fastest"] == 1.0 and rows[1]["p50_ratio_to_fastest"] == pytest.approx(3.0)
    assert rows[1]["p50_ms"] == pytest.approx(3 * x86["models"]["model.int8.onnx"]["latency_ms"]["p50"])
    md = to_markdown(doc)
    assert "| Cortex-A76 (aarch64, 4 cores) | aarch64 | 4 | asimd, asimddp |" in md
    assert md.count("| model.int8.onnx |") == 2


def test_compare_cli_writes_table_json_and_plot(tmp_path):
    a, b, *_ = _results(tmp_path)
    p = run_cli("compare", a, b, "--markdown", tmp_path / "fleet.md", "--json-out", tmp_path / "fleet.json",
                "--plot", tmp_path / "fleet.png", check=True)
    assert "Cortex-A76" in p.stdout and (tmp_path / "fleet.md").read_text() in p.stdout
    assert json.loads((tmp_path / "fleet.json").read_text())["schema"] == "edgexfer.compare/1"
    pytest.importorskip("matplotlib")
    assert (tmp_path / "fleet.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_same_machine_twice_names_files(tmp_path):
    a, *_ = _results(tmp_path)
    c = tmp_path / "again.json"
    c.write_text(a.read_text())
    doc = compare([a, c])
    assert all(k.endswith(("[laptop.json]", "[again.json]")) for k in doc["machines"]) and len(doc["machines"]) == 2


@pytest.mark.parametrize("content, message", [
    ("not json", "is not JSON"),
    ('{"schema": "edgexfer.report/1"}', "is not an `edgexfer bench --json-out` result"),
    (None, "bench result not found"),
])
def test_compare_bad_input(tmp_path, content, message):
    f = tmp_path / "r.json"
    if content is not None:
        f.write_text(content)
    p = run_cli("compare", f)
    assert p.returncode == 1 and message in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
