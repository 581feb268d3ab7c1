"""Typed experiment configuration: TOML file + ``--set key=value`` overrides, validated at the door.

Every field carries ``help`` metadata (shown by ``fedlora info --config``) and the resolved configuration is written
to each run directory as ``config.toml``, so a run describes itself.  Validation happens before any data or model is
loaded; each error names the key, the value and what would be valid::

    >>> cfg = load_config(None, ["lora.rank=4", "rounds=2"])
    >>> cfg.lora.rank, cfg.rounds
    (4, 2)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from fedlora.config_checks import validate
from fedlora.config_fields import (AttackConfig, FedExConfig, FedSBConfig, FedSVDConfig, FlexLoraConfig, FloraConfig,
                                   HetLoraConfig, LoRAFAIRConfig, PilotConfig, SecureConfig, TrackConfig, TrainConfig,
                                   _f)
from fedlora.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = _f("minilm", "Base model: a bundled alias ('minilm'), a Hugging Face model id, or a local directory.")
    max_length: int = _f(48, "Maximum number of tokens per example (longer inputs are truncated).")
    threads: int = _f(0, "torch CPU threads (0 = leave torch's default).")
    pooling: str = _f("auto", "Classification: what the head reads. 'mean' (masked mean of the token states, "
                      "L2-normalised: what a sentence encoder such as the bundled MiniLM was trained to produce), "
                      "'cls' (first token, L2-normalised), 'pooler' (the model's own head, e.g. BERT's tanh pooler) "
                      "or 'auto' (the pooling a local sentence-transformers folder declares, else 'pooler'). "
                      "Recorded in the adapter folder (fedlora.json); reload with fedlora.load_adapter.",
                      choices=("auto", "mean", "cls", "pooler"))
    head_init: str = _f("auto", "Classification head init: 'zero', 'random' (the model's own, seeded) or 'auto' "
                        "(zero with 'mean'/'cls' pooling, else random; random for Fed-piLot, whose IG-Score is a gradient norm "
                        "that a zero head makes zero at B = 0).", choices=("auto", "zero", "random"))
    cache_dir: str = _f("", "Where converted models (GGUF -> safetensors) are cached; '' = $FEDLORA_CACHE or "
                        "~/.cache/fedlora.")


@dataclass
class LoraConfig:
    rank: int = _f(8, "LoRA rank r.")
    alpha: float = _f(16.0, "LoRA alpha; the scaling is s = alpha / rank (choice P2, docs/oracles.md).")
    dropout: float = _f(0.0, "Dropout on the LoRA input.")
    target_modules: list = _f(["query", "value"], "Names (suffixes) of the linear modules that get LoRA.")
    head: str = _f("aggregate", "Task head: 'aggregate' (trained and averaged) or 'frozen' (kept at its seeded init).",
                   choices=("aggregate", "frozen"))
    rank_distribution: str = _f("homogeneous", "Client LoRA ranks: 'homogeneous' (everyone lora.rank), a FlexLoRA "
                                "resource distribution over lora.rank_types ('uniform', 'heavy_tail_light', 'normal' "
                                "(the intended bell: the middle types most likely), 'normal_code' (FlexLoRA's code "
                                "read literally: the extreme types most likely), 'heavy_tail_strong'), or 'explicit' "
                                "(lora.client_ranks).",
                                choices=("homogeneous", "uniform", "heavy_tail_light", "normal", "normal_code",
                                         "heavy_tail_strong", "explicit"))
    rank_types: list = _f([[8, 8], [30, 30], [30, 200], [200, 200]],
                          "Configuration types as [attention rank, MLP rank], in FlexLoRA's order (r8, r30, r30/200, "
                          "r200); scale them to the model (FlexLoRA's are for a 2048-wide LLaMA).")
    client_ranks: list = _f([], "explicit only: one entry per client, a rank or [attention rank, MLP rank].")
    mlp_modules: list = _f(["gate_proj", "up_proj", "down_proj", "fc1", "fc2", "intermediate.dense"],
                           "Target modules whose name ends with one of these get the MLP rank; the rest the attention "
                           "rank.")


@dataclass
class DataConfig:
    train: str = _f("bundled:sst2/train", "Training data: 'bundled:NAME/SPLIT', a .jsonl/.jsonl.gz/.csv/.parquet "
                    "file, or 'hf:DATASET_ID[:CONFIG]:SPLIT' (needs a network).")
    validation: str = _f("bundled:sst2/validation", "Validation data (server-side evaluation), same forms as train.")
    text_column: str = _f("sentence", "Column with the input text.")
    text_pair_column: str = _f("", "Second text column for sentence-pair tasks ('' for single-sentence tasks).")
    label_column: str = _f("label", "Column with the class label (int or string).")
    labels: list = _f([], "Class labels in order; [] infers the sorted distinct training labels.")
    max_train_examples: int = _f(0, "Use a seeded random subset of this many training rows (0 = all).")
    max_eval_examples: int = _f(0, "Use a seeded random subset of this many validation rows (0 = all).")
    holdout: int = _f(0, "Classification: carve this many seeded training rows out as the validation set (data."
                      "validation is then not read): tune hyperparameters without looking at the real validation "
                      "split. 0 = off.")
    task: str = _f("classification", "'classification' (text -> label) or 'instruction' (causal-LM instruction "
                   "tuning, Alpaca template, Rouge-L).", choices=("classification", "instruction"))
    instruction_column: str = _f("definition", "instruction only: column with the task instruction.")
    input_column: str = _f("input", "instruction only: column with the input ('' or missing = no input).")
    output_column: str = _f("output", "instruction only: column with the reference response.")
    client_column: str = _f("task_id", "Column naming each row's owner/task, for clients.partition = 'by_task'.")
    instructions: str = _f("", "instruction only: optional JSONL file with one row per task (client_column and "
                           "instruction_column), joined onto rows that lack the instruction column.")
    loss_on: str = _f("all", "instruction only: train on 'all' tokens (FlexLoRA) or the 'response' only.",
                      choices=("all", "response"))


@dataclass
class ClientsConfig:
    num: int = _f(8, "Number of clients the training data is split across (by_task: a seeded subset of this many "
                  "tasks; 0 = every task).")
    fraction: float = _f(1.0, "Fraction of clients sampled each round (at least one).")
    partition: str = _f("dirichlet", "How data is split: 'iid', 'dirichlet' (label skew), 'label_skew' "
                        "(FFA-LoRA's fixed label proportions) or 'by_task' (one client per data.client_column "
                        "value).", choices=("iid", "dirichlet", "label_skew", "by_task"))
    heldout_tasks: int = _f(0, "by_task only: tasks (seeded choice) kept out of training; their validation rows are "
                            "the unseen-task evaluation set (FlexLoRA's headline metric).")
    dirichlet_alpha: float = _f(0.5, "Concentration of the Dirichlet label-skew partition.")
    proportions: list = _f([], "label_skew only: per-client class proportions, e.g. [[0.1,0.9],[0.9,0.1],[0.5,0.5]]; "
                           "[] uses FFA-LoRA's defaults for 3 clients.")
    val_fraction: float = _f(0.1, "Fraction of each client's data held out for per-client evaluation.")
    min_examples: int = _f(4, "Every client must end up with at least this many training examples.")


@dataclass
class DPConfig:
    enabled: bool = _f(False, "Per-client sample-level DP-SGD (Opacus).")
    epsilon: float = _f(0.0, "Target epsilon over the whole run (calibrates sigma), or the budget a given "
                        "noise_multiplier must stay within; 0 = none.")
    delta: float = _f(1e-5, "Target delta.")
    noise_multiplier: float = _f(0.0, "Gaussian noise multiplier sigma; 0 = calibrate from epsilon.")
    clip: float = _f(1.0, "Per-example gradient clipping norm C.")
    secure_rng: bool = _f(False, "Use Opacus' cryptographically secure noise (not reproducible).")


@dataclass
class RobustConfig:
    aggregation: str = _f("mean", "How averaged tensors are merged: 'mean' (data-weighted FedAvg), 'median' "
                          "(coordinate-wise) or 'trimmed_mean'.", choices=("mean", "median", "trimmed_mean"))
    trim_fraction: float = _f(0.1, "trimmed_mean: fraction of clients dropped at each end, per coordinate.")
    norm_bound: float = _f(0.0, "Scale each client's update (uploaded minus sent) to at most this L2 norm; 0 = off.")
    max_update_mb: float = _f(0.0, "Reject uploads larger than this many MB; 0 = twice the size the plan implies.")


@dataclass
class ServerConfig:
    optimizer: str = _f("fedavg", "Server optimiser on the averaged update (Reddi et al., ICLR 2021): 'fedavg' (adopt the "
                        "average; with server.lr != 1 a step along it), 'fedavgm' (server momentum), 'fedadam', "
                        "'fedyogi', 'fedadagrad'. Methods whose aggregate is an average only (fedit, ffa).",
                        choices=("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"))
    lr: float = _f(0.0, "Server step size eta; 0 = the optimiser's usual step (1 for fedavg/fedavgm, 1e-2 for the "
                   "adaptive ones).")
    momentum: float = _f(0.9, "fedavgm: server momentum beta.")
    beta1: float = _f(0.9, "fedadam/fedyogi/fedadagrad: first-moment decay beta1.")
    beta2: float = _f(0.99, "fedadam/fedyogi: second-moment decay beta2.")
    eps: float = _f(1e-3, "fedadam/fedyogi/fedadagrad: adaptivity tau (the paper's experiments mostly use 1e-3).")


@dataclass
class EvalConfig:
    every: int = _f(1, "Evaluate the global model every N rounds (and always after the last).")
    per_client: bool = _f(True, "Also evaluate the global model on each client's local validation split.")
    max_client_examples: int = _f(100, "Evaluate each client on at most this many of its local validation rows "
                                  "(a seeded subset; 0 = all).")
    max_new_tokens: int = _f(32, "instruction only: greedy generation length for generated Rouge-L.")
    generate_every: int = _f(0, "instruction only: generate (Rouge-L on text) every N rounds; 0 = after the last "
                             "round only. Teacher-forced Rouge-L is computed at every evaluation.")


@dataclass
class MemoryConfig:
    budgets: list = _f([], "Client memory budgets for layer-assignment methods (pilot, fedra, randk, topk): training "
                       "memory above the loaded model, in memory.unit. As many entries as clients (one each), or fewer "
                       "groups that clients are assigned to in turn (client k gets budgets[k % len]).")
    unit: str = _f("fraction", "'fraction' (of the predicted memory of training every layer) or 'mb'.",
                   choices=("fraction", "mb"))
    calibrate: bool = _f(True, "Profile two training steps of the real model in child processes to calibrate the "
                         "memory model (else the analytical prior alone).")
    position_aware: bool = _f(False, "Layer costs for pilot and topk. false (default) = the paper's additive "
                              "knapsack, c_j = G_j + Act(j) (LoRA gradient and AdamW state of layer j plus the "
                              "activations from block j up): an over-estimate, always feasible, and the IG-Score "
                              "trades layers off. true = our exact extension, M_step + sum G_j + Act(earliest trained "
                              "block): with LoRA it makes the knapsack pick the longest suffix of blocks that fits "
                              "whatever the IG-Score, i.e. the same blocks as topk. Either way a budget that fits "
                              "every layer trains every layer.")
    knapsack_unit_mb: float = _f(0.25, "Costs are rounded up to multiples of this (MB) in the knapsack.")
    smallest_for_all: bool = _f(False, "Baseline: every client gets the smallest budget (what the weakest can train).")


@dataclass
class ExperimentConfig:
    method: str = _f("ffa", "Federated method (see `fedlora info`).")
    rounds: int = _f(14, "Number of federated rounds.")
    seed: int = _f(0, "Seed for data partitioning, LoRA init, client sampling, training and DP noise.")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    flexlora: FlexLoraConfig = field(default_factory=FlexLoraConfig)
    hetlora: HetLoraConfig = field(default_factory=HetLoraConfig)
    flora: FloraConfig = field(default_factory=FloraConfig)
    fedex: FedExConfig = field(default_factory=FedExConfig)
    fedsvd: FedSVDConfig = field(default_factory=FedSVDConfig)
    lorafair: LoRAFAIRConfig = field(default_factory=LoRAFAIRConfig)
    fedsb: FedSBConfig = field(default_factory=FedSBConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    pilot: PilotConfig = field(default_factory=PilotConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)


# --------------------------------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------------------------------

def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotated type, allowing int -> float; raise a ConfigError naming the key."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str) and value.lower() in ("inf", "+inf"):
        return math.inf
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, float),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
    }[typ](value)
    if not ok:
        raise ConfigError(f"{key} must be of type {typ.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    hints = _section_types(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys here: {', '.join(sorted(names))}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; set its keys, e.g. {full}.{fields(typ)[0].name}=...")
            _apply(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, typ))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --set method=fedit
    return key.split("."), value


_PATH_KEYS = {"data": ("train", "validation", "instructions"), "model": ("name", "cache_dir"), "track": ("mlflow",)}


def _absolute_paths(data: dict, base: Path) -> None:
    """Make the local paths of ``data`` absolute against ``base`` (the config file's folder, or the working directory
    for ``--set``), so that a saved config.toml works from anywhere.  Data sources ``bundled:``/``hf:`` and model
    aliases or hub ids are left alone; ``model.name`` counts as a path when it exists there or starts with ``.``.  A
    file path missing beside the config but present in the working directory is taken from there (older configs)."""
    for section, keys in _PATH_KEYS.items():
        values = data.get(section)
        for key in keys if isinstance(values, dict) else ():
            v = values.get(key)
            if key == "mlflow" and isinstance(v, str) and v.startswith("sqlite:///") and v[10:11] != "/":
                values[key] = "sqlite:///" + os.path.normpath(base / v[10:])  # a relative SQLite store
                continue
            if key == "mlflow" or not isinstance(v, str) or not v or v.startswith(("bundled:", "hf:")):
                continue
            path = Path(v).expanduser()
            if key == "name" and not (v.startswith(".") or (base / path).exists() or path.is_absolute()):
                continue
            root = base
            if not path.is_absolute() and not (base / path).exists() and path.exists():
                root = Path.cwd()  # a config written when paths were read from the working directory
            values[key] = os.path.normpath(path if path.is_absolute() else root / path)


def from_toml(text: str, where: str = "config") -> ExperimentConfig:
    """Defaults <- the TOML ``text``, then :func:`validate` (no overrides)."""
    cfg = ExperimentConfig()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    _apply(cfg, data)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults <- TOML file <- ``--set`` overrides, then :func:`validate`."""
    cfg = ExperimentConfig()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        _absolute_paths(data, p.absolute().parent)  # paths in a config file are relative to that file
        _apply(cfg, data)
    return _overridden(cfg, overrides or [])


def with_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A validated copy of ``cfg`` with ``KEY=VALUE`` overrides applied (``cfg`` itself is not changed)."""
    return _overridden(copy.deepcopy(cfg), overrides)


def _overridden(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    for item in overrides:
        parts, value = _parse_override(item)
        nested: dict = {}
        cursor = nested
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _absolute_paths(nested, Path.cwd())  # --set paths: relative to the working directory
        _apply(cfg, nested)
    validate(cfg)
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(cfg: ExperimentConfig) -> str:
    """Serialise the resolved config; ``load_config`` of the result gives back an equal config."""
    d = to_dict(cfg)
    top = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    parts = ["\n".join(top)]
    for k, v in d.items():
        if isinstance(v, dict):
            parts.append(f"[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()))
    return "\n\n".join(parts) + "\n"


def describe(cls: type = ExperimentConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, help) for every field, for `fedlora info`."""
    rows = []
    default = cls()
    for f in fields(cls):
        if dataclasses.is_dataclass(f.type if not isinstance(f.type, str) else _section_types(cls)[f.name]):
            rows.extend(describe(_section_types(cls)[f.name], f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", getattr(default, f.name), f.metadata.get("help", "")))
    return rows
