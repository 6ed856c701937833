"""`edgexfer verify --arch arm64 --formats ...` (issue 24): a run folder's LiteRT and OpenVINO files run under the
emulated board in their own runtimes, whose aarch64 wheels are resolved for the board's markers, not this host's;
a runtime that cannot run there is refused in one line, or left out and listed with --formats all."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgexfer.runtime import emulate


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A wheel that holds only its METADATA: what resolve_wheels reads."""
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    (folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(buf.getvalue())


INDEX = {  # what the fake index holds: name -> (version, Requires-Dist)
    "runtime-pkg": ("1.0", ["numpy>=2", "flatbuffers", "cuda-libs==13.0; platform_machine == 'x86_64'",
                            "winonly; sys_platform == 'win32'", "armhelper; platform_machine == 'aarch64'",
                            "docs-extra; extra == 'docs'"]),
    "numpy": ("2.4.6", []),
    "flatbuffers": ("25.1", ["tinydep<2", "armhelper[fast]"]),
    "armhelper": ("0.3", ["speedup; extra == 'fast'", "slowdown; extra == 'slow'"]),
    "tinydep": ("1.1", []),
    "speedup": ("2.0", []),
}


def test_resolve_wheels_follows_the_board_s_markers_and_the_runtime_s_pins(tmp_path, monkeypatch):
    from importlib import metadata

    asked: list[list[str]] = []
    real_version = metadata.version
    monkeypatch.setattr(metadata, "version", lambda n: "9.9" if n == "tinydep" else real_version(n))

    def fake_run(cmd, what, **kw):
        dest = Path(cmd[cmd.index("-d") + 1])
        reqs = cmd[cmd.index("-d") + 2:]
        asked.append(reqs)
        assert "--no-deps" in cmd and "manylinux_2_35_aarch64" in cmd  # one level at a time, every bookworm tag
        for r in reqs:
            name = r.split("==")[0].split(">")[0].split("<")[0].split("[")[0]
            version, requires = INDEX[name]
            _wheel(dest, name, version, requires)

    monkeypatch.setattr(emulate, "_run", fake_run)
    got = emulate.resolve_wheels(tmp_path, ["runtime-pkg==1.0"], pins=["numpy==2.4.6"])
    names = sorted(p.name.split("-")[0] for p in got)
    assert names == ["armhelper", "flatbuffers", "numpy", "runtime_pkg", "speedup", "tinydep"]
    flat = [r for level in asked for r in level]
    assert "numpy==2.4.6" in flat  # the runtime's own pin, not the newest
    assert "tinydep<2" in flat  # this host's 9.9 is outside the requirement: the index picks
    assert not any(r.startswith(("cuda-libs", "winonly", "docs-extra", "slowdown")) for r in flat)  # x86, Windows, extras
    assert asked[0] == ["runtime-pkg==1.0"]
    (tmp_path / "stale-1.0-py3-none-any.whl").write_bytes(b"not a zip")  # an earlier resolution's leftovers
    emulate.resolve_wheels(tmp_path, ["runtime-pkg==1.0"], pins=["numpy==2.4.6"])
    assert not (tmp_path / "stale-1.0-py3-none-any.whl").exists()


def test_a_runtime_that_cannot_run_on_the_board_is_one_line():
    with pytest.raises(emulate.EmulationUnavailable, match="executorch file cannot be verified under emulated arm64.*"
                                                           "CUDA build"):
        emulate.setup_extras(["executorch"])


def test_a_runtime_missing_here_cannot_be_compared(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with pytest.raises(emulate.EmulationUnavailable, match=r'lacks ai-edge-litert: pip install "edgexfer\[litert\]"'):
        emulate.extra_pins(["litert"])


def test_verify_inputs_takes_the_formats_asked_for(fast_run_copy):
    from edgexfer.runtime.verify import verify_inputs

    run = fast_run_copy
    for name in ("model.int8.tflite", "model.tflite", "model.xml", "model.pte"):
        (run / name).write_bytes(b"not opened here")
    from edgexfer.runtime import EdgeModel

    classes = list(EdgeModel(run / "model.onnx").labels)
    held = lambda d: ([np.zeros((8, 8, 3), np.uint8)], [0], classes, "test")  # noqa: E731

    def names(formats):
        return [p.name for p in verify_inputs(run, None, held, formats)[0]]

    assert names(("onnx",)) == ["model.onnx", "model.int8.onnx"]
    assert names(("litert",)) == ["model.onnx", "model.int8.onnx", "model.tflite", "model.int8.tflite"]
    assert names(("all",))[-4:] == ["model.xml", "model.pte", "model.tflite", "model.int8.tflite"]
    (run / "model.xml").unlink()
    with pytest.raises(FileNotFoundError, match=r"no openvino file in .*: run `edgexfer export .* --format openvino`"):
        verify_inputs(run, None, held, ("openvino",))


def test_verify_formats_option_refuses_an_unknown_format(fast_run):
    from tests.conftest import invoke

    r = invoke("verify", str(fast_run), "--arch", "arm64", "--formats", "litert,coreml")
    assert r.exit_code == 2 and "coreml: choose from onnx, all, openvino, executorch, litert" in r.stderr


def test_verify_refuses_executorch_by_name_before_anything_runs(fast_run):
    from tests.conftest import invoke

    r = invoke("verify", str(fast_run), "--arch", "arm64", "--formats", "executorch")
    assert r.exit_code == 1 and "executorch file cannot be verified under emulated arm64" in r.stderr
    assert "Traceback" not in r.stderr


def test_an_arm64_bundle_of_executorch_says_why_before_anything_is_written(fast_run, tmp_path):
    from tests.conftest import invoke

    r = invoke("bundle", str(fast_run), str(tmp_path / "out"), "--runtime", "executorch", "--arch", "arm64")
    assert r.exit_code == 1 and "cannot carry its runtime's wheels" in r.stderr and "CUDA build" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_arm64_bundle_of_a_named_pte_file_says_why_too(fast_run, tmp_path):
    """The runtime inferred from a .pte file named directly is ExecuTorch: the same one line, not a pip failure."""
    from tests.conftest import invoke

    pte = tmp_path / "model.pte"
    pte.write_bytes(b"not opened before the refusal")
    r = invoke("bundle", str(pte), str(tmp_path / "out"), "--arch", "arm64")
    assert r.exit_code == 1 and "cannot carry its runtime's wheels" in r.stderr and "Traceback" not in r.stderr
