"""The CPU this process runs on, as the compiled code sees it: architecture, model and the SIMD features that change
which kernels run (popcount width, INT8 dot products, bf16).

Features come from LLVM's reading of the CPU (cpuid on x86-64), the same one Numba compiles the kernels for, so they
are right under emulation too (where /proc/cpuinfo shows the host's). Every benchmark stamp and every export report
names them: a figure or a check holds for the CPU it was measured on.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# LLVM feature names that decide a code path here: popcount (vpopcntq needs avx512vpopcntdq), INT8 products (VNNI:
# avx512vnni / avxvnni; without, ONNX Runtime's u8 x s8 kernels on x86 use 16-bit sums), bf16, Arm's NEON and
# dot product
SIMD = ("popcnt", "avx2", "fma", "avx512f", "avx512bw", "avx512vpopcntdq", "avx512vnni", "avxvnni", "avx512bf16",
        "neon", "dotprod", "sve", "i8mm", "bf16")


@functools.cache
def cpu_info() -> dict:
    """{"machine", "model", "llvm_cpu", "simd": [...]}: what this CPU offers of SIMD."""
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    simd = [name for name in SIMD if features.get(name, False)]
    return {"machine": platform.machine(), "model": _model_name(), "llvm_cpu": binding.get_host_cpu_name(),
            "simd": simd}


def _model_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    for key in ("model name", "Model", "Hardware"):
        if fields.get(key):
            return fields[key]
    if "CPU part" in fields:  # Arm cores name themselves by implementer and part number only
        return f"Arm implementer {fields.get('CPU implementer', '?')} part {fields['CPU part']}"
    return platform.processor()
