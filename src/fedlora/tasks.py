"""The task interface the engines run: a task supplies its data and tokenisation, its model, its loss, its
evaluation and its headline metric, so that no engine branches on the task (issue 16's "task interface").

``data.task`` names a registered task: :class:`Classification` (GLUE-style text or text pairs → label, accuracy) and
:class:`Instruction` (instruction tuning of a causal LM, Rouge-L).  Each extends the data class that loads and checks
its rows (:class:`fedlora.data.tasks.ClassificationTask`, :class:`fedlora.data.instruction.InstructionTask`) with what
a run needs beside the rows.
"""
from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from fedlora.data.instruction import InstructionTask
from fedlora.data.tasks import ClassificationTask, Examples
from fedlora.errors import ConfigError


class LazyExamples:
    """Client k's tokenised examples, made on first use and kept in a bounded cache: simulating thousands of
    clients never holds every client's tokens at once."""

    def __init__(self, make, n: int, cache_size: int = 256):
        self.make, self.n, self.cache_size = make, n, cache_size
        self._cache: dict[int, object] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        if k not in self._cache:
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = self.make(k)
        return self._cache[k]


class Classification(ClassificationTask):
    """Sequence classification: accuracy on the validation rows; clients by label partition or by a column."""

    name: ClassVar[str] = "classification"
    task_type: ClassVar[str] = "SEQ_CLS"
    headline: ClassVar[str] = "accuracy"
    headline_label: ClassVar[str] = "validation accuracy"
    round_fields: ClassVar[tuple[tuple[str, str], ...]] = (("accuracy", "val acc"),)
    """Metrics the round's console line shows, with their labels."""
    own_keys: ClassVar[tuple[str, ...]] = ("data.text_column", "data.text_pair_column", "data.label_column",
                                           "data.labels", "data.holdout")
    """Config keys only this task reads (a non-default value under another task is refused as ignored)."""
    pipeline_tag: ClassVar[str] = "text-classification"
    """The Hugging Face Hub's name for what the adapter does (its model card)."""
    use_command: ClassVar[str] = "predict"
    """The fedlora command that uses an adapter of this task, and an example input for it."""
    example_input: ClassVar[str] = "a gripping, beautifully acted film"
    default_columns: ClassVar[dict[str, str]] = {"text": "sentence", "text_pair": "", "label": "label"}

    @staticmethod
    def recorded_columns(data_cfg) -> dict[str, str]:
        """The columns an adapter's inputs are read from (``fedlora.json``: ``predict --file`` uses the run's)."""
        return {"text": data_cfg.text_column, "text_pair": data_cfg.text_pair_column, "label": data_cfg.label_column}

    def check_partition(self, cfg) -> None:
        """Any partition works: labels are known for every row."""

    def load_model(self, cfg, zero_head_ok: bool, log) -> tuple[Any, Any]:
        from fedlora.models import load_classifier

        return load_classifier(cfg.model, self.num_labels, cfg.seed, zero_head_ok=zero_head_ok)

    def client_examples(self, tokenizer, prepared, max_length: int) -> tuple[Any, Any, Any]:
        """(each client's training examples, each client's validation examples, the global evaluation set)."""
        train_all = self.tokenise(tokenizer, self.train_rows, self.train_labels, max_length)
        val_all = self.tokenise(tokenizer, self.val_rows, self.val_labels, max_length)
        client_train = [train_all.subset(c.train_rows) for c in prepared.clients]
        client_val = [(val_all if c.val_from_validation else train_all).subset(c.val_rows) for c in prepared.clients]
        rows = prepared.global_eval_rows
        return client_train, client_val, (val_all if rows is None else val_all.subset(rows))

    def score(self, model, tokenizer, examples, cfg, generate: bool) -> dict:
        ev = self.evaluate(model, examples, cfg.train.eval_batch_size)
        return {"accuracy": ev["accuracy"], "eval_loss": ev["loss"]}

    client_metric: ClassVar[str] = "accuracy"

    def client_score(self, model, tokenizer, examples, cfg) -> float:
        """One client's validation rows, scored with the model as loaded (its :attr:`client_metric`)."""
        return self.evaluate(model, examples, cfg.train.eval_batch_size)["accuracy"]

    def client_scores(self, model, tokenizer, client_val, clients, cfg) -> dict:
        """Each client's validation rows, scored with the global model (``eval.per_client``): one pass over the
        union of their rows, length-sorted across clients (8 small evaluations pad and batch worse than one), then
        split by client; each example's score does not depend on the batch it falls in."""
        scored = [k for k in range(len(client_val)) if len(client_val[k])]
        per = {}
        if scored:
            _, correct = self.per_example(model, Examples.concat([client_val[k] for k in scored]),
                                          cfg.train.eval_batch_size)
            bounds = np.cumsum([0] + [len(client_val[k]) for k in scored])
            per = {k: float(correct[lo:hi].mean()) for k, lo, hi in zip(scored, bounds[:-1], bounds[1:])}
        return {"client_accuracy": per,
                "client_accuracy_mean": float(np.mean(list(per.values()))) if per else None,
                "client_accuracy_min": float(np.min(list(per.values()))) if per else None}

    def summary(self, last_row: dict) -> dict:
        return {}


