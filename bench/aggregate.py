"""Seconds per FlexLoRA server aggregation: the SVD of ``ΔW = Σ p_k s_k B_k A_k`` plus each client's rank-r_k
factors (``fedlora.lowrank.truncate``), factored path (QR of the stacked factors + an R×R SVD, R = Σ r_k) against the
dense path (form ΔW, SVD of d_out×d_in), float32, random seeded factors, s_k = 16/r_k, data-size weights p_k.

    python bench/aggregate.py [--threads N] [--dense-modules 2] [--quick]

(a) SmolLM2-135M shapes, 30 layers × q,k,v,o,gate,up,down, 3 clients: both paths on every module.
(b) LLaMA-7B shapes, 32 layers × q,k,v,o (4096×4096), 10 clients: the factored path on every module, the dense path
    (tens of seconds per module on a small CPU) on the first ``--dense-modules`` only; its total is extrapolated.
    The speedup is the ratio of per-module means on the modules where both paths ran.
The relative errors compare the two paths' products (each client's s_k·B_k'A_k', and U·diag(S)·Vh), max over modules.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from machine import cpu_flags, cpu_model

from fedlora.lowrank import relative_error, svd_of_weighted_sum, truncate

ALPHA = 16.0
SMOL = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
        "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
LLAMA = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096)}
SETTINGS = {  # name: (module shapes, layers, client ranks)
    "smollm2-135m": (SMOL, 30, (2, 8, 16)),
    "llama-7b": (LLAMA, 32, (8, 8, 16, 16, 24, 32, 32, 48, 64, 64)),
}


def _factors(shape, ranks, seed):
    """Random client factors for one module (B ~ N(0,1), A ~ N(0, 1/d_in))."""
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    Bs = [torch.randn(d_out, r, generator=g) for r in ranks]
    As = [torch.randn(r, d_in, generator=g) / d_in ** 0.5 for r in ranks]
    return Bs, As


def _aggregate(Bs, As, p, ranks, path):
    """One module's server step: SVD of Σ p_k s_k B_k A_k, then every client's rank-r_k factors."""
    U, S, Vh = svd_of_weighted_sum(Bs, As, [pk * ALPHA / r for pk, r in zip(p, ranks)], path=path)
    return (U, S, Vh), [truncate(U, S, Vh, r, ALPHA / r) for r in ranks]


def _timed(Bs, As, p, ranks, path):
    t0 = time.perf_counter()
    out = _aggregate(Bs, As, p, ranks, path)
    return time.perf_counter() - t0, out


def _errors(out_f, out_d, ranks) -> tuple[float, float]:
    """(max over clients of the relerr of s_k·B_k'A_k', relerr of U·diag(S)·Vh): factored against dense."""
    (Uf, Sf, Vhf), red_f = out_f
    (Ud, Sd, Vhd), red_d = out_d
    client = max(relative_error(ALPHA / r * Bf @ Af, ALPHA / r * Bd @ Ad)
                 for r, (Bf, Af), (Bd, Ad) in zip(ranks, red_f, red_d))
    return client, relative_error((Uf * Sf) @ Vhf, (Ud * Sd) @ Vhd)


def run_setting(name, layers, dense_modules, seed):
    shapes, _, ranks = SETTINGS[name]
    modules = [(f"layers.{i}.{m}", shape) for i in range(layers) for m, shape in shapes.items()]
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(50, 1000, (len(ranks),), generator=g).double()
    p = (sizes / sizes.sum()).tolist()
    t_fact, t_dense, t_fact_same = [], [], []
    err_client = err_full = 0.0
    for j, (_, shape) in enumerate(modules):
        Bs, As = _factors(shape, ranks, seed * 100_003 + j)
        dt_f, out_f = _timed(Bs, As, p, ranks, "factored")
        t_fact.append(dt_f)
        if j < dense_modules:
            dt_d, out_d = _timed(Bs, As, p, ranks, "dense")
            t_dense.append(dt_d)
            t_fact_same.append(dt_f)
            ec, ef = _errors(out_f, out_d, ranks)
            err_client, err_full = max(err_client, ec), max(err_full, ef)
    return {"modules": len(modules), "ranks": ranks, "t_fact": t_fact, "t_dense": t_dense, "t_fact_same": t_fact_same,
            "speedup": statistics.fmean(t_dense) / statistics.fmean(t_fact_same),
            "err_client": err_client, "err_full": err_full}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--dense-modules", type=int, default=2, help="LLaMA-7B modules on which the dense path is timed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 SmolLM2 layers, 1 LLaMA-7B layer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _aggregate(*_factors((256, 256), (4, 8), 1), [0.5, 0.5], (4, 8), "dense")  # warm-up: LAPACK workspaces
    _aggregate(*_factors((256, 256), (4, 8), 1), [0.5, 0.5], (4, 8), "factored")

    smol_layers, llama_layers = (2, 1) if args.quick else (SETTINGS["smollm2-135m"][1], SETTINGS["llama-7b"][1])
    res = {"smollm2-135m": run_setting("smollm2-135m", smol_layers, 10 ** 9, args.seed)}
    n7 = llama_layers * len(LLAMA)
    res["llama-7b"] = run_setting("llama-7b", llama_layers, min(max(1, args.dense_modules), n7), args.seed)

    print(f"# FlexLoRA server aggregation (SVD of sum p_k s_k B_k A_k + rank-r_k redistribution per client), float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}{', QUICK' if args.quick else ''}, "
          f"CPU: {cpu_model()} ({cpu_flags()})")
    print("| setting | clients (ranks) | path | modules timed | s/module (mean) | total s (all modules) |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        label = f"{name} ({r['modules']} modules)"
        clients = f"{len(r['ranks'])} ({','.join(map(str, r['ranks']))})"
        mean_f, mean_d = statistics.fmean(r["t_fact"]), statistics.fmean(r["t_dense"])
        print(f"| {label} | {clients} | factored | {len(r['t_fact'])} | {mean_f:.4f} | {sum(r['t_fact']):.2f} |")
        if len(r["t_dense"]) == r["modules"]:
            total_d = f"{sum(r['t_dense']):.2f}"
        else:
            total_d = f"{mean_d * r['modules']:.1f} (EXTRAPOLATED: mean x {r['modules']})"
        print(f"| {label} | {clients} | dense | {len(r['t_dense'])} | {mean_d:.4f} | {total_d} |")
    print()
    print("| setting | modules with both paths | speedup (dense/factored, mean s/module on those modules) | "
          "max relerr client s_k B_k'A_k' | max relerr U S Vh |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {len(r['t_dense'])} | {r['speedup']:.1f} | {r['err_client']:.1e} | {r['err_full']:.1e} |")
    if len(res["llama-7b"]["t_dense"]) < res["llama-7b"]["modules"]:
        per = ", ".join(f"{d:.2f}s dense / {f:.3f}s factored" for d, f in
                        zip(res["llama-7b"]["t_dense"], res["llama-7b"]["t_fact_same"]))
        print(f"llama-7b per-module times where both ran: {per}")
    relerr = max(max(r["err_client"], r["err_full"]) for r in res.values())
    print(f"speedup_7b={res['llama-7b']['speedup']:.1f} relerr={relerr:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
