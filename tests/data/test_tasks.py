"""Classification task: label mapping, row checks before any model loads, dynamic padding, loss and accuracy."""
import json
import types

import pytest
import torch

from fedlora.data.tasks import ClassificationTask
from fedlora.errors import DataError


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(p)


def _cfg(train, val, **kw):
    base = dict(train=train, validation=val, text_column="text", text_pair_column="", label_column="label",
                labels=[], max_train_examples=0, max_eval_examples=0)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_string_labels_are_inferred_sorted(tmp_path):
    tr = _write(tmp_path, "t.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    task = ClassificationTask(_cfg(tr, tr))
    assert task.label_names == ["neg", "pos"] and task.train_labels == [1, 0]


def test_explicit_labels_define_order_and_reject_unknown(tmp_path):
    tr = _write(tmp_path, "t.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    va = _write(tmp_path, "v.jsonl", [{"text": "z", "label": "neutral"}])
    with pytest.raises(DataError, match="label 'neutral' is not one of"):
        ClassificationTask(_cfg(tr, va, labels=["pos", "neg"]))
    task = ClassificationTask(_cfg(tr, tr, labels=["pos", "neg"]))
    assert task.train_labels == [0, 1]


@pytest.mark.parametrize("rows, match", [
    ([{"txt": "x", "label": 0}], "has no column 'text'"),
    ([{"text": "  ", "label": 0}], "column 'text' is empty"),
    ([{"text": 3, "label": 0}], "empty or not text"),
    ([{"text": "x", "label": None}], "label column 'label' is empty"),
    ([{"text": "x", "label": 0}, {"text": "y", "label": 0}], "single label value"),
])
def test_bad_rows_are_reported_with_row_numbers(tmp_path, rows, match):
    tr = _write(tmp_path, "t.jsonl", rows)
    with pytest.raises(DataError, match=match):
        ClassificationTask(_cfg(tr, tr))


def test_max_examples_subsamples_reproducibly(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(50)]
    tr = _write(tmp_path, "t.jsonl", rows)
    a = ClassificationTask(_cfg(tr, tr, max_train_examples=10), seed=1)
    b = ClassificationTask(_cfg(tr, tr, max_train_examples=10), seed=1)
    assert len(a.train_rows) == 10 and a.train_rows == b.train_rows and len(a.val_rows) == 50


def test_holdout_carves_validation_rows_out_of_training(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(50)]
    tr = _write(tmp_path, "t.jsonl", rows)
    task = ClassificationTask(_cfg(tr, str(tmp_path / "never-read.jsonl"), holdout=12, max_train_examples=20), seed=3)
    train, val = {r["text"] for r in task.train_rows}, {r["text"] for r in task.val_rows}
    assert len(val) == 12 and len(train) == 20 and not train & val
    again = ClassificationTask(_cfg(tr, tr, holdout=12), seed=3)
    assert [r["text"] for r in again.val_rows] == [r["text"] for r in task.val_rows]  # seeded
    assert len(again.train_rows) == 38
    with pytest.raises(DataError, match="leaves no training rows"):
        ClassificationTask(_cfg(tr, tr, holdout=50), seed=3)


class _Tok:
    pad_token_id = 0

    def __call__(self, texts, pairs, truncation, max_length):
        ids = [[1 + (len(t) % 5)] * min(len(t), max_length) for t in texts]
        out = {"input_ids": ids}
        if pairs is not None:
            out["token_type_ids"] = [[0] * len(x) for x in ids]
        return out


def test_batches_pad_dynamically_and_pairs_carry_token_types(tmp_path):
    tr = _write(tmp_path, "t.jsonl", [{"text": "abc", "q": "d", "label": 0}, {"text": "a", "q": "e", "label": 1}])
    task = ClassificationTask(_cfg(tr, tr, text_pair_column="q"))
    ex = task.tokenise(_Tok(), task.train_rows, task.train_labels, max_length=8)
    b = ex.batch([0, 1])
    assert b["input_ids"].shape == (2, 3) and b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "token_type_ids" in b and b["labels"].tolist() == [0, 1]


def test_evaluate_counts_accuracy_and_loss():
    class Const(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **_):
            return types.SimpleNamespace(logits=torch.tensor([[2.0, 0.0]]).repeat(len(input_ids), 1))

    from fedlora.data.tasks import Examples

    ex = Examples([[1], [1, 2], [3]], None, torch.tensor([0, 1, 0]), 0)
    out = ClassificationTask.evaluate(Const(), ex, batch_size=2)
    assert out["accuracy"] == pytest.approx(2 / 3) and out["n"] == 3
    expected = (2 * torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0])) +
                torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1]))) / 3
    assert out["loss"] == pytest.approx(float(expected), rel=1e-6)
