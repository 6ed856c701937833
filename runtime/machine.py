"""What machine a number was measured on: CPU model, ISA flags that matter for INT8, cores, versions."""
from __future__ import annotations

import os
import platform

INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                     "amx_int8", "amx_bf16", "neon", "asimd", "asimddp", "i8mm", "sve")


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and val.strip():
                    model = val.strip()
                elif key in ("flags", "features"):
                    flags.update(val.split())
    except OSError:
        pass
    return {"cpu": model, "flags": sorted(f for f in flags if f in INTERESTING_FLAGS)}


def machine_info() -> dict:
    import onnxruntime as ort

    info = cpu_info()
    info.update(
        arch=platform.machine(),
        cores=os.cpu_count(),
        os=platform.platform(),
        python=platform.python_version(),
        onnxruntime=ort.__version__,
        providers=ort.get_available_providers(),
    )
    return info
