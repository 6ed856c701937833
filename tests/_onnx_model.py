"""A tiny ONNX classifier built with onnx.helper, with whatever edgexfer metadata a test gives it: for
tests of the metadata checks that must not wait for a training run."""
from __future__ import annotations

import json

import numpy as np

from edgexfer.runtime.metadata import META_KEY, META_SCHEMA


def good_meta(classes: int = 10, side: int = 8) -> dict:
    return {
        "schema": META_SCHEMA,
        "tasks": [{"name": "label", "output": "logits", "labels": [f"c{i}" for i in range(classes)]}],
        "input": {"name": "input", "height": side, "width": side, "channels": 3},
        "preprocessing": {"resize": side, "crop": side, "interpolation": "bilinear", "color": "RGB",
                          "scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "provenance": {"backbone": "test"},
        "metrics": {"test_accuracy": 0.5},
    }


def onnx_bytes(meta: dict | str | None, classes: int = 10, side: int = 8, symbolic_classes: bool = False) -> bytes:
    """input [N, 3, side, side] -> global average pool -> [N, 3] x W[3, classes] -> "logits" [N, classes]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((3, classes)).astype(np.float32), "w")
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "C" if symbolic_classes else classes])],
        initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, {META_KEY: meta if isinstance(meta, str) else json.dumps(meta)})
    return model.SerializeToString()
