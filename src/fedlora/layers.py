"""LoRA *layers* for layer-assignment methods (Fed-piLot, FedRA): one layer = the LoRA modules of one transformer
block (algorithms.md §3.6, "layer granularity": the block, as the Fed-HeLLo code indexes by block number).

Block indices are read from module names (``bert.encoder.layer.3.attention.self.query`` -> 3,
``model.layers.12.self_attn.q_proj`` -> 12): the first dotted component that is an integer.
"""
from __future__ import annotations


def block_index(module_name: str) -> int:
    for part in module_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"module {module_name!r} has no block index (no integer component in its name)")


def layer_groups(module_names) -> list[list[str]]:
    """Modules grouped by block, blocks in ascending order: ``groups[j]`` is layer j's list of module names."""
    by_block: dict[int, list[str]] = {}
    for name in module_names:
        by_block.setdefault(block_index(name), []).append(name)
    return [sorted(by_block[b]) for b in sorted(by_block)]


def modules_of(layers, groups: list[list[str]]) -> frozenset[str]:
    """The module names of the chosen layer indices."""
    return frozenset(m for j in layers for m in groups[j])
