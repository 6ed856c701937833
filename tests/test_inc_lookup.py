"""Which interpreter runs Intel Neural Compressor (exporters/inc.py): EDGEXFER_INC_PYTHON, else .venv-inc under the
current folder, else this one when it has onnx_neural_compressor; none: the built-in tuner, and INC says why. Fast
tier: nothing is run (the tuning itself is a system test, test_quantize.py)."""
from __future__ import annotations

import importlib.util
from sys import executable as this_python

from edgexfer.exporters import inc


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EDGEXFER_INC_PYTHON", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert inc.inc_python() is None
    r = inc.inc_tune(tmp_path / "m.onnx", tmp_path / "q.onnx", None, None, None, input_name="input", recipe=None,
                     fp32_accuracy=1.0, max_drop=0.01)
    assert r["tuned"] is False and "make inc" in r["reason"]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "onnx_neural_compressor" else None)
    assert inc.inc_python() == this_python  # this interpreter has it

    local = tmp_path / ".venv-inc" / "bin" / "python"
    local.parent.mkdir(parents=True)
    local.write_text("")
    assert inc.inc_python() == str(local)  # `make inc`'s environment, under the current folder

    mine = tmp_path / "my-python"
    mine.write_text("")
    monkeypatch.setenv("EDGEXFER_INC_PYTHON", str(mine))
    assert inc.inc_python() == str(mine)  # the environment variable first
    monkeypatch.setenv("EDGEXFER_INC_PYTHON", str(tmp_path / "missing"))
    assert inc.inc_python() == str(local)  # a path that is not there is passed over
