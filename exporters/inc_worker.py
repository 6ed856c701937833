"""Intel Neural Compressor's accuracy-driven tuning, run in its own interpreter.

onnx-neural-compressor pins numpy<2, so edgexfer never imports it: `edgexfer.exporters.inc` runs this
file, by path, with a Python that has it (`make inc` builds one in .venv-inc; EDGEXFER_INC_PYTHON names
another). It imports only numpy, onnx, onnxruntime and onnx_neural_compressor.

    python inc_worker.py WORKDIR     # reads WORKDIR/job.json, calib.npy, guard_x.npy, guard_y.npy
                                      # writes WORKDIR/tuned.onnx (if a candidate met the bound), trials.json

The guard set is edgexfer's agreement set and its labels FP32's own top-1, so "accuracy" here is top-1
agreement with FP32 (FP32 scores 1.0) and the tolerable loss is the disagreement rate allowed.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx_neural_compressor import data_reader
from onnx_neural_compressor.quantization import config, tuning
from onnxruntime.quantization import QuantFormat, QuantType


class Reader(data_reader.CalibrationDataReader):
    def __init__(self, name, x):
        self.name, self.x, self.i = name, x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        self.i += 1
        return {self.name: self.x[self.i - 1:self.i]}

    def rewind(self):
        self.i = 0


def main(work: Path) -> int:
    job = json.loads((work / "job.json").read_text())
    calib, gy = np.load(work / "calib.npy"), np.load(work / "guard_y.npy")
    # the guard set is ~1000 images (up to 768 MiB): read it from the file as each batch needs it, not all at once
    gx = np.load(work / "guard_x.npy", mmap_mode="r")
    trials = []

    def accuracy(path) -> float:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        logits = np.concatenate([sess.run(None, {name: np.ascontiguousarray(gx[i:i + 64])})[0] for i in range(0, len(gx), 64)])
        acc = float(np.mean(logits.argmax(1) == gy))
        trials.append(acc)
        (work / "trials.json").write_text(json.dumps(trials))
        return acc

    qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    config_set = config.StaticQuantConfig.get_config_set_for_tuning(
        quant_format=QuantFormat.QDQ, activation_type=qtype[job["activation_type"]],
        weight_type=qtype[job["weight_type"]], reduce_range=job["reduce_range"],
        execution_provider="CPUExecutionProvider", calibration_sampling_size=len(calib))
    tune = tuning.TuningConfig(config_set=config_set, tolerable_loss=job["tolerable_loss"],
                               max_trials=job["max_trials"])
    try:
        best = tuning.autotune(job["model"], tune, accuracy, calibration_data_reader=Reader(job["input"], calib))
    except SystemExit:  # autotune exit(0)s when no candidate meets the bound
        best = None
    if best is not None:
        onnx.save_model(best, str(work / "tuned.onnx"))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
