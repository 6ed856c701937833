"""What preprocessing in the graph costs: the end-to-end files (model.e2e.onnx, model.int8.e2e.onnx)
against the plain files plus the Python preprocessing, at 224 px, batch 1, interleaved (`edgexfer bench`'s
e2e_comparison: decoding excluded, preprocessing included), on decoded photos of several sizes: the
resize's cost grows with the photo's pixels while the model's does not.

The models: EfficientNet-Lite0 with its ImageNet head (resize 256, centre crop 224), exported FP32 and
quantized INT8 here (no training needed), or the FP32/INT8 files of a run folder with --run.
Bound (issue 15): in-graph preprocessing costs at most 10% of the model's batch-1 p50; `within_bound`
says for which photo sizes it holds. The Python preprocessing's cost is measured beside it.

    .venv/bin/python benchmarks/bench_e2e.py                 # -> benchmarks/results/e2e.json
    .venv/bin/python benchmarks/bench_e2e.py --run runs/demo --out /tmp/e2e.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "e2e.json"
BOUND = 0.10


def imagenet_lite0(folder: Path) -> list[Path]:
    """EfficientNet-Lite0 (ImageNet head) as edgexfer FP32 and INT8 files at 224, with their end-to-end files."""
    from edgexfer.backbones import LITE_MEAN, LITE_STD, imagenet_classifier
    from edgexfer.exporters.e2e import write
    from edgexfer.exporters.onnx_export import export_onnx
    from edgexfer.exporters.quantize import Int8Recipe, quantize_int8
    from edgexfer.runtime.bench import bench_photo
    from edgexfer.runtime.metadata import InputSpec, ModelMeta, Preprocessing, Task
    from edgexfer.runtime.preprocess import preprocess

    pp = Preprocessing(resize=256, crop=224, mean=LITE_MEAN, std=LITE_STD)
    meta = ModelMeta(tasks=[Task("label", "logits", tuple(f"imagenet_{i}" for i in range(1000)))],
                     input=InputSpec("input", 224, 224, 3), preprocessing=pp,
                     provenance={"backbone": "efficientnet_lite0", "weights": "imagenet"})
    x = np.stack([preprocess(bench_photo(300 + 20 * i, 400, seed=i), pp) for i in range(16)])
    fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
    export_onnx(imagenet_classifier(), meta, fp32, x, atol=1e-3)
    quantize_int8(fp32, int8, x, Int8Recipe(calibration_samples=16))
    for f in (fp32, int8):
        write(f)
    return [fp32, int8]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a run folder with 224 px model.onnx/model.int8.onnx (and their e2e files)")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="256x256,320x240,640x480,1280x720", help="photo sizes WxH, comma-separated")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()

    from edgexfer.runtime import atomic
    from edgexfer.runtime.bench import BenchConfig, e2e_comparison
    from edgexfer.runtime.machine import machine_info

    cfg = BenchConfig(threads=a.threads, warmup=20, iters=a.iters)
    with tempfile.TemporaryDirectory() as td:
        if a.run:
            from edgexfer.exporters.e2e import e2e_path, write

            files = [f for f in (a.run / "model.onnx", a.run / "model.int8.onnx") if f.is_file()]
            for f in files:
                if not e2e_path(f).is_file():
                    write(f)
            source = str(a.run)
        else:
            files = imagenet_lite0(Path(td))
            source = "EfficientNet-Lite0 ImageNet head, resize 256, crop 224, exported and quantized by this script"
        results = {}
        for size in a.sizes.split(","):
            w, h = map(int, size.lower().split("x"))
            cfg.e2e_image = (h, w)
            for f in files:
                r = e2e_comparison(f, cfg, log=print)
                results.setdefault(f"{w}x{h}", {})[f.name] = r
                print(f"{w}x{h} {r['file']}: model alone {r['latency_ms']['model_alone']['p50']:.2f} ms, in-graph "
                      f"preprocessing {r['preprocessing_ms']['in_graph']:.2f} ms "
                      f"({100 * r['in_graph_share_of_model_p50']:.1f}% of it), Python preprocessing "
                      f"{r['preprocessing_ms']['python']:.2f} ms")
    from render_results import provenance

    doc = {"schema": "edgexfer.bench_e2e/1", "command": "python benchmarks/bench_e2e.py" + (f" --run {a.run}" if a.run else ""),
           **provenance(), "source": source, "machine": machine_info(),
           "config": {"threads": cfg.threads, "iters": cfg.iters, "warmup": cfg.warmup, "spinning": cfg.spinning,
                      "block": cfg.block},
           "bound": {"in_graph_share_of_model_p50_at_most": BOUND},
           "photos": results,
           "within_bound": {size: {f: r["in_graph_share_of_model_p50"] <= BOUND for f, r in rs.items()}
                            for size, rs in results.items()}}
    atomic.write_json(a.out, doc)
    print(f"wrote {a.out}; within the bound: {json.dumps(doc['within_bound'])}")


if __name__ == "__main__":
    main()
