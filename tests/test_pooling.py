"""model.pooling: masked mean / first token (L2-normalised) in place of BERT's pooler, auto-detection, zero head."""
import json

import pytest
import torch
from torch import nn

from fedlora.errors import ModelError
from fedlora.pooling import apply_pooling, resolve_head_init, resolve_pooling, zero_head

from tests.conftest import tiny_bert


def _inputs():
    ids = torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask


@pytest.mark.parametrize("mode", ["mean", "cls"])
def test_pooled_features_are_the_masked_mean_or_first_token_normalised(mode):
    model = tiny_bert().eval()
    ids, mask = _inputs()
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    apply_pooling(model, mode)
    captured = {}
    model.classifier.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    if mode == "mean":
        m = mask.unsqueeze(-1).float()
        expected = (hidden * m).sum(1) / m.sum(1)
    else:
        expected = hidden[:, 0]
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(captured["x"], expected)
    assert not any("pooler" in n for n, _ in model.named_parameters())  # BERT's dense/tanh pooler is gone


def test_mean_pooling_ignores_padding():
    model = tiny_bert().eval()
    apply_pooling(model, "mean")
    ids = torch.tensor([[2, 5, 7, 3]])
    padded = torch.tensor([[2, 5, 7, 3, 0, 0, 0]])
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        b = model(input_ids=padded, attention_mask=(padded != 0).long() | (torch.arange(7) < 4).long()).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # and the stock pooler reads the first token only: padding is irrelevant there too, but the features differ
    stock = tiny_bert().eval()
    with torch.no_grad():
        assert not torch.allclose(stock(input_ids=ids).logits, a)


def test_auto_follows_a_sentence_transformers_folder(tmp_path):
    assert resolve_pooling("auto", None) == "pooler"
    assert resolve_pooling("auto", tmp_path) == "pooler"  # not a sentence-transformers folder
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert resolve_pooling("auto", tmp_path) == "mean"
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert resolve_pooling("auto", tmp_path) == "cls"
    assert resolve_pooling("pooler", tmp_path) == "pooler"
    with pytest.raises(ModelError, match="model.pooling"):
        resolve_pooling("max", tmp_path)


def test_bundled_minilm_resolves_to_mean():
    from fedlora.models import resolve_model_path

    assert resolve_pooling("auto", resolve_model_path("minilm")) == "mean"


def test_head_init_auto_is_zero_with_a_normalised_pooling():
    assert resolve_head_init("auto", "mean") == "zero" and resolve_head_init("auto", "cls") == "zero"
    assert resolve_head_init("auto", "pooler") == "random"
    assert resolve_head_init("random", "mean") == "random"
    model = tiny_bert()
    zero_head(model)
    assert model.classifier.weight.abs().sum() == 0 and model.classifier.bias.abs().sum() == 0


def test_a_model_without_a_pooler_slot_is_refused_clearly():
    class Plain(nn.Module):
        base_model_prefix = "encoder"

        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(2, 2)

    with pytest.raises(ModelError, match="pooler"):
        apply_pooling(Plain(), "mean")
    apply_pooling(Plain(), "pooler")  # the model's own head: nothing to do


def test_load_classifier_zero_head_unless_the_method_scores_layers_by_gradient():
    from fedlora.config import load_config
    from fedlora.methods import get_method
    from fedlora.models import load_classifier

    cfg = load_config(None, [])
    _, model = load_classifier(cfg.model, 2, 0)
    assert isinstance(model.bert.pooler, nn.Module) and model.config.fedlora_pooling == "mean"
    assert model.classifier.weight.abs().sum() == 0
    assert get_method("pilot").scores_layers_by_gradient and not get_method("ffa").scores_layers_by_gradient
    _, pilot = load_classifier(cfg.model, 2, 0, zero_head_ok=False)
    assert pilot.classifier.weight.abs().sum() > 0
    _, forced = load_classifier(load_config(None, ["model.head_init=zero"]).model, 2, 0, zero_head_ok=False)
    assert forced.classifier.weight.abs().sum() == 0
    _, stock = load_classifier(load_config(None, ["model.pooling=pooler"]).model, 2, 0)
    assert stock.classifier.weight.abs().sum() > 0 and not hasattr(stock.config, "fedlora_pooling")
