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


def first_round(overrides: list[str]):
    """(prepared, engine, method, plans) of round 1 of the config ``overrides`` describe, every client sampled: the
    engine loaded once, so that a bench can time the clients' side of a round alone."""
    from fedlora.config import load_config
    from fedlora.engine.prepare import prepare
    from fedlora.engine.runtime import build_engine, build_method

    cfg = load_config(None, [*overrides, "rounds=1"])
    prepared = prepare(cfg)
    eng = build_engine(prepared, log=lambda *_: None)
    method = build_method(cfg, eng.spec)
    state = method.init_state(eng.spec.initial(ranks=eng.default_ranks))
    plans = method.configure(1, state, list(range(len(prepared.clients))))
    eng.base.set(method.base_delta(state))
    return prepared, eng, method, plans
