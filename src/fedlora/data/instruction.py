"""Causal-LM instruction tuning (FlexLoRA, docs/methods.md §13): Alpaca prompts, response + EOS, Rouge-L.

Rows hold an instruction (``data.instruction_column``), an optional input (``data.input_column``) and a reference
response (``data.output_column``).  Instructions stored once per task in a separate file (``data.instructions``, e.g.
``flexlora_1613/tasks.jsonl``) are joined onto the rows by ``data.client_column``.  Rows are checked before any model
loads; errors name the file, the row number, the column and the config key to set.

Each example is ``prompt + response + eos`` where the prompt is the Stanford Alpaca template.  With ``data.loss_on =
"all"`` (FlexLoRA's ``train_on_inputs=True``) every token is a label; with ``"response"`` the prompt positions are
masked (-100).  The loss is a mean over examples of each example's mean token NLL (Opacus needs a mean over samples).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedlora.data.rouge import rouge_l
from fedlora.data.sources import read_rows
from fedlora.data.tokens import bos_prefix, device_of, encode_texts
from fedlora.errors import ConfigError, DataError

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

IGNORE = -100


def render_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt as text: the with-input template when ``input`` is a non-empty string (as in Alpaca)."""
    if input:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _template_parts(template: str) -> list[str]:
    """The fixed text around the placeholders: [before {instruction}, between, ..., after the last]."""
    head, rest = template.split("{instruction}")
    if "{input}" in rest:
        mid, tail = rest.split("{input}")
        return [head, mid, tail]
    return [head, rest]


