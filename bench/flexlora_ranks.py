"""Does every FlexLoRA client train every rank it holds?  Replays the client sampling and the server's downloads of
``examples/flexlora_superni.toml`` (48 SuperNI clients, 4 a round, ranks r2, r8, r8/56, r56 drawn uniformly) for many
seeds, with random client factors at the config's ranks (no model, no training).

    python bench/flexlora_ranks.py [--seeds 50] [--config examples/flexlora_superni.toml]

A *reception* is one (client, round, attention-or-MLP group) whose rank exceeds the rank of the stored global update
(R = Σ r of the previous round's clients, capped by the module's size).  A *dead component* of a download is an index
i whose row of A and column of B are both zero: its gradient is zero in both factors, so the client never trains it.
The server's configure/aggregate are the real :class:`fedlora.methods.flexlora.FlexLoRA`; the shapes are one
SmolLM2-135M block (every block has the same shapes and ranks, so one block decides).  Last line:
``dead_components=<n> receptions=<m>`` (n counts dead components over all receptions; 0 is the goal).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fedlora.config import load_config
from fedlora.engine.simulation import prepare, sample_clients
from fedlora.methods import get_method
from fedlora.methods.base import FederationSpec, Update
from fedlora.ranks import module_ranks

ROOT = Path(__file__).resolve().parents[1]
SMOL_BLOCK = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.self_attn.k_proj": (192, 576),
              "model.layers.0.self_attn.v_proj": (192, 576), "model.layers.0.self_attn.o_proj": (576, 576),
              "model.layers.0.mlp.gate_proj": (1536, 576), "model.layers.0.mlp.up_proj": (1536, 576),
              "model.layers.0.mlp.down_proj": (576, 1536)}


def dead_components(B: torch.Tensor, A: torch.Tensor) -> int:
    """Indices whose column of B and row of A are both exactly zero."""
    return int(((B.abs().sum(0) == 0) & (A.abs().sum(1) == 0)).sum())


def replay(config: str, seed: int) -> tuple[int, int, list[int]]:
    """(receptions, dead components, dead per reception) of one seed's run."""
    cfg = load_config(config, [f"seed={seed}"])
    prepared = prepare(cfg)
    client_ranks = {k: module_ranks(c, SMOL_BLOCK, cfg.lora.mlp_modules) for k, c in enumerate(prepared.rank_configs)}
    spec = FederationSpec(dict(SMOL_BLOCK), client_ranks, cfg.lora.alpha, cfg.seed)
    method = get_method("flexlora")(cfg, spec)
    state = method.init_state(spec.initial(ranks=spec.global_ranks()))
    g = torch.Generator().manual_seed(seed)
    receptions, dead_total, per = 0, 0, []
    groups: dict[str, list[str]] = {}  # the (0, 1) configuration marks attention modules 0 and MLP modules 1
    for name, is_mlp in module_ranks((0, 1), SMOL_BLOCK, cfg.lora.mlp_modules).items():
        groups.setdefault("mlp" if is_mlp else "attention", []).append(name)
    for t in range(1, cfg.rounds + 1):
        sampled = sample_clients(cfg.seed, t, len(prepared.clients), cfg.clients.fraction)
        plans = method.configure(t, state, sampled)
        if state.extra.get("aggregated"):
            for plan in plans:
                for names in groups.values():
                    if any(plan.ranks[n] > state.adapter.modules[n].rank for n in names):
                        receptions += 1
                        dead = max(dead_components(plan.download[n + ".lora_B.weight"],
                                                   plan.download[n + ".lora_A.weight"]) for n in names)
                        dead_total += dead
                        per.append(dead)
        if t == cfg.rounds:
            break  # no download follows the last aggregation
        updates = []
        for plan in plans:
            tensors = {}
            for name, (d_out, d_in) in SMOL_BLOCK.items():
                r = plan.ranks[name]
                tensors[name + ".lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.01
                tensors[name + ".lora_A.weight"] = torch.randn(r, d_in, generator=g) / d_in ** 0.5
            updates.append(Update(plan.client_id, len(prepared.clients[plan.client_id].train_rows), tensors))
        state = method.aggregate(t, state, updates)
    return receptions, dead_total, per


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--config", default=str(ROOT / "examples" / "flexlora_superni.toml"))
    args = ap.parse_args(argv)
    t0 = time.time()
    receptions = dead = 0
    worst = 0
    for seed in range(args.seeds):
        r, d, per = replay(args.config, seed)
        receptions, dead = receptions + r, dead + d
        worst = max([worst, *per])
    print(f"seeds={args.seeds} wall_s={time.time() - t0:.1f} max_dead_in_one_reception={worst}")
    print(f"dead_components={dead} receptions={receptions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
