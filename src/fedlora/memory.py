"""Training-memory model for layer assignment (Fed-piLot, docs/methods.md §14).

Memory is counted *above the loaded, idle model*: what a client needs on top of holding the frozen weights and its
LoRA tensors to run one training step.  For a set S of trained LoRA layers (transformer blocks) with earliest layer
``e = min S``:

    M(S) = M_step + Σ_{j∈S} G_j + Act(e),      G_j = P_j·(b_grad + b_optimiser),   Act(e) = Σ_{j ≥ e} a_j

* ``M_step``: the working set of a step that trains only the last layer, minus that layer's ``G`` and ``a``
  (forward activations of the last block, logits, temporaries);
* ``G_j``: gradients and AdamW state of layer j's LoRA parameters (4 + 8 bytes per fp32 parameter);
* ``a_j``: activations autograd keeps so the gradient can flow back through block j.  Training an early layer
  forces backpropagation through every later block, so the cost is *position-aware* (Fed-piLot v2, Fig. 1): the
  knapsack gets ``Act(e)`` as a prefix cost (:func:`fedlora.knapsack.solve_position_aware`), or, in the paper's
  additive form, ``c_j = G_j + Act(j)`` (an over-estimate: always feasible).

A *sub-model* (FedRA: only the blocks of S run, the others are skipped) needs no activations for the skipped blocks
and backpropagates through S only: ``M_sub(S) = M_step + Σ_{j∈S} (G_j + a_j)``
(:meth:`MemoryModel.predict_submodel`).

``a_j`` and ``M_step`` come from an analytical estimate scaled by a calibration: one training step of the real model is
profiled in child processes training only the last layer and only the first layer (peak resident memory above the
idle model, from ``/proc/self/status`` after resetting the high-water mark; on a GPU ``torch.cuda.max_memory_allocated``
would play the same role), which fixes the per-block activation size and ``M_step``.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

GRAD_BYTES = 4
ADAMW_STATE_BYTES = 8


@dataclass
class MemoryModel:
    step_bytes: float
    grad_state_bytes: list[float]
    act_bytes: list[float]
    calibrated: bool = False
    measurements: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.act_bytes)

    def prefix_costs(self) -> list[float]:
        """``Act(e)`` for every possible earliest layer e."""
        out, acc = [0.0] * self.num_layers, 0.0
        for j in reversed(range(self.num_layers)):
            acc += self.act_bytes[j]
            out[j] = acc
        return out

    def predict(self, layers) -> float:
        """Predicted training memory above the idle model for the set ``layers`` (0 when empty: no step)."""
        layers = sorted(set(layers))
        if not layers:
            return 0.0
        return self.step_bytes + sum(self.grad_state_bytes[j] for j in layers) + self.prefix_costs()[layers[0]]

    def predict_submodel(self, layers) -> float:
        """Predicted training memory of the *sub-model* made of the blocks ``layers`` alone (FedRA): the other blocks
        are skipped, so they hold no activations and backpropagation stops at the first kept block;
        ``M_sub(S) = M_step + Σ_{j∈S} (G_j + a_j)``, additive over the blocks (0 when empty: no step).  Never more
        than :meth:`predict` of the same set, equal to it for every layer (or a top run of layers)."""
        layers = sorted(set(layers))
        if not layers:
            return 0.0
        return self.step_bytes + sum(self.grad_state_bytes[j] + self.act_bytes[j] for j in layers)

    def additive_costs(self) -> list[float]:
        """The paper's additive knapsack weights ``c_j = G_j + Act(j)`` (over-estimates, so always feasible)."""
        pre = self.prefix_costs()
        return [g + p for g, p in zip(self.grad_state_bytes, pre)]

    def knapsack_inputs(self) -> tuple[list[float], list[float], float]:
        """(per-layer costs ``G_j``, prefix costs ``Act(e)``, fixed cost ``M_step``) for the position-aware solver."""
        return list(self.grad_state_bytes), self.prefix_costs(), self.step_bytes


def analytic_activation_bytes(batch: int, seq: int, hidden: int, heads: int, intermediate: int,
                              bytes_per_value: int = 4) -> float:
    """Prior for one block's saved activations when only LoRA trains: the attention probabilities and scores
    (2·B·H·L²), and about 8·B·L·h + 2·B·L·f for the projections, normalisations and the MLP non-linearity."""
    return bytes_per_value * (2 * batch * heads * seq * seq + 8 * batch * seq * hidden + 2 * batch * seq * intermediate)


# ------------------------------------------------------------------------------------------------ profiling
def _rss_status() -> tuple[int, int]:
    rss = hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


