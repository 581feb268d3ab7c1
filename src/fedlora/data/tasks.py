"""Tasks: rows → tokenised examples → loss and metric.

:class:`ClassificationTask` covers single-sentence and sentence-pair classification (GLUE style).  Rows are checked
before any model loads: missing columns, empty text and labels outside ``data.labels`` are reported with the file and
row number.
"""
from __future__ import annotations

from typing import ClassVar

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora.data.sources import read_rows
from fedlora.errors import DataError


@dataclass
class Examples:
    """Tokenised examples of variable length; :meth:`batch` pads a subset dynamically."""

    loss_is_mean_over_examples: ClassVar[bool] = True
    """The step's loss is a mean of per-example losses, so micro-batches may be regrouped (by length) exactly."""
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: Tensor
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx: list[int]) -> "Examples":
        return Examples([self.input_ids[i] for i in idx],
                        None if self.token_type_ids is None else [self.token_type_ids[i] for i in idx],
                        self.labels[idx], self.pad_id)

    @staticmethod
    def concat(parts: list["Examples"]) -> "Examples":
        """One set of examples holding ``parts`` one after another (same tokenizer)."""
        types = None if parts[0].token_type_ids is None else [t for p in parts for t in p.token_type_ids]
        return Examples([x for p in parts for x in p.input_ids], types, torch.cat([p.labels for p in parts]),
                        parts[0].pad_id)

    def batch(self, idx) -> dict[str, Tensor]:
        idx = [int(i) for i in idx]
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        types = torch.zeros((len(idx), width), dtype=torch.long) if self.token_type_ids is not None else None
        for row, i in enumerate(idx):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = torch.tensor(self.token_type_ids[i])
        out = {"input_ids": ids, "attention_mask": mask, "labels": self.labels[idx]}
        if types is not None:
            out["token_type_ids"] = types
        return out


