"""Table-driven (PEFT's style): every registered method — built in or brought by a package through the
``fedlora.methods`` entry point — runs one round end to end on a toy model with only its ``minimal_overrides``,
and leaves a PEFT adapter that loads and has learned something.  A new method is tested by registering it."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

from fedlora.config import load_config
from fedlora.engine.simulation import run_experiment
from fedlora.methods import available_methods, get_method

TOY = ["rounds=1", "model.max_length=24", "data.max_train_examples=48", "data.max_eval_examples=16",
       "clients.num=3", "clients.partition=iid", "train.batch_size=8", "train.local_steps=2", "train.lr=0.05",
       "model.threads=1"]


def _one_round(name: str, model_dir, out):
    overrides = [*TOY, f"model.name={model_dir}", f"method={name}", *get_method(name).minimal_overrides]
    return run_experiment(load_config(None, overrides), out_dir=out, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("name", available_methods())
def test_every_registered_method_runs_a_round_and_exports_a_peft_adapter(name, toy_model_dir, tmp_path):
    from fedlora.models import load_adapter

    res = _one_round(name, toy_model_dir, tmp_path / "run")
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["clients"] == 3 and rows[0]["rejected"] == 0
    assert rows[0]["upload_bytes"] > 0 and 0.0 <= rows[0]["accuracy"] <= 1.0
    flat = res.adapter.to_flat()
    assert all(torch.isfinite(v).all() for v in flat.values())
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["method"] == name
    tokenizer, model = load_adapter(res.run_dir)  # what a user loads: PEFT on the base model
    assert any("lora_B" in k for k, _ in model.named_parameters())
    # ... gives the model the run scored: the same validation loss, so evaluation and export agree for every method
    # (a base offset, a folded core or a merged stack included)
    from fedlora.engine.prepare import prepare

    cfg = load_config(None, [*TOY, f"model.name={toy_model_dir}", f"method={name}", *get_method(name).minimal_overrides])
    prepared = prepare(cfg)
    _, _, global_val = prepared.task.client_examples(tokenizer, prepared, cfg.model.max_length)
    scored = prepared.task.score(model, tokenizer, global_val, cfg, False)
    assert scored["eval_loss"] == pytest.approx(rows[0]["eval_loss"], rel=1e-4, abs=1e-5)
    if not get_method(name)(load_config(None, [f"method={name}"])).personal_roles():
        assert any(float(m.B.abs().max()) > 0 for m in res.adapter.modules.values()), "no LoRA B factor moved"
        return
    # a personalised method: B stays on the clients; each client's own adapter is exported and loads in PEFT
    _, personal = load_adapter(res.run_dir / "personal" / "client-0")
    assert any(float(p.abs().max()) > 0 for k, p in personal.named_parameters() if "lora_B" in k), "no B moved"


def _documented_plugin() -> str:
    """The plugin example of docs/architecture.md ("From another package"), exactly as documented."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text(encoding="utf-8")
    start = doc.index("# my_fedlora_methods/halfstep.py")
    return doc[start:doc.index("```", start)]


PLUGIN = _documented_plugin()


def test_a_method_registered_through_an_entry_point_runs(tmp_path, monkeypatch, toy_model_dir):
    """A package on the path with a ``fedlora.methods`` entry point (its dist-info, as pip installs it) adds a method
    that configs may name and the engine runs, without touching fedlora."""
    (tmp_path / "halfstep_plugin.py").write_text(textwrap.dedent(PLUGIN))
    info = tmp_path / "halfstep_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: halfstep-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedlora.methods]\nhalfstep = halfstep_plugin:HalfStep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from fedlora.methods import base

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the plugin does not outlive this test
    monkeypatch.delitem(sys.modules, "halfstep_plugin", raising=False)
    assert "halfstep" in available_methods()
    res = _one_round("halfstep", toy_model_dir, tmp_path / "run")
    assert json.loads((res.run_dir / "summary.json").read_text())["method"] == "halfstep"
    assert get_method("halfstep").__module__ == "halfstep_plugin"


def test_an_unknown_method_is_refused_with_the_available_ones():
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="method must be one of .*fedit"):
        load_config(None, ["method=nosuchmethod"])