def release_freed_memory() -> None:
    """Give memory that PyTorch has freed back to the operating system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed heap memory for reuse, so after a client's local work a process's resident size stays at
    that work's peak; a server that simulates hundreds of clients trims after each one, so its resident size is
    what it holds, not the sum of every transient peak and its fragments."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_large_frees_promptly(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes or more (1 MiB) from their own memory maps, so freeing one gives
    it back to the system at once (glibc; a no-op elsewhere).

    By default glibc raises this threshold to the size of the largest block freed so far (up to 32 MiB), after
    which the per-module tensors of an aggregation (FlexLoRA's dense sums, 1–4 MB each at SmolLM2 scale) live in
    the heap and their memory stays with the process once freed.  Set once per process by the simulation engine;
    ``FEDLORA_MALLOC_TUNING=0`` leaves glibc's default."""
    global _LIBC
    import os

    if os.environ.get("FEDLORA_MALLOC_TUNING", "1") == "0":
        return
    release_freed_memory()  # resolves _LIBC
    if _LIBC:
        _LIBC.mallopt(M_MMAP_THRESHOLD, int(threshold))


def reset_peak_rss() -> int:
    """Reset this process's peak-RSS mark and return its current RSS in bytes (0 where /proc is missing)."""
    try:
        _reset_peak()
        return _rss_status()[0]
    except OSError:  # pragma: no cover - no /proc
        return 0


def peak_rss() -> int:
    """This process's peak RSS in bytes since the last :func:`reset_peak_rss` (0 where /proc is missing)."""
    try:
        return _rss_status()[1]
    except OSError:  # pragma: no cover
        return 0


def _reset_peak() -> None:
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as fh:  # "5" resets the peak-RSS high-water mark (Linux >= 4.0)
        fh.write("5")


def _profile_in_process(spec: dict) -> dict:
    import types

    import torch

    from fedlora.layers import layer_groups, modules_of
    from fedlora.models import LoraSlots, inject_lora, load_causal_lm, load_classifier

    torch.set_num_threads(spec.get("threads", 1))
    model_cfg = types.SimpleNamespace(name=spec["model"], cache_dir=spec.get("cache_dir", ""))
    lora_cfg = types.SimpleNamespace(rank=spec["rank"], alpha=spec["alpha"], dropout=0.0,
                                     target_modules=spec["targets"])
    if spec["task_type"] == "CAUSAL_LM":  # the task's PEFT task type says which model family to load
        _, base = load_causal_lm(model_cfg)
    else:
        _, base = load_classifier(model_cfg, spec.get("num_labels", 2), 0)
    model = inject_lora(base, lora_cfg, spec["task_type"])
    slots = LoraSlots.of(model)
    groups = layer_groups(slots.shapes)
    modules = modules_of(spec["layers"], groups)
    params = slots.set_trainable(frozenset({"lora_A", "lora_B"}), modules)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size if hasattr(model, "config") else 1000
    ids = torch.randint(5, vocab - 1, (spec["batch"], spec["seq"]), generator=g)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()
    _reset_peak()
    idle, _ = _rss_status()
    for _ in range(2):  # the second step holds the optimiser state allocated by the first
        out = model(input_ids=ids, attention_mask=mask)
        if params:
            out.logits.float().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        del out
    _, peak = _rss_status()
    return {"idle": idle, "peak": peak, "trained_params": sum(p.numel() for p in params)}


def profile_step(spec: dict, timeout: float = 600) -> dict:
    """Peak resident memory of one training step above the idle loaded model, measured in a fresh child process
    (``python -m fedlora.memory SPEC_JSON``, so nothing the parent allocated counts).  ``spec``: model, task, rank,
    alpha, targets, layers, batch, seq (and optionally threads, cache_dir, num_labels)."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fedlora.memory", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"memory profiling failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    result = json.loads(lines[-1])
    result["measured"] = result["peak"] - result["idle"]
    return result


def build_memory_model(layer_params: list[int], act_prior: float, calibrate_with=None) -> MemoryModel:
    """A :class:`MemoryModel` from per-layer LoRA parameter counts and an activation prior per block;
    ``calibrate_with(layers) -> measured bytes`` (e.g. :func:`profile_step`) fixes ``a`` and ``M_step`` from the
    last-layer-only and first-layer-only steps."""
    n = len(layer_params)
    grad_state = [p * (GRAD_BYTES + ADAMW_STATE_BYTES) for p in layer_params]
    if calibrate_with is None or n < 2:
        return MemoryModel(step_bytes=act_prior, grad_state_bytes=grad_state, act_bytes=[act_prior] * n)
    m_last = calibrate_with([n - 1])
    m_first = calibrate_with([0])
    per_block = max((m_first - m_last - (grad_state[0] - grad_state[-1])) / (n - 1), 0.0)
    step = max(m_last - grad_state[-1] - per_block, 0.0)
    return MemoryModel(step, grad_state, [per_block] * n, calibrated=True,
                       measurements={"last_only": m_last, "first_only": m_first})


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / max(measured, 1.0)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(_profile_in_process(json.loads(sys.argv[1]))))
