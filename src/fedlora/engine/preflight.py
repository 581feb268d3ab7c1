"""Model checks before any model loads: the LoRA target modules exist and every client's rank fits them, read from
the weight files' headers (safetensors stores each tensor's name and shape in a JSON header; no weight is read).

A model this cannot see without loading (a hub id, a ``.bin`` checkpoint, a GGUF model not converted yet) is checked
as before, when it loads (:func:`fedlora.lora.target_shapes`)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from fedlora.errors import ModelError
from fedlora.lora import check_ranks
from fedlora.ranks import describe_config, module_ranks


def header_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """``tensor name -> shape`` from every ``*.safetensors`` file of ``folder`` (headers only); None if it has none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise ModelError(f"{path} is not a readable safetensors file: {exc}") from None
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def rank_configs_of(cfg) -> list[tuple[int, int]]:
    """The (attention, MLP) rank configurations the clients will use, as far as the config alone says: all of them
    for ``homogeneous`` and ``explicit`` ranks (the smallest only, for a method that gives every client the smallest),
    none for a drawn distribution (which types are drawn depends on the partition: checked after it)."""
    from fedlora.methods import get_method
    from fedlora.ranks import rank_pair, smallest_config

    lo = cfg.lora
    if lo.rank_distribution == "homogeneous":
        return [(lo.rank, lo.rank)]
    if lo.rank_distribution != "explicit":
        return []
    configs = [rank_pair(e) for e in lo.client_ranks]
    return configs if get_method(cfg.method).heterogeneous_ranks else [smallest_config(configs)]


def preflight_model(cfg, rank_configs=None) -> None:
    """Raise :class:`ModelError` for a target module no linear weight matches, or a rank above a module's size
    (``rank_configs``: default :func:`rank_configs_of`)."""
    from fedlora.models import local_model_folder

    rank_configs = rank_configs_of(cfg) if rank_configs is None else rank_configs

    folder = local_model_folder(cfg.model)
    shapes = header_shapes(folder) if folder is not None else None
    if not shapes:
        return
    weights = {name[: -len(".weight")]: shape for name, shape in shapes.items()
               if name.endswith(".weight") and len(shape) == 2}
    present = {n.rsplit(".", 1)[-1] for n in weights}
    missing = [t for t in cfg.lora.target_modules if t not in present]
    if missing:
        linear = sorted(p for p in present if "embed" not in p)
        raise ModelError(f"lora.target_modules {missing} match no linear module of this model; linear module names "
                         f"include: {', '.join(linear[:20])}")
    targets = {n: (s[0], s[1]) for n, s in weights.items() if n.rsplit(".", 1)[-1] in cfg.lora.target_modules}
    for config in sorted(set(rank_configs)):
        what = "lora.rank" if cfg.lora.rank_distribution == "homogeneous" else f"client rank type {describe_config(config)}"
        check_ranks(targets, module_ranks(config, targets, cfg.lora.mlp_modules), what)
