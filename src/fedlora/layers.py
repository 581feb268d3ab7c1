"""LoRA *layers* for layer-assignment methods (Fed-piLot, FedRA): one layer = the LoRA modules of one transformer
block (our choice, docs/methods.md §14: the Fed-piLot paper does not say; the Fed-HeLLo code indexes by block number).

Block indices are read from module names (``bert.encoder.layer.3.attention.self.query`` -> 3,
``model.layers.12.self_attn.q_proj`` -> 12): the first dotted component that is an integer.
"""
from __future__ import annotations

from contextlib import contextmanager


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


def block_list(model):
    """``(parent, attribute, blocks)``: the ``nn.ModuleList`` of transformer blocks that holds ``model``'s LoRA
    modules (BERT: ``bert.encoder.layer``; LLaMA: ``model.layers``), found generically as the module named by the
    components before the block index (:func:`block_index`) of every LoRA-wrapped module's name."""
    from torch import nn

    paths = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            parts = name.split(".")
            first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            if first is None:
                raise ValueError(f"LoRA module {name!r} is not inside a block list (no integer in its name)")
            paths.add(".".join(parts[:first]))
    if len(paths) != 1:
        raise ValueError(f"the LoRA modules must lie in exactly one list of blocks, found {sorted(paths) or 'none'}")
    path = paths.pop()
    blocks = model.get_submodule(path)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{path!r} holds the blocks but is a {type(blocks).__name__}, not an nn.ModuleList")
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr, blocks


@contextmanager
def submodel(model, blocks):
    """Inside the ``with``, ``model`` is the *sub-model* made of the blocks ``blocks`` (indices into the block list,
    kept in ascending order): the other blocks are taken out of the block list, so they run neither forward nor
    backward and the hidden state passes straight from one kept block to the next (FedRA).  Embeddings, final norm
    and head stay (no blocks at all: the embeddings feed the head).  The full list (the very same ``nn.ModuleList``)
    is put back on exit, also after an exception.

    Blocks keep their own attributes (a LLaMA attention's ``layer_idx`` stays its full-depth index, which only a
    key/value cache reads; local training runs without one)."""
    from torch import nn

    parent, attr, full = block_list(model)
    keep = sorted(set(int(j) for j in blocks))
    if keep and (keep[0] < 0 or keep[-1] >= len(full)):
        raise ValueError(f"sub-model blocks {keep} are not a subset of 0..{len(full) - 1}")
    # plain attribute swap: nn.Module.__setattr__ re-registers the child, so parameters()/state_dict() see the
    # sub-model while it is in place
    setattr(parent, attr, nn.ModuleList([full[j] for j in keep]))
    try:
        yield model
    finally:
        setattr(parent, attr, full)
