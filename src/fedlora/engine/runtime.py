"""The loaded runtime of a run: the frozen base model shared by every simulated client, the LoRA slots per rank
configuration, the controllable base weights, every client's (lazily tokenised) examples and the evaluation set."""
from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.adapters import Adapter, LoraModule
from fedlora.client import fast_bf16
from fedlora.engine.prepare import Prepared
from fedlora.errors import ConfigError
from fedlora.layers import block_index
from fedlora.methods import get_method
from fedlora.methods.base import FederationSpec
from fedlora.models import (AdapterPool, BaseWeights, WeightFile, add_lora_cores, check_ranks, inject_lora,
                            resolve_model_path, target_shapes)
from fedlora.ranks import describe_config, module_ranks
from fedlora.robust import with_robust


def adapter_fits(adapter: Adapter, ranks: dict[str, int]) -> bool:
    """True when ``adapter``'s per-module ranks are exactly ``ranks`` (it loads into those LoRA slots as it is)."""
    return {n: m.rank for n, m in adapter.modules.items()} == ranks


INITIAL_CACHE_PARAMETERS = 8_000_000  # cached fresh initial adapters: 32 MB of fp32 at most; a larger one is not kept


@dataclass
class Engine:
    """The loaded model and what the round loop needs beside the method: adapters per rank configuration, the
    controllable base weights, every client's examples and the global evaluation set."""

    prepared: Prepared
    tokenizer: object
    model: object
    pool: AdapterPool
    base: BaseWeights
    spec: FederationSpec
    task_type: str
    client_train: object
    client_val: object
    global_val: object
    client_states: object = None
    """In-process engine: what clients keep between rounds (:class:`fedlora.engine.client_state.ClientStates`)."""
    _initial_cache: dict = field(default_factory=dict)
    _templates: dict = field(default_factory=dict)

    @property
    def default_ranks(self) -> dict[str, int]:
        """Per module, the largest rank any client trains at: the ranks of the model's LoRA layers (from the spec,
        the one source of the clients' ranks)."""
        return self.spec.global_ranks()

    def initial_for(self, ranks: dict[str, int], seed: int | None) -> Adapter:
        """The fresh initial adapter at these ranks (seeded), cached most-recently-used first within
        :data:`INITIAL_CACHE_PARAMETERS` parameters, so that a population with many rank configurations does not
        keep one full adapter per configuration."""
        key = (tuple(sorted(ranks.items())), seed)
        cache = self._initial_cache
        if key in cache:
            cache[key] = cache.pop(key)  # most recent last
            return cache[key]
        adapter = self.spec.initial(ranks=ranks, seed=seed)
        if adapter.num_parameters() <= INITIAL_CACHE_PARAMETERS:
            cache[key] = adapter
            while sum(a.num_parameters() for a in cache.values()) > INITIAL_CACHE_PARAMETERS:
                cache.pop(next(iter(cache)))
        return adapter

    def template_for(self, ranks: dict[str, int]) -> Adapter:
        """An adapter of these ranks with storage-less (``meta``) tensors: keys, shapes and dtypes for checking
        uploads, at no memory cost."""
        key = tuple(sorted(ranks.items()))
        if key not in self._templates:
            init = self.spec.initial(ranks=ranks)
            self._templates[key] = Adapter(
                {n: LoraModule(m.A.to("meta"), m.B.to("meta"), m.alpha, None if m.R is None else m.R.to("meta"))
                 for n, m in init.modules.items()},
                {k: v.to("meta") for k, v in init.head.items()})
        return self._templates[key]


def build_method(cfg, spec: FederationSpec):
    """The run's method, as every engine builds it: the registered method with its config sections and the
    federation spec, inside the robust wrapper when ``robust.*`` asks for one (:func:`fedlora.robust.with_robust`)."""
    return with_robust(get_method(cfg.method)(cfg, spec), cfg.robust)