class ClassificationTask:
    """Sequence classification from text (or text pairs) and labels."""

    def __init__(self, data_cfg, seed: int = 0):
        self.cfg = data_cfg
        self.seed = seed
        if getattr(data_cfg, "holdout", 0):
            self.train_rows, self.val_rows = self._carve(data_cfg.holdout)
        else:
            self.train_rows = self._load(data_cfg.train, data_cfg.max_train_examples, "train")
            self.val_rows = self._load(data_cfg.validation, data_cfg.max_eval_examples, "validation")
        self.label_names = self._label_names()
        self.label_to_id = {str(v): i for i, v in enumerate(self.label_names)}
        self.train_labels = self._encode_labels(self.train_rows, data_cfg.train)
        self.val_labels = self._encode_labels(self.val_rows, data_cfg.validation)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    # ------------------------------------------------------------------ loading and validation
    def _load(self, source: str, limit: int, what: str) -> list[dict]:
        rows = read_rows(source)
        if not rows:
            raise DataError(f"{what} data {source!r} has no rows")
        cols = [self.cfg.text_column, self.cfg.label_column] + ([self.cfg.text_pair_column]
                                                                 if self.cfg.text_pair_column else [])
        for i, row in enumerate(rows):
            for col in cols:
                if col not in row:
                    raise DataError(f"{what} data {source!r} row {i + 1} has no column {col!r} "
                                    f"(columns: {', '.join(map(str, row.keys()))}); set data.text_column / "
                                    f"data.text_pair_column / data.label_column")
            for col in cols[:1] + cols[2:]:
                text = row[col]
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{what} data {source!r} row {i + 1}: column {col!r} is empty or not text "
                                    f"({text!r})")
            if row[self.cfg.label_column] is None or row[self.cfg.label_column] == "":
                raise DataError(f"{what} data {source!r} row {i + 1}: label column {self.cfg.label_column!r} is empty")
        if limit and limit < len(rows):
            keep = np.sort(np.random.default_rng([self.seed, 11 if what == "train" else 13])
                           .choice(len(rows), size=limit, replace=False))
            rows = [rows[i] for i in keep]
        return rows

    def _carve(self, holdout: int) -> tuple[list[dict], list[dict]]:
        """``data.holdout``: a seeded set of ``holdout`` training rows becomes the validation set; the rest (then
        ``max_train_examples`` of it) is the training data.  The validation file is not read."""
        rows = self._load(self.cfg.train, 0, "train")
        if holdout >= len(rows):
            raise DataError(f"data.holdout = {holdout} leaves no training rows ({self.cfg.train!r} has {len(rows)})")
        held = set(np.random.default_rng([self.seed, 19]).choice(len(rows), size=holdout, replace=False).tolist())
        val = [r for i, r in enumerate(rows) if i in held]
        train = [r for i, r in enumerate(rows) if i not in held]
        limit = self.cfg.max_train_examples
        if limit and limit < len(train):
            keep = np.sort(np.random.default_rng([self.seed, 11]).choice(len(train), size=limit, replace=False))
            train = [train[i] for i in keep]
        if self.cfg.max_eval_examples and self.cfg.max_eval_examples < len(val):
            val = val[: self.cfg.max_eval_examples]
        return train, val

    def _label_names(self) -> list:
        if self.cfg.labels:
            return list(self.cfg.labels)
        values = {_norm_label(r[self.cfg.label_column]) for r in self.train_rows}
        ordered = sorted(values, key=lambda v: (0, int(v)) if _is_int(v) else (1, v))
        if len(ordered) < 2:
            raise DataError(f"training data has a single label value {ordered}; classification needs at least 2")
        return ordered

    def _encode_labels(self, rows: list[dict], source: str) -> list[int]:
        out = []
        for i, row in enumerate(rows):
            key = _norm_label(row[self.cfg.label_column])
            if key not in self.label_to_id:
                raise DataError(f"{source!r} row {i + 1}: label {row[self.cfg.label_column]!r} is not one of "
                                f"{self.label_names} (set data.labels to list every class)")
            out.append(self.label_to_id[key])
        return out

    def groups(self, rows: list[dict]) -> list[str]:
        """Each row's owner (``data.client_column``), for ``clients.partition = "by_task"``."""
        col = self.cfg.client_column
        missing = next((i for i, r in enumerate(rows) if col not in r), None)
        if missing is not None:
            raise DataError(f"row {missing + 1} has no column {col!r} for clients.partition = 'by_task'; set "
                            f"data.client_column")
        return [str(r[col]) for r in rows]

    # ------------------------------------------------------------------ tokenisation
    def tokenise(self, tokenizer, rows: list[dict], labels: list[int], max_length: int) -> Examples:
        texts = [r[self.cfg.text_column] for r in rows]
        pairs = [r[self.cfg.text_pair_column] for r in rows] if self.cfg.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        types = enc.get("token_type_ids") if pairs is not None else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return Examples(list(enc["input_ids"]), types, torch.tensor(labels, dtype=torch.long), pad)

    # ------------------------------------------------------------------ loss and metric
    @staticmethod
    def loss(model, batch: dict[str, Tensor]) -> Tensor:
        """Mean over examples of the per-example cross-entropy, computed outside the model (Opacus needs a mean
        over samples)."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return ClassificationTask.loss_from_logits(model(**inputs).logits, batch["labels"])

    @staticmethod
    def loss_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
        """The loss of :meth:`loss` from a micro-batch's logits (grouped training computes them for many clients
        in one pass: :mod:`fedlora.client_group`)."""
        return F.cross_entropy(logits, labels, reduction="mean")

    @staticmethod
    @torch.inference_mode()
    def per_example(model, examples: Examples, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Each example's loss and whether ``model`` classifies it correctly (eval mode, no autograd), in
        ``examples``' order; batches are length-sorted, so they pad little."""
        was_training = model.training
        model.eval()
        order = np.argsort([len(x) for x in examples.input_ids], kind="stable")
        losses, correct = np.zeros(len(examples)), np.zeros(len(examples), dtype=bool)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            b = examples.batch(rows)
            inputs = {k: v for k, v in b.items() if k != "labels"}
            logits = model(**inputs).logits.float()
            losses[rows] = F.cross_entropy(logits, b["labels"], reduction="none").numpy()
            correct[rows] = (logits.argmax(-1) == b["labels"]).numpy()
        model.train(was_training)
        return losses, correct

    @staticmethod
    def evaluate(model, examples: Examples, batch_size: int) -> dict[str, float]:
        """Mean loss and accuracy of ``model`` on ``examples``."""
        if len(examples) == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "n": 0}
        losses, correct = ClassificationTask.per_example(model, examples, batch_size)
        return {"loss": float(losses.mean()), "accuracy": float(correct.mean()), "n": len(examples)}


def _is_int(v: str) -> bool:
    try:
        int(v)
        return True
    except ValueError:
        return False


def _norm_label(v) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).strip()