@dataclass
class LMExamples:
    """Tokenised causal-LM examples of variable length; :meth:`batch` right-pads a subset dynamically.

    For every example ``i``: ``input_ids[i] = prompt_ids[i] + response ids (+ eos)``, so the response occupies positions
    ``len(prompt_ids[i]) .. len(input_ids[i]) - 1``; ``labels[i]`` has the same length as ``input_ids[i]`` (-100 where
    no loss is taken); ``references[i]`` is the untruncated reference response text.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    prompt_ids: list[list[int]]
    references: list[str]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, idx) -> "LMExamples":
        idx = [int(i) for i in idx]
        return LMExamples([self.input_ids[i] for i in idx], [self.labels[i] for i in idx],
                          [self.prompt_ids[i] for i in idx], [self.references[i] for i in idx], self.pad_id)

    def batch(self, idx) -> dict[str, Tensor]:
        """Right-padded ``input_ids`` (pad_id), ``attention_mask`` and ``labels`` (-100 on padding)."""
        idx = [int(i) for i in idx]
        width = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i], dtype=torch.long)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(self.labels[i], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class InstructionTask:
    """Instruction tuning of a causal LM: rows -> Alpaca-prompted examples -> per-sample NLL, Rouge-L."""

    def __init__(self, data_cfg, seed: int = 0):
        self.cfg = data_cfg
        self.seed = seed
        self._instructions = self._load_instructions(data_cfg.instructions) if data_cfg.instructions else None
        self.train_rows = self._load(data_cfg.train, data_cfg.max_train_examples, "train")
        self.val_rows = self._load(data_cfg.validation, data_cfg.max_eval_examples, "validation")

    @classmethod
    def prompts_only(cls, columns: dict) -> "InstructionTask":
        """A task that reads no data: builds prompts at inference (``fedlora generate``) with the run's columns."""
        task = cls.__new__(cls)
        task.cfg = SimpleNamespace(instruction_column=columns["instruction"], input_column=columns.get("input", ""),
                                   output_column=columns["output"], loss_on="all")
        task.seed, task._instructions, task.train_rows, task.val_rows = 0, None, [], []
        return task

    # ------------------------------------------------------------------ loading and validation
    def _load_instructions(self, source: str) -> dict[str, str]:
        key_col, ins_col = self.cfg.client_column, self.cfg.instruction_column
        rows = read_rows(source)
        table: dict[str, str] = {}
        for i, row in enumerate(rows):
            for col, setting in ((key_col, "data.client_column"), (ins_col, "data.instruction_column")):
                if col not in row or row[col] is None:
                    raise DataError(f"instructions file {source!r} row {i + 1} has no column {col!r} (columns: "
                                    f"{', '.join(map(str, row.keys()))}); set {setting}")
            text = row[ins_col]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"instructions file {source!r} row {i + 1}: column {ins_col!r} is empty or not text "
                                f"({text!r})")
            key = str(row[key_col])
            if key in table and table[key] != text:
                raise DataError(f"instructions file {source!r} row {i + 1}: {key_col} {key!r} appears twice with "
                                f"different instructions")
            table[key] = text
        return table

    def _load(self, source: str, limit: int, what: str) -> list[dict]:
        c = self.cfg
        rows = read_rows(source)
        if not rows:
            raise DataError(f"{what} data {source!r} has no rows")
        out = []
        for i, row in enumerate(rows):
            where = f"{what} data {source!r} row {i + 1}"
            if row.get(c.instruction_column) is None and self._instructions is not None:
                if row.get(c.client_column) is None:
                    raise DataError(f"{where} has no instruction column {c.instruction_column!r} and no column "
                                    f"{c.client_column!r} to look it up in data.instructions "
                                    f"({c.instructions!r}); set data.client_column")
                key = str(row[c.client_column])
                if key not in self._instructions:
                    raise DataError(f"{where}: {c.client_column} {key!r} is not in the instructions file "
                                    f"{c.instructions!r} (data.instructions), so its {c.instruction_column!r} is "
                                    f"unknown")
                row = {**row, c.instruction_column: self._instructions[key]}
            for col, setting in ((c.instruction_column, "data.instruction_column"),
                                 (c.output_column, "data.output_column")):
                if col not in row:
                    hint = " (or data.instructions to join it by data.client_column)" \
                        if col == c.instruction_column else ""
                    raise DataError(f"{where} has no column {col!r} (columns: {', '.join(map(str, row.keys()))}); "
                                    f"set {setting}{hint}")
            ins = row[c.instruction_column]
            if not isinstance(ins, str) or not ins.strip():
                raise DataError(f"{where}: column {c.instruction_column!r} (data.instruction_column) is empty or not "
                                f"text ({ins!r})")
            if not isinstance(row[c.output_column], str):
                raise DataError(f"{where}: column {c.output_column!r} (data.output_column) is not text "
                                f"({row[c.output_column]!r})")
            if c.input_column and row.get(c.input_column) is not None and not isinstance(row[c.input_column], str):
                raise DataError(f"{where}: column {c.input_column!r} (data.input_column) is not text "
                                f"({row[c.input_column]!r}); set data.input_column = '' for no input")
            out.append(row)
        if limit and limit < len(out):
            keep = np.sort(np.random.default_rng([self.seed, 11 if what == "train" else 13])
                           .choice(len(out), size=limit, replace=False))
            out = [out[i] for i in keep]
        return out

    def groups(self, rows: list[dict]) -> list[str]:
        """Each row's owner/task, ``str(row[data.client_column])``."""
        col = self.cfg.client_column
        out = []
        for i, row in enumerate(rows):
            if row.get(col) is None:
                raise DataError(f"row {i + 1} has no column {col!r} (columns: {', '.join(map(str, row.keys()))}); "
                                f"set data.client_column")
            out.append(str(row[col]))
        return out

    def _input_text(self, row: dict) -> str:
        if not self.cfg.input_column:
            return ""
        value = row.get(self.cfg.input_column)
        return "" if value is None else value

    # ------------------------------------------------------------------ tokenisation
    def tokenise(self, tokenizer, rows: list[dict], max_length: int) -> LMExamples:
        """Alpaca prompt + ``output`` + eos, tokenised piece by piece without special tokens (a leading BOS is kept
        when the tokenizer adds one by default, e.g. LLaMA's), at most ``max_length`` tokens in all.

        Truncation, per example:

        1. the response (output tokens + eos) keeps at most ``max_length // 3`` tokens, cut at its end (the eos is
           kept only if the whole output fits);
        2. the fixed template parts (and the BOS, if any) are always kept;
        3. the instruction and the input share the rest ``R``: if both fit they are kept whole; otherwise the input
           keeps ``max(R // 2, R - len(instruction))`` tokens (i.e. up to half of ``R`` when the instruction needs the
           rest, more when the instruction is short) and the instruction gets what is left; each is cut at its end.

        The reference kept in ``references`` is the untruncated output text.  Raises ConfigError when
        ``max_length`` leaves too little room beside the template.
        """
        c = self.cfg
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the tokenizer has no eos token; instruction tuning appends one to each response")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        prefix = bos_prefix(tokenizer)
        parts_in = encode_texts(tokenizer, _template_parts(ALPACA_PROMPT_WITH_INPUT))
        parts_no = encode_texts(tokenizer, _template_parts(ALPACA_PROMPT_NO_INPUT))
        fixed_in = len(prefix) + sum(map(len, parts_in))
        cap = max_length // 3
        if max_length - cap - fixed_in < 2:
            need = next(n for n in range(max_length, 100 * max_length + 1000) if n - n // 3 - fixed_in >= 2)
            raise ConfigError(f"model.max_length = {max_length} is too small for instruction tuning: the Alpaca "
                              f"template alone takes {fixed_in} tokens with this tokenizer and the response may take "
                              f"max_length // 3; use model.max_length >= {need}")
        instructions = encode_texts(tokenizer, [r[c.instruction_column] for r in rows])
        input_texts = [self._input_text(r) for r in rows]
        inputs = encode_texts(tokenizer, input_texts)
        outputs = encode_texts(tokenizer, [r[c.output_column] for r in rows])
        all_ids, all_labels, all_prompts, refs = [], [], [], []
        for row, ins, inp, has_input, out in zip(rows, instructions, inputs, input_texts, outputs):
            response = (out + [eos])[:cap]
            parts = parts_in if has_input else parts_no
            rem = max_length - len(prefix) - sum(map(len, parts)) - len(response)
            if len(ins) + len(inp) > rem:
                keep_inp = min(len(inp), max(rem // 2, rem - len(ins)))
                keep_ins = min(len(ins), rem - keep_inp)
                ins, inp = ins[:keep_ins], inp[:keep_inp]
            if has_input:
                prompt = prefix + parts[0] + ins + parts[1] + inp + parts[2]
            else:
                prompt = prefix + parts[0] + ins + parts[1]
            ids = prompt + response
            labels = list(ids) if c.loss_on == "all" else [IGNORE] * len(prompt) + response
            all_ids.append(ids)
            all_labels.append(labels)
            all_prompts.append(prompt)
            refs.append(row[c.output_column])
        return LMExamples(all_ids, all_labels, all_prompts, refs, pad)

    # ------------------------------------------------------------------ loss and metric
    @staticmethod
    def loss(model, batch: dict[str, Tensor]) -> Tensor:
        """Mean over examples of each example's mean token NLL over its label positions (logits[:, :-1] predict
        labels[:, 1:]); an example without label tokens contributes 0.  Computed outside the model: HF's internal
        loss is a mean over all tokens of the batch, which Opacus cannot use."""
        device = device_of(model)
        labels = batch["labels"].to(device)
        logits, start = _label_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), labels)
        return _per_example_nll(logits, labels[:, start:]).mean()

    @torch.no_grad()
    def evaluate(self, model, tokenizer, examples: LMExamples, batch_size: int, generate: bool = False,
                 max_new_tokens: int = 32) -> dict[str, float]:
        """Loss and Rouge-L of ``model`` on ``examples`` (eval mode, no gradients, length-sorted batches).

        - ``loss``: mean over examples of the mean NLL of the *response* tokens (whatever ``data.loss_on`` is);
        - ``rougeL_teacher_forced``: mean Rouge-L between the reference and the decoded argmax predictions at the
          response positions under teacher forcing (special tokens skipped).  FlexLoRA's code computes its
          teacher-forced metric over the whole sequence; we use the response positions only, because whole-sequence
          scores reward copying the prompt;
        - ``rougeL`` (only when ``generate``): greedy generation from the left-padded prompts, ``max_new_tokens`` new
          tokens, cut at the first eos, decoded without special tokens, scored against the reference;
        - ``n``: the number of examples.

        The model's train/eval mode is restored afterwards.
        """
        n = len(examples)
        if n == 0:
            out = {"loss": float("nan"), "rougeL_teacher_forced": float("nan"), "n": 0}
            if generate:
                out["rougeL"] = float("nan")
            return out
        was_training = model.training
        model.eval()
        device = device_of(model)
        try:
            total_loss, tf_total = 0.0, 0.0
            order = np.argsort([len(x) for x in examples.input_ids], kind="stable")
            for start in range(0, n, batch_size):
                idx = [int(i) for i in order[start:start + batch_size]]
                b = examples.batch(idx)
                ids = b["input_ids"]
                starts = torch.tensor([len(examples.prompt_ids[i]) for i in idx]).unsqueeze(1)
                pos = torch.arange(ids.shape[1]).unsqueeze(0)
                response_labels = torch.where((pos >= starts) & (b["attention_mask"] == 1), ids, IGNORE)
                logits, first = _label_logits(model, ids.to(device), b["attention_mask"].to(device), response_labels)
                total_loss += float(_per_example_nll(logits, response_labels[:, first:].to(device)).sum())
                preds = logits[:, :-1].argmax(-1).cpu()  # preds[:, j] predicts token first + j + 1
                pieces = [preds[row, len(examples.prompt_ids[i]) - 1 - first:len(examples.input_ids[i]) - 1 - first]
                          .tolist() for row, i in enumerate(idx)]
                texts = tokenizer.batch_decode(pieces, skip_special_tokens=True)
                tf_total += sum(rouge_l(t, examples.references[i]) for t, i in zip(texts, idx))
            out = {"loss": total_loss / n, "rougeL_teacher_forced": tf_total / n, "n": n}
            if generate:
                out["rougeL"] = self._generated_rouge(model, tokenizer, examples, batch_size, max_new_tokens, device)
            return out
        finally:
            model.train(was_training)

    @staticmethod
    def _generated_rouge(model, tokenizer, examples: LMExamples, batch_size: int, max_new_tokens: int,
                         device) -> float:
        eos = tokenizer.eos_token_id
        order = np.argsort([len(p) for p in examples.prompt_ids], kind="stable")
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start:start + batch_size]]
            width = max(len(examples.prompt_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), examples.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                p = examples.prompt_ids[i]
                ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[row, width - len(p):] = 1
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=examples.pad_id, eos_token_id=eos)
            new = gen[:, width:].cpu().tolist()
            pieces = [seq[:seq.index(eos)] if eos in seq else seq for seq in new]
            texts = tokenizer.batch_decode(pieces, skip_special_tokens=True)
            total += sum(rouge_l(t, examples.references[i]) for t, i in zip(texts, idx))
        return total / len(order)