def build_engine(prepared: Prepared, log=print) -> Engine:
    """Load the base model once, wrap it with LoRA at the global ranks and tokenise (lazily) every client's data."""
    cfg, task = prepared.cfg, prepared.task
    tokenizer, base_model = task.load_model(cfg, zero_head_ok=not get_method(cfg.method).scores_layers_by_gradient,
                                            log=log)
    task_type = task.task_type
    if cfg.train.gradient_checkpointing:  # non-reentrant: works with a frozen base; dropout masks are replayed
        base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shapes = target_shapes(base_model, cfg.lora)
    client_ranks = {k: module_ranks(c, shapes, cfg.lora.mlp_modules) for k, c in enumerate(prepared.rank_configs)}
    for config in sorted(set(prepared.rank_configs)):
        what = "lora.rank" if cfg.lora.rank_distribution == "homogeneous" else f"client rank type {describe_config(config)}"
        check_ranks(shapes, module_ranks(config, shapes, cfg.lora.mlp_modules), what)
    global_ranks = {n: max(r[n] for r in client_ranks.values()) for n in shapes}
    alpha_per_rank = get_method(cfg.method).alpha_per_rank(cfg)
    model = inject_lora(base_model, cfg.lora, task_type, ranks=global_ranks, alpha_per_rank=alpha_per_rank)
    core = get_method(cfg.method).lora_core
    if core:  # an r x r core between the factors of every LoRA module (Fed-SB)
        add_lora_cores(model)
    pool = AdapterPool(model, cfg.lora, task_type, alpha_per_rank=alpha_per_rank)
    slots = pool.slots(global_ranks)
    spec = FederationSpec(slots.shapes, client_ranks, cfg.lora.alpha, cfg.seed, head=slots.head(),
                          alpha_per_rank=alpha_per_rank, core=core)
    if get_method(cfg.method).needs_memory_model:
        _attach_memory_model(spec, model, prepared, task_type, log)
    if cfg.train.precision == "bf16" and not fast_bf16(next(model.parameters()).device.type):
        log("warning: train.precision = bf16 on a CPU without AVX512-BF16 or AMX: its bfloat16 matmuls are emulated "
            "and much slower than fp32 (30x on the demo, docs/benchmarks.md)")
    client_train, client_val, global_val = task.client_examples(tokenizer, prepared, cfg.model.max_length)
    if cfg.attack.kind != "none":  # the clients' side applies it (fedlora.attack, engine.client_round.start_client)
        log(f"attack (simulation): client(s) {', '.join(map(str, cfg.attack.clients))} are malicious: {cfg.attack.kind}")
    base = BaseWeights(model, WeightFile.of_model(resolve_model_path(cfg.model.name, cfg.model)))
    return Engine(prepared, tokenizer, model, pool, base, spec, task_type, client_train, client_val, global_val)


def _attach_memory_model(spec: FederationSpec, model, prepared: Prepared, task_type: str, log) -> None:
    """Layer groups, the (calibrated) memory model of one training step and every client's budget in bytes."""
    from fedlora.layers import layer_groups
    from fedlora.memory import analytic_activation_bytes, build_memory_model, profile_step

    cfg = prepared.cfg
    spec.layer_groups = layer_groups(spec.shapes)
    blocks = [block_index(group[0]) for group in spec.layer_groups]
    if blocks != list(range(len(blocks))):  # layer j of the memory model must be block j of the model
        raise ConfigError(f"layer-assignment methods need LoRA on every transformer block; lora.target_modules "
                          f"match blocks {blocks[:8]}{'…' if len(blocks) > 8 else ''} only")
    ranks = spec.global_ranks()
    params = [sum(ranks[m] * sum(spec.shapes[m]) for m in group) for group in spec.layer_groups]
    mc = model.base_model.model.config
    hidden = getattr(mc, "hidden_size", 768)
    prior = analytic_activation_bytes(cfg.train.batch_size, cfg.model.max_length, hidden,
                                      getattr(mc, "num_attention_heads", 12),
                                      getattr(mc, "intermediate_size", 4 * hidden))
    measure = None
    if cfg.memory.calibrate:
        log("calibrating the memory model: profiling two training steps in child processes")
        profile = dict(model=cfg.model.name, cache_dir=cfg.model.cache_dir,
                       task_type=task_type,
                       num_labels=getattr(prepared.task, "num_labels", 2),
                       rank=max(ranks.values()),  # the ranks the clients train at (spec), not lora.rank
                       alpha=cfg.lora.alpha,
                       targets=list(cfg.lora.target_modules), batch=cfg.train.batch_size, seq=cfg.model.max_length,
                       threads=1)

        def profiled(layers):
            return profile_step({**profile, "layers": list(layers)})["measured"]

        measure = profiled
    spec.memory = build_memory_model(params, prior, calibrate_with=measure)
    full = spec.memory.predict(range(len(spec.layer_groups)))
    scale = full if cfg.memory.unit == "fraction" else 1e6
    b = cfg.memory.budgets
    spec.budgets = {k: float(b[k % len(b)]) * scale for k in range(len(prepared.clients))}
    log(f"memory model: one step training every layer needs {full / 1e6:.1f} MB above the loaded model "
        f"({'calibrated' if spec.memory.calibrated else 'analytical'}); budgets "
        f"{sorted({round(v / 1e6, 1) for v in spec.budgets.values()})} MB")

