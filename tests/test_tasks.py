"""The task layer's scoring: per-client scores in one pass equal one evaluation per client."""
import types

import torch

from fedlora.data.tasks import ClassificationTask, Examples
from fedlora.tasks import Classification


class _LengthAware(torch.nn.Module):
    """Logits from the real tokens only (mean id), so padding or batch composition would show."""

    def forward(self, input_ids, attention_mask, **_):
        mean = (input_ids * attention_mask).sum(1) / attention_mask.sum(1)
        return types.SimpleNamespace(logits=torch.stack([mean - 5.0, 5.0 - mean], dim=1).float())


def _examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, 10, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
           for _ in range(n)]
    return Examples(ids, None, torch.randint(0, 2, (n,), generator=g), 0)


def test_client_scores_in_one_pass_equal_one_evaluation_per_client():
    client_val = [_examples(7, 1), _examples(0, 2), _examples(12, 3), _examples(5, 4)]
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(eval_batch_size=4))
    task = Classification.__new__(Classification)  # scoring needs no data configuration
    out = task.client_scores(_LengthAware(), None, client_val, [None] * 4, cfg)
    expected = {k: ClassificationTask.evaluate(_LengthAware(), ex, 3)["accuracy"]
                for k, ex in enumerate(client_val) if len(ex)}
    assert out["client_accuracy"] == expected
    assert len(set(expected.values())) > 1  # the clients differ, so a mix-up of their rows would show
    assert out["client_accuracy_min"] == min(expected.values())
