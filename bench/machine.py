"""What machine a benchmark ran on: the CPU model and the vector/matrix extensions that decide GEMM speed."""
from __future__ import annotations

import platform


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector and matrix extensions that matter for fp32/bf16 GEMMs."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
                return " ".join(f for f in wanted if f in have) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"
