"""ONNX → OpenVINO IR (`model.xml` + `model.bin`), the metadata carried along.

    edgexfer export RUN --format openvino     # model.xml beside model.onnx, model.int8.xml beside model.int8.onnx

OpenVINO's own converter (`openvino.convert_model`) reads the ONNX file; an INT8 file is the guarded QDQ file,
whose QuantizeLinear/DequantizeLinear pairs OpenVINO runs as INT8 (its FakeQuantize). The edgexfer metadata
goes into the IR's `rt_info` (`edgexfer` → `meta`, the ONNX file's `edgexfer.meta` JSON), with the sha256 of
the ONNX file it came from (its provenance), so `EdgeModel` configures itself from the IR as from the ONNX file. Weights are kept in FP32 (no FP16 compression: the FP32 file answers as the ONNX file does).

The pair is written so that a killed conversion leaves no mismatched pair: both files go to a temporary
folder beside the target, the old `.xml` is removed, then the `.bin` and the `.xml` are moved in (a `.bin`
without its `.xml` is not a model to load).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from edgexfer.runtime import atomic, openvino_backend
from edgexfer.runtime.metadata import META_KEY


def ir_path(onnx_path: str | Path) -> Path:
    """model.onnx -> model.xml, model.int8.onnx -> model.int8.xml."""
    p = Path(onnx_path)
    return p.with_name(p.name[:-len(".onnx")] + ".xml") if p.name.endswith(".onnx") else p.with_suffix(".xml")


def write_ir(onnx_path: str | Path, xml: str | Path | None = None) -> Path:
    """Convert an edgexfer ONNX file to OpenVINO IR beside it (or at `xml`), its metadata in rt_info."""
    ov = openvino_backend.openvino()
    src = Path(onnx_path)
    xml = Path(xml) if xml else ir_path(src)
    props = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    if META_KEY not in props:
        raise ValueError(f"{src} carries no edgexfer metadata: export it with `edgexfer export` first")
    model = ov.convert_model(str(src))
    model.set_rt_info(props[META_KEY], [openvino_backend.RT_INFO, "meta"])
    model.set_rt_info(atomic.sha256_file(src), [openvino_backend.RT_INFO, "source_sha256"])
    model.set_rt_info(src.name, [openvino_backend.RT_INFO, "source"])
    tmp = Path(tempfile.mkdtemp(prefix=".openvino-", dir=xml.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        xml.unlink(missing_ok=True)  # no moment with the new .bin beside the old .xml
        os.replace(tmp / "model.bin", xml.with_suffix(".bin"))
        os.replace(tmp / "model.xml", xml)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml
