"""The adapter's model card (``adapter/README.md``): what a PEFT adapter found on disk a year later must say about
itself, in the format the Hugging Face Hub renders for adapters (YAML metadata — ``base_model``,
``library_name: peft``, ``pipeline_tag``, ``tags``, ``datasets`` — then Markdown).

It records the base model, the method and its paper, the data and its partition, the clients and rounds, the final
metrics, the privacy guarantee of a private run (ε and δ per client), the command that made the run, the full
configuration and the fedlora version.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from fedlora.config import ExperimentConfig, to_toml

HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The Hub id of each bundled model alias (the card's ``base_model``: where the weights came from)."""

BUNDLED_DATASETS = {"sst2": ("stanfordnlp/sst2", "GLUE SST-2 (Socher et al., 2013)"),
                    "qnli": ("nyu-mll/glue", "GLUE QNLI (Rajpurkar et al., 2016; Wang et al., 2019)"),
                    "superni": (None, "Super-NaturalInstructions, 60 tasks (Wang et al., 2022)"),
                    "rte": ("nyu-mll/glue", "GLUE RTE (Dagan et al., 2006; Wang et al., 2019)"),
                    "mnli": ("nyu-mll/glue", "GLUE MNLI, a 2.5 % train subset (Williams et al., 2018)"),
                    "dolly": ("databricks/databricks-dolly-15k", "databricks-dolly-15k (Databricks, 2023)")}


def command_line(argv: list[str] | None = None) -> str:
    """How this process was started, as a shell line (``fedlora ...`` for the CLI, else ``python ...``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return "(interactive Python)"
    head = Path(argv[0])
    if head.name == "fedlora" or (head.name == "__main__.py" and head.parent.name == "fedlora"):
        return shlex.join(["fedlora", *argv[1:]])
    return shlex.join(["python", *argv])


def _base_model(name: str) -> str:
    return HUB_IDS.get(name, name)


def _dataset(source: str) -> tuple[str | None, str]:
    if source.startswith("bundled:"):
        name = source[len("bundled:"):].split("/")[0]
        hub, text = BUNDLED_DATASETS.get(name, (None, name))
        return hub, f"{text}, shipped with fedlora (`{source}`)"
    if source.startswith("hf:"):
        return source[3:].split(":")[0], f"`{source}` (Hugging Face Hub)"
    return None, f"local file `{source}`"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def render(cfg: ExperimentConfig, summary: dict, *, command: str | None = None, client: int | None = None,
           pooling: str = "pooler") -> str:
    """The model card's text for a run with configuration ``cfg`` and summary ``summary`` (``summary.json``);
    ``client`` for a personalised method's per-client adapter; ``pooling`` as recorded in ``fedlora.json``."""
    from fedlora import __version__
    from fedlora.methods import get_method

    from fedlora.tasks import task_class

    method = get_method(cfg.method)
    task = task_class(cfg.data.task)
    hub_data, train_text = _dataset(cfg.data.train)
    _, val_text = _dataset(cfg.data.validation)
    tags = ["fedlora", "federated-learning", "lora", cfg.method]
    if cfg.dp.enabled:
        tags.append("differential-privacy")
    meta = [f"base_model: {_base_model(cfg.model.name)}", "library_name: peft",
            f"pipeline_tag: {task.pipeline_tag}",
            "tags:", *[f"- {t}" for t in tags]]
    if hub_data:
        meta += ["datasets:", f"- {hub_data}"]
    whose = f" — client {client}'s personal adapter" if client is not None else ""
    name = method.summary.split(":")[0]
    lines = ["---", *meta, "---", "",
             f"# {name} adapter for {_base_model(cfg.model.name)}{whose}", "",
             f"A LoRA adapter trained by federated fine-tuning with [fedlora](https://pypi.org/project/fedlora/) "
             f"{__version__}: {summary.get('num_clients', cfg.clients.num)} clients trained it together over "
             f"{cfg.rounds} rounds without sharing their data.", ""]
    if client is not None:
        lines += [f"This is client {client}'s own model: the shared part of the global adapter with the part the "
                  f"method keeps on each client ({name} is personalised). The global adapter is in `adapter/`.", ""]
    privacy = "none (not differentially private)"
    if cfg.dp.enabled:
        eps = summary.get("max_epsilon")
        target = f" (target {cfg.dp.epsilon:g})" if cfg.dp.epsilon else ""
        privacy = (f"DP-SGD (Opacus), sample-level, per client: ε = {_fmt(eps)} spent{target}, "
                   f"δ = {cfg.dp.delta:g}, clip norm {cfg.dp.clip:g}, accounted over the whole run")
    sizes = summary.get("client_train_examples")
    partition = cfg.clients.partition + (f" (α = {cfg.clients.dirichlet_alpha:g})"
                                         if cfg.clients.partition == "dirichlet" else "")
    lines += ["## Training", "", "| | |", "|---|---|",
              f"| method | `{cfg.method}` — {method.summary} |"]
    if method.citation:
        lines.append(f"| paper | {method.citation} |")
    lines += [f"| base model | `{cfg.model.name}` ({_base_model(cfg.model.name)}) |",
              f"| task | {cfg.data.task} |",
              f"| training data | {train_text} |",
              f"| evaluation data | {val_text} |",
              f"| partition | {partition} over {summary.get('num_clients', cfg.clients.num)} clients"
              + (f"; training rows per client: {', '.join(map(str, sizes))}" if sizes and len(sizes) <= 16 else "")
              + " |",
              f"| rounds | {cfg.rounds} (fraction of clients per round: {cfg.clients.fraction:g}) |",
              f"| LoRA | r = {cfg.lora.rank}, α = {cfg.lora.alpha:g}, on {', '.join(cfg.lora.target_modules)}"
              + (f"; client ranks: {cfg.lora.rank_distribution}" if cfg.lora.rank_distribution != "homogeneous"
                 else "") + " |",
              f"| local training | {cfg.train.optimizer}, lr {cfg.train.lr:g}, batch {cfg.train.batch_size}, "
              + (f"{cfg.train.local_epochs:g} epochs" if cfg.train.local_epochs else f"{cfg.train.local_steps} steps")
              + " per round |",
              f"| privacy | {privacy} |",
              f"| seed | {cfg.seed} |", ""]
    headline = summary.get("headline_metric")
    lines += ["## Results", "", "| metric | value |", "|---|---|",
              f"| {headline} (final, headline) | {_fmt(summary.get('final_score'))} |"]
    if summary.get("final_accuracy") is not None and headline != "accuracy":
        lines.append(f"| accuracy (final, global model) | {_fmt(summary['final_accuracy'])} |")
    lines += [f"| traffic, client → server | {summary.get('total_upload_bytes', 0) / 1e6:.2f} MB |",
              f"| traffic, server → client | {summary.get('total_download_bytes', 0) / 1e6:.2f} MB |",
              f"| wall time | {summary.get('wall_s', 0):.0f} s |", "",
              "Scores are on the evaluation data above, as the run's `metrics.csv` reports them.", ""]
    folder = "adapter" if client is None else f"personal/client-{client}"
    pick = "" if client is None else f" --client {client}"
    use = f'fedlora {task.use_command} RUN_DIR{pick} "{task.example_input}"'
    lines += ["## How to use", "", "```python", "import fedlora",
              f'tokenizer, model = fedlora.load_adapter("RUN_DIR/{folder}")   # PEFT on the base model, with the '
              "run's pooling", "```", "", "```", use,
              f"fedlora export RUN_DIR{pick} --merged --out merged/   # a plain transformers model", "```", ""]
    if pooling != "pooler":
        lines += [f"The head reads the {pooling}-pooled, L2-normalised token states (`fedlora.json`: `pooling`). A "
                  "stock `PeftModel` on `AutoModelForSequenceClassification` would classify from the architecture's "
                  "own pooler instead; `fedlora.load_adapter` applies the recorded pooling, and the merged export "
                  "loads with it through `trust_remote_code=True`.", ""]
    lines += ["## How it was made", "", "```", command or "(unknown)", "```", "",
              "The complete configuration (re-run it with `fedlora run --config config.toml`):", "",
              "<details><summary>config.toml</summary>", "", "```toml", to_toml(cfg).rstrip(), "```", "",
              "</details>", "", f"fedlora {__version__} · PEFT adapter format", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, cfg: ExperimentConfig, summary: dict, *, command: str | None = None,
                     client: int | None = None) -> Path:
    """Write ``folder/README.md`` (replacing PEFT's template card)."""
    import json

    path = Path(folder) / "README.md"
    info_file = Path(folder) / "fedlora.json"
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(render(cfg, summary, command=command, client=client, pooling=info.get("pooling", "pooler")),
                   encoding="utf-8")
    tmp.replace(path)
    return path