def _label_logits(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """``(logits, start)``: the logits of positions ``start …`` only, where ``start`` is the first position of the
    batch whose next token is a label, so that ``logits[:, j]`` belongs to position ``start + j``.

    A model whose ``forward`` takes ``logits_to_keep`` (LLaMA, Qwen, Mistral, … in transformers) projects only those
    positions onto the vocabulary; with the loss on the response only, that skips the prompt's share of the largest
    activation of a language model (``batch × length × vocab``).  Other models give every position (``start = 0``)."""
    has_label = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()
    start = int(has_label[0]) if len(has_label) else input_ids.shape[1] - 1
    if start > 0 and _takes_logits_to_keep(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       logits_to_keep=input_ids.shape[1] - start).logits
        return logits, start
    return model(input_ids=input_ids, attention_mask=attention_mask).logits, 0


def _takes_logits_to_keep(model) -> bool:
    import inspect

    inner = model
    while hasattr(inner, "_module"):  # Opacus' GradSampleModule
        inner = inner._module
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    kind = type(inner)
    if kind not in _LOGITS_TO_KEEP:
        _LOGITS_TO_KEEP[kind] = "logits_to_keep" in inspect.signature(inner.forward).parameters
    return _LOGITS_TO_KEEP[kind]


_LOGITS_TO_KEEP: dict[type, bool] = {}


def _per_example_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """(batch,) mean NLL over each row's label positions (shifted by one); 0 for rows without labels.

    Only the label positions' logits are gathered before the log-softmax: with a 49k-token vocabulary the full
    ``(batch, length, vocab)`` log-probabilities would be the largest tensor of an evaluation batch."""
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE
    rows = keep.nonzero(as_tuple=True)[0]
    picked = logits[:, :-1][keep].float()  # (label tokens, vocab)
    nll = F.cross_entropy(picked, shift_labels[keep], reduction="none")
    total = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return total / keep.sum(dim=1).clamp(min=1)