class Instruction(InstructionTask):
    """Instruction tuning of a causal LM: Rouge-L (teacher-forced every evaluation, generated when asked); one
    client per task or owner (``clients.partition = "by_task"``)."""

    name: ClassVar[str] = "instruction"
    task_type: ClassVar[str] = "CAUSAL_LM"
    headline: ClassVar[str] = "rougeL"
    headline_label: ClassVar[str] = "rougeL"
    round_fields: ClassVar[tuple[tuple[str, str], ...]] = (("rougeL_teacher_forced", "unseen rougeL-tf"),
                                                           ("rougeL", "rougeL"))
    own_keys: ClassVar[tuple[str, ...]] = ("data.instruction_column", "data.input_column", "data.output_column",
                                           "data.instructions", "data.loss_on", "eval.max_new_tokens",
                                           "eval.generate_every")
    pipeline_tag: ClassVar[str] = "text-generation"
    use_command: ClassVar[str] = "generate"
    example_input: ClassVar[str] = "Translate to French: good morning"
    default_columns: ClassVar[dict[str, str]] = {"instruction": "definition", "input": "input", "output": "output"}

    @staticmethod
    def recorded_columns(data_cfg) -> dict[str, str]:
        return {"instruction": data_cfg.instruction_column, "input": data_cfg.input_column,
                "output": data_cfg.output_column}

    def check_partition(self, cfg) -> None:
        if cfg.clients.partition != "by_task":
            raise ConfigError("data.task = 'instruction' needs clients.partition = 'by_task' (one client per task "
                              "or owner, data.client_column)")

    def load_model(self, cfg, zero_head_ok: bool, log) -> tuple[Any, Any]:
        from fedlora.models import load_causal_lm

        return load_causal_lm(cfg.model, log=log)

    def client_examples(self, tokenizer, prepared, max_length: int) -> tuple[Any, Any, Any]:
        def rows(idx, source):
            return [source[i] for i in idx]

        clients = prepared.clients
        client_train = LazyExamples(
            lambda k: self.tokenise(tokenizer, rows(clients[k].train_rows, self.train_rows), max_length), len(clients))
        client_val = LazyExamples(
            lambda k: self.tokenise(tokenizer, rows(clients[k].val_rows, self.val_rows), max_length), len(clients))
        global_val = self.tokenise(tokenizer, rows(prepared.global_eval_rows, self.val_rows), max_length)
        return client_train, client_val, global_val

    def score(self, model, tokenizer, examples, cfg, generate: bool) -> dict:
        ev = self.evaluate(model, tokenizer, examples, cfg.train.eval_batch_size, generate=generate,
                           max_new_tokens=cfg.eval.max_new_tokens)
        row = {"eval_loss": ev["loss"], "rougeL_teacher_forced": ev["rougeL_teacher_forced"]}
        if "rougeL" in ev:
            row["rougeL"] = ev["rougeL"]
        return row

    client_metric: ClassVar[str] = "rougeL_teacher_forced"

    def client_score(self, model, tokenizer, examples, cfg) -> float:
        return self.evaluate(model, tokenizer, examples, cfg.train.eval_batch_size, generate=False,
                             max_new_tokens=1)["rougeL_teacher_forced"]

    def client_scores(self, model, tokenizer, client_val, clients, cfg) -> dict:
        per = {k: self.client_score(model, tokenizer, client_val[k], cfg)
               for k, c in enumerate(clients) if c.val_rows}
        return {"client_rougeL_teacher_forced": per,
                "client_rougeL_teacher_forced_mean": float(np.mean(list(per.values()))) if per else None}

    def summary(self, last_row: dict) -> dict:
        return {"final_rougeL_teacher_forced": last_row.get("rougeL_teacher_forced")}


TASKS: dict[str, type] = {"classification": Classification, "instruction": Instruction}


def task_class(name: str) -> type:
    """The registered task class named ``name`` (``data.task``, or an adapter folder's recorded task)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None


def make_task(cfg):
    """The registered task ``cfg.data.task``, its rows loaded and checked."""
    try:
        cls = TASKS[cfg.data.task]
    except KeyError:
        raise ConfigError(f"unknown data.task {cfg.data.task!r}; available: {', '.join(sorted(TASKS))}") from None
    return cls(cfg.data, seed=cfg.seed)
