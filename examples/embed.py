"""Embedding the edgexfer runtime in an application (needs numpy, onnxruntime and Pillow only).

    python examples/embed.py runs/demo/model.int8.onnx some_image.png

For a folder-watching loop (the shape of a camera loop), see `edgexfer/runtime/app.py`, which
`edgexfer bundle` ships as the bundle's example.py.
"""
import sys

import numpy as np

from edgexfer.runtime import EdgeModel, ImageError

model = EdgeModel(sys.argv[1], threads=2)            # labels and preprocessing come from the file
print("classes:", ", ".join(model.labels))

try:
    print(model.predict(sys.argv[2], top_k=3))       # a path; bytes, PIL images, uint8 arrays work too
except ImageError as e:                                # an image that cannot be decoded
    print("skipped:", e)

# A batch from a camera: uint8 frames (N, H, W, 3) -> one prediction list per frame.
frames = np.random.default_rng(0).integers(0, 255, (4, 120, 160, 3), dtype=np.uint8)
for pred in model.predict(frames, top_k=1):
    print(pred[0]["label"], round(pred[0]["score"], 3))

# The raw logits of an already preprocessed tensor, per task (multi-task models have several).
x = model.preprocess(frames)                           # float32 (N, C, H, W), exactly as in training
print({task: logits.shape for task, logits in model.run(x).items()})
