"""Achieved training FLOP/s of fedlora's client loop next to the machine's fp32 matmul peak.

    python bench/throughput.py [--threads N] [--steps 10] [--skip-smollm2]

Peak: the best fp32 dense matmul FLOP/s (``2n³`` per product) over n = 1024, 2048, 3072, 4096 with the same thread
count as training.

Achieved: every client of round 1 trains ``--steps`` local steps through the engine's own client path
(``fedlora.engine.client_round.client_work``: plan, download, LoRA slots, optimiser, upload encoding; evaluation is
not part of it), timed end to end.  The work is counted per micro-batch from the rows the loss function sees:

- every ``nn.Linear`` of the frozen base (attention, MLP, pooler, classifier or LM head; embedding lookups are not
  matmuls and are not counted): ``4 · d_in · d_out`` per token, forward plus the input-gradient backward (the frozen
  weight gets no gradient); a trainable head ``6 · d_in · d_out`` (its weight gradient too);
- every LoRA module of rank r: ``6 · r · (d_in + d_out)`` per token (forward, input and weight gradients);
- attention scores and their weighting (``QKᵀ`` and ``AV``): ``4 · n² · d`` forward per sequence of n tokens and
  layer, ×3 with the backward (both operands are activations): ``12 · n² · d``; a causal model counts the half it
  needs, ``12 · n(n+1)/2 · d``.

*Useful* FLOPs count each sequence at its real length; *computed* FLOPs count the padded batch width the kernels
actually ran on.  ``fraction_of_peak`` is useful FLOP/s over the peak: padding is waste, not throughput.
Workloads: the demo (all-MiniLM-L6-v2, FFA-LoRA r=8 on query/value, 8 clients, batch 16, SST-2 at length 48), the
same under ``train.precision = bf16`` (its FLOP/s are still set against the fp32 peak; the line after the table gives
its time ratio to fp32), and SmolLM2-135M (FedIT, r=8 on q/v, batch 4, the bundled SuperNI tasks at length 96).  Last line ``fraction_of_peak=<x>``
(the demo's).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch import nn
from tqdm.auto import tqdm

from machine import cpu_flags, cpu_model, first_round

from fedlora.engine.client_group import collect_grouped
from fedlora.engine.client_round import client_work
from fedlora.engine.client_state import ClientStates

WORKLOADS = {
    "demo (MiniLM, FFA-LoRA)": [],
    "demo, train.precision=bf16": ['train.precision="bf16"'],
    "SmolLM2-135M (FedIT)": [
        "method=fedit", 'model.name="smollm2"', "model.max_length=96", 'lora.target_modules=["q_proj","v_proj"]',
        'data.task="instruction"', 'data.train="bundled:superni/train"', 'data.validation="bundled:superni/validation"',
        'data.client_column="task_id"', 'data.instruction_column="definition"', 'data.input_column="input"',
        'data.output_column="output"', 'clients.partition="by_task"', "clients.num=3", "clients.heldout_tasks=2",
        "train.batch_size=4", "train.optimizer=\"adamw\"", "train.lr=1e-3", "eval.per_client=false"],
}


def matmul_peak(sizes=(1024, 2048, 3072, 4096), repeats: int = 3) -> tuple[float, int]:
    """Best fp32 ``n×n @ n×n`` FLOP/s over ``sizes`` (after one warm-up product each)."""
    best, best_n = 0.0, 0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            rate = 2 * n ** 3 / (time.perf_counter() - t0)
            if rate > best:
                best, best_n = rate, n
    return best, best_n


class FlopCounter:
    """Per-token and per-sequence FLOPs of one training step of ``model`` (see the module docstring)."""

    def __init__(self, model, causal: bool, head_trained: bool):
        self.per_token = 0
        lora_factors = set()
        for module in model.modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                for name, A in module.lora_A.items():
                    r, d_in = A.weight.shape
                    d_out = module.lora_B[name].weight.shape[0]
                    self.per_token += 6 * r * (d_in + d_out)
                    lora_factors |= {id(A), id(module.lora_B[name])}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or id(module) in lora_factors or "original_module" in name:
                continue  # PEFT's head wrapper keeps an unused frozen copy (original_module) beside the trained one
            head = "modules_to_save" in name
            self.per_token += (6 if head and head_trained else 4) * module.in_features * module.out_features
        cfg = model.config
        self.layers, self.hidden = cfg.num_hidden_layers, cfg.hidden_size
        self.causal = causal
        self.useful = self.computed = 0
        self.tokens = self.padded_tokens = 0

    def attention(self, n: int) -> int:
        pairs = n * (n + 1) // 2 if self.causal else n * n
        return 12 * pairs * self.hidden * self.layers

    def add(self, batch: dict) -> None:
        mask = batch["attention_mask"]
        rows, width = mask.shape
        lengths = mask.sum(dim=1).tolist()
        self.tokens += sum(lengths)
        self.padded_tokens += rows * width
        self.useful += sum(self.per_token * n + self.attention(n) for n in lengths)
        self.computed += rows * (self.per_token * width + self.attention(width))


def run_workload(overrides: list[str], steps: int, group: int = 1) -> dict:
    """Round 1 of the workload's federation, every client, through the engine's client path; FLOPs counted.
    ``group > 1``: also timed through grouped training (``train.client_group``), whose useful work is the same."""
    prepared, eng, method, plans = first_round([*overrides, f"train.local_steps={steps}"])
    cfg = prepared.cfg
    task = prepared.task
    loss = task.loss
    counter = None

    def counted_loss(model, batch):
        if counter is not None:  # None during the warm-up
            counter.add(batch)
        return loss(model, batch)

    task.loss = counted_loss  # instance attribute: the engine reads ``task.loss`` when it builds a client's context
    with tempfile.TemporaryDirectory() as tmp:
        eng.client_states = ClientStates(tmp)
        client_work(eng, plans[0], 1, method)  # warm-up: first-call allocations, thread pools
        counter = FlopCounter(eng.model, causal=cfg.data.task == "instruction", head_trained="head" in plans[0].train)
        t0 = time.perf_counter()
        for plan in plans:
            client_work(eng, plan, 1, method)
        seconds = time.perf_counter() - t0
        grouped = None
        if group > 1:  # the same clients packed through one forward pass: the same useful work, no padding
            cfg.train.client_group = group
            with tqdm(total=len(plans), disable=True) as bar:
                collect_grouped(1, plans, eng, None, method, None, bar, group)  # warm-up
                t0 = time.perf_counter()
                collect_grouped(1, plans, eng, None, method, None, bar, group)
                grouped = time.perf_counter() - t0
    task.loss = loss
    return {"clients": len(plans), "steps": steps, "seconds": seconds, "tokens": counter.tokens,
            "padded_tokens": counter.padded_tokens, "useful": counter.useful, "computed": counter.computed,
            "per_token": counter.per_token, "grouped_seconds": grouped}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=10, help="local steps per client")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-bf16", action="store_true", help="skip the bf16 demo (slow on CPUs that emulate bf16)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peak, peak_n = matmul_peak()
    print(f"# Training throughput, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU: {cpu_model()} ({cpu_flags()})")
    print(f"peak: {peak / 1e9:.1f} GFLOP/s (fp32 matmul, best at n={peak_n})")
    print()
    print("| workload | clients × steps | s | tokens (real / padded) | GFLOP/s useful | GFLOP/s computed | "
          "fraction of peak (useful) |")
    print("|---|---|---|---|---|---|---|")
    first, times, grouped_fraction = None, {}, None
    for name, overrides in WORKLOADS.items():
        if (args.skip_smollm2 and "SmolLM2" in name) or (args.skip_bf16 and "bf16" in name):
            continue
        r = run_workload(overrides, args.steps, group=8 if name.startswith("demo (") else 1)
        times[name] = r["seconds"]
        useful, computed = r["useful"] / r["seconds"], r["computed"] / r["seconds"]
        fraction = useful / peak
        first = fraction if first is None else first
        print(f"| {name} | {r['clients']} × {r['steps']} | {r['seconds']:.1f} | {r['tokens']} / {r['padded_tokens']} "
              f"| {useful / 1e9:.1f} | {computed / 1e9:.1f} | {fraction:.3f} |", flush=True)
        if r["grouped_seconds"]:
            g = r["grouped_seconds"]
            grouped_fraction = r["useful"] / g / peak
            print(f"| {name.replace('demo (', 'demo, train.client_group=8 (')} | {r['clients']} × {r['steps']} | "
                  f"{g:.1f} | {r['tokens']} / {r['tokens']} | {r['useful'] / g / 1e9:.1f} | "
                  f"{r['useful'] / g / 1e9:.1f} (packed: ≈ useful) | {grouped_fraction:.3f} |", flush=True)
    if "demo, train.precision=bf16" in times:
        fp32, bf16 = times["demo (MiniLM, FFA-LoRA)"], times["demo, train.precision=bf16"]
        print(f"bf16 speedup on the demo (fp32 s / bf16 s): {fp32 / bf16:.2f}x")
    if grouped_fraction is not None:
        print(f"the demo with train.client_group=8: fraction of peak {grouped_fraction:.3f}")
    print(f"fraction_of_peak={first:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
