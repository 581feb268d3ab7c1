"""Shared fixtures: tiny hand-built models (no download) for exact tests, the real bundled MiniLM for end-to-end."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn

from fedlora.adapters import initial_adapter
from fedlora.config import load_config
from fedlora.models import LoraSlots

torch.set_num_threads(2)


def lora_cfg(rank=4, alpha=8.0, targets=("0",), dropout=0.0, head="aggregate"):
    return types.SimpleNamespace(rank=rank, alpha=alpha, target_modules=list(targets), dropout=dropout, head=head)


def tiny_linear_lora(d_in=10, d_out=12, rank=4, alpha=8.0, seed=0, dtype=torch.float64):
    """A single bias-free linear layer with PEFT LoRA on it: (peft_model, slots, initial adapter)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(d_in, d_out, bias=False)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"]))
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    slots = LoraSlots.of(model)
    init = initial_adapter(slots.shapes, rank, alpha, seed)
    init = init.with_tensors({k: v.to(dtype) for k, v in init.to_flat().items()})
    return model, slots, init


def tiny_bert(num_labels=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


class QuadData:
    """Regression rows for the quadratic oracle L = ½‖(W0 + sBA)x − y‖² (oracle O8, docs/oracles.md)."""

    def __init__(self, X: torch.Tensor, Y: torch.Tensor):
        self.X, self.Y = X, Y

    def __len__(self):
        return len(self.X)

    def batch(self, idx):
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return {"x": self.X[idx], "y": self.Y[idx]}


def quad_loss(model, batch):
    """Mean over examples of ½‖f(x) − y‖² (a per-sample-mean loss, as Opacus expects)."""
    return 0.5 * ((model(batch["x"]) - batch["y"]) ** 2).sum(dim=1).mean()


def train_cfg(**kw):
    base = dict(optimizer="sgd", lr=0.1, lr_decay=1.0, weight_decay=0.0, momentum=0.0, batch_size=4, grad_accum=1,
                local_steps=1, local_epochs=0.0, eval_batch_size=32)
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.fixture
def tiny_config():
    """A valid config for a fast end-to-end run on the real MiniLM with a handful of SST-2 rows."""
    def make(*overrides):
        return load_config(None, ["rounds=2", "model.max_length=32", "data.max_train_examples=72",
                                  "data.max_eval_examples=32", "clients.num=3", "clients.partition=iid",
                                  "train.batch_size=8", "train.local_steps=2", *overrides])
    return make


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    """A tiny random BERT classifier (2 layers, width 32) saved with save_pretrained beside MiniLM's real tokenizer
    files: a model folder the engine loads like any local model, in a fraction of a second."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from fedlora.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("toy") / "tiny-bert"
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def fedlora_run(*args, fault=None):
    """``fedlora run --quiet ARGS`` in a fresh process from the repository root, offline; ``fault="PHASE@ROUND"``
    kills it there (``FEDLORA_FAULT``, engine/rundir.py)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FEDLORA_FAULT", None)
    if fault:
        env["FEDLORA_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fedlora", "run", "--quiet", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], env=env, timeout=600)
