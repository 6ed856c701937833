"""benchmarks/RESULTS.md is rendered from benchmarks/results/*.json (issue 14 item 4): re-rendering reproduces it
byte for byte, and a figure in a results JSON reaches the page (no hand-typed copy of it)."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _renderer():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "benchmarks" / "render_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_md_is_what_the_renderer_writes(capsys):
    r = _renderer()
    rc = r.main(["--check"])
    assert rc == 0, ("benchmarks/RESULTS.md differs from its rendering: run `python benchmarks/render_results.py` "
                     "and commit the result\n" + capsys.readouterr().out[:4000])


def test_a_figure_comes_from_its_json(monkeypatch):
    r = _renderer()
    real = r.load

    def load(name):
        d = real(name)
        if name == "demo.json":
            d = json.loads(json.dumps(d))
            d["fp32_accuracy"] = 0.123456
            d.pop("machine")
        return d

    monkeypatch.setattr(r, "load", load)
    text = r.section_demo()
    assert "| FP32 test accuracy (ONNX Runtime) | 0.123 |" in text
    assert "*machine:* not recorded" in text
    assert text not in r.OUT.read_text()


def test_every_section_says_where_its_figures_come_from():
    r = _renderer()
    for f in r.SECTIONS[1:]:
        text = f()
        if text and "not reproducible" not in text:
            assert "*Source:* `results/" in text and "*machine:*" in text and "*commit:*" in text, f.__name__
