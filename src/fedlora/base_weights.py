"""The frozen base weights a run may change: FLoRA's merged updates and the exact evaluation of a global adapter
whose ranks fit no LoRA slot are added to ``W0`` and restored from the model's own weight file."""
from __future__ import annotations

from pathlib import Path

import torch

from fedlora.errors import ModelError


class WeightFile:
    """Read-only access to the tensors of a model's safetensors file(s), one tensor at a time, straight into a
    caller's buffer: the header is parsed once, and a tensor is ``pread`` from its byte range, so restoring a base
    weight costs no second copy of the model in memory.  Handles a single ``model.safetensors`` and a sharded
    ``model.safetensors.index.json``."""

    _DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}

    def __init__(self, files: list[Path]):
        import json
        import struct

        self.entries: dict[str, tuple[Path, int, int, torch.dtype, tuple[int, ...]]] = {}
        for path in files:
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for key, info in header.items():
                if key == "__metadata__" or info.get("dtype") not in self._DTYPES:
                    continue
                begin, stop = info["data_offsets"]
                self.entries[key] = (Path(path), 8 + size + begin, stop - begin, self._DTYPES[info["dtype"]],
                                     tuple(info["shape"]))

    @classmethod
    def of_model(cls, path: str | None) -> "WeightFile | None":
        """The weight files of a model directory, or of a hub id already in the local cache; ``None`` when there
        are none in safetensors form (the caller then keeps copies in memory)."""
        if not path:
            return None
        folder = Path(path)
        if not folder.is_dir():
            try:
                from huggingface_hub import try_to_load_from_cache

                found = try_to_load_from_cache(path, "model.safetensors")
            except Exception:  # noqa: BLE001 - no cache, offline, odd id: fall back to copies
                return None
            return cls([Path(found)]) if isinstance(found, str) else None
        if (folder / "model.safetensors").is_file():
            return cls([folder / "model.safetensors"])
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            import json

            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([folder / shard for shard in shards])
        return None

    def key_for(self, module_name: str, shape: tuple[int, ...]) -> str | None:
        """The file key of ``module_name``'s weight: the full name, or the name without leading components (a
        task model, ``bert.encoder…``, loaded from a bare encoder's file, ``encoder…``), with the same shape."""
        parts = (module_name + ".weight").split(".")
        for i in range(len(parts) - 1):
            key = ".".join(parts[i:])
            if key in self.entries and self.entries[key][4] == tuple(shape):
                return key
        return None

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """``out[...] = tensor(key)``, cast to ``out``'s dtype (exact for the widening casts a model load does)."""
        path, offset, nbytes, dtype, shape = self.entries[key]
        target = out if dtype == out.dtype and out.is_contiguous() else torch.empty(shape, dtype=dtype)
        view = memoryview(target.detach().view(torch.uint8).numpy()).cast("B")
        if len(view) != nbytes:
            raise ModelError(f"{path}: {key} has {nbytes} bytes, expected {len(view)}")
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(view) != nbytes:
                raise ModelError(f"{path}: truncated while reading {key}")
        if target is not out:
            out.copy_(target)


class BaseWeights:
    """Exact control of the frozen weights of the LoRA-wrapped modules: ``W = W0 + delta``.

    FLoRA merges every round's stacked update into the base (docs/methods.md §12), and a global adapter whose ranks
    differ from every client's (FlexLoRA's full-size ΔW) is evaluated merged.  Every :meth:`set` rewrites a touched
    module as ``W0 + delta`` from the pristine ``W0``, so no rounding accumulates over rounds and a resumed run sees
    bit-identical weights.  ``W0`` is read back from the model's safetensors file (``source``) when the file holds
    exactly the loaded weights, checked the first time a module is touched; otherwise (no file, a transformed
    weight) a copy is kept in memory.  Reading from the file is what keeps a full-size merge (FlexLoRA at
    SmolLM2 scale: 425 MB of deltas) from also holding a second copy of every base weight.
    """

    def __init__(self, peft_model, source: "WeightFile | None" = None):
        self.layers = {}
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_base_layer") and hasattr(module, "lora_A"):
                self.layers[name] = module.get_base_layer()
        self.source = source
        self.pristine: dict[str, torch.Tensor] = {}  # modules whose W0 is kept in memory
        self.from_file: dict[str, str] = {}  # module → key in ``source``
        self.modified: set[str] = set()  # modules currently holding W0 + delta

    @torch.no_grad()
    def _remember(self, name: str) -> None:
        if name in self.pristine or name in self.from_file:
            return
        weight = self.layers[name].weight
        key = self.source.key_for(name, tuple(weight.shape)) if self.source is not None else None
        if key is not None:
            probe = torch.empty_like(weight)
            self.source.read_into(key, probe)
            if torch.equal(probe, weight):
                self.from_file[name] = key
                return
        self.pristine[name] = weight.detach().clone()

    @torch.no_grad()
    def _restore(self, name: str) -> None:
        weight = self.layers[name].weight
        if name in self.from_file:
            self.source.read_into(self.from_file[name], weight.data)
        else:
            weight.copy_(self.pristine[name])

    @torch.no_grad()
    def set(self, delta=None) -> None:
        """``W = W0 + delta[name]`` for the modules in ``delta`` (any mapping; a lazy one is read one module at a
        time); every other modified module goes back to ``W0``."""
        delta = delta if delta is not None else {}
        names = list(delta)
        for name in names:
            if name not in self.layers:
                raise ModelError(f"cannot merge into {name!r}: not a LoRA-wrapped module")
        for name in names:
            self._remember(name)
            self._restore(name)
            weight = self.layers[name].weight
            weight.add_(delta[name].to(weight.dtype))
        wanted = set(names)
        for name in sorted(self.modified - wanted):
            self._restore(name)
        self.modified = wanted
