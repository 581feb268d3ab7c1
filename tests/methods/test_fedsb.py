"""Fed-SB: LoRA-SB's initialisation (float64 oracle), the exact average of the r x r cores, the plans (B and A sent
once, then kept), the core layer inside a PEFT model and its PEFT export, DP-SGD on the core, and exact resume."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.adapters import Adapter, LoraModule
from fedlora.methods import get_method
from fedlora.methods.base import Update
from fedlora.methods.fedsb import lora_sb_factors
from tests.conftest import fedlora_run

ROOT = Path(__file__).resolve().parents[2]


def _method(head="aggregate", **fedsb):
    section = types.SimpleNamespace(init_examples=8, init_lr=1e-3, unaccounted_init=False, **fedsb)
    cfg = types.SimpleNamespace(lora=types.SimpleNamespace(head=head), server=None, fedsb=section)
    return get_method("fedsb")(cfg)


def test_initial_factors_are_the_best_rank_r_approximation_of_the_sign_step():
    """B = U_r, A = V_rᵀ (orthonormal) and s·B R A = the best rank-r approximation of −η′·sign(G) (Eckart–Young,
    computed here with numpy's SVD), so R = Σ_r / s."""
    rng = np.random.default_rng(0)
    G = rng.normal(size=(6, 5))
    G[0, 0] = 0.0  # sign(0) = 0: an entry with no gradient moves nothing
    step, scale, r = 1e-3, 2.0, 2
    A, B, R = lora_sb_factors(torch.from_numpy(G), r, step, scale)
    U, S, Vt = np.linalg.svd(-step * np.sign(G), full_matrices=False)
    best = (U[:, :r] * S[:r]) @ Vt[:r]
    np.testing.assert_allclose(scale * (B @ R @ A).numpy(), best, atol=1e-15)
    np.testing.assert_allclose((B.T @ B).numpy(), np.eye(r), atol=1e-12)
    np.testing.assert_allclose((A @ A.T).numpy(), np.eye(r), atol=1e-12)
    np.testing.assert_allclose(R.numpy(), np.diag(S[:r]) / scale, atol=1e-15)
    assert A.dtype == B.dtype == R.dtype == torch.float64


def test_average_of_cores_is_exact_and_factors_are_sent_once():
    method = _method()
    A = torch.linalg.qr(torch.randn(5, 2, dtype=torch.float64))[0].T.contiguous()
    B = torch.linalg.qr(torch.randn(4, 2, dtype=torch.float64))[0]
    initial = Adapter({"m": LoraModule(A, B, 4.0, torch.zeros(2, 2, dtype=torch.float64))},
                      {"head.weight": torch.zeros(2, 4, dtype=torch.float64)})
    state = method.init_state(initial)
    first = method.configure(1, state, [0, 1, 2])
    assert all(set(p.download) == {"m.lora_A.weight", "m.lora_B.weight", "m.lora_R.weight", "head.weight"}
               for p in first)
    assert first[0].train == first[0].upload == {"lora_R", "head"} and first[0].keep == {"lora_A", "lora_B"}
    torch.manual_seed(0)
    Rs = [torch.randn(2, 2, dtype=torch.float64) for _ in range(3)]
    sizes = [10, 20, 30]
    updates = [Update(k, n, {"m.lora_R.weight": R, "head.weight": torch.full((2, 4), float(k), dtype=torch.float64)})
               for k, (n, R) in enumerate(zip(sizes, Rs))]
    updates[2].report["state_restarted"] = 1  # lost B and A: trained R on the wrong factors
    new = method.aggregate(1, state, updates)
    m = new.adapter.modules["m"]
    assert torch.equal(m.A, A) and torch.equal(m.B, B)  # fixed for the whole run
    mean = (10 * Rs[0] + 20 * Rs[1]) / 30
    torch.testing.assert_close(m.R, mean, rtol=0, atol=1e-15)
    exact = sum(n * m.scale * B @ R @ A for n, R in zip(sizes[:2], Rs[:2])) / 30  # Σ p_k ΔW_k
    torch.testing.assert_close(m.delta(), exact, rtol=0, atol=1e-15)
    assert new.extra["holding"] == [0, 1]
    later = {p.client_id: p for p in method.configure(2, new, [0, 2])}
    assert set(later[0].download) == {"m.lora_R.weight", "head.weight"} and later[0].config["returning"]
    assert "m.lora_B.weight" in later[2].download and not later[2].config["returning"]


def test_core_layer_in_a_peft_model_and_its_folded_export(toy_model_dir, tmp_path):
    """The core sits between A and B inside PEFT's own forward: logits equal the base model with W0 + s·B R A
    written into its weights; the exported adapter (core folded into B) loads in plain PEFT with the same logits."""
    from transformers import AutoModelForSequenceClassification

    from fedlora.lora import LoraSlots, add_lora_cores, export_peft_adapter, inject_lora, load_peft_adapter

    lora_cfg = types.SimpleNamespace(rank=2, alpha=4.0, dropout=0.0, target_modules=["query", "value"])
    base = AutoModelForSequenceClassification.from_pretrained(toy_model_dir).eval()
    reference = AutoModelForSequenceClassification.from_pretrained(toy_model_dir).eval()
    model = inject_lora(base, lora_cfg)
    add_lora_cores(model)
    slots = LoraSlots.of(model)
    assert {k for k in slots.params if k.endswith("lora_R.weight")} == {n + ".lora_R.weight" for n in slots.shapes}
    torch.manual_seed(1)
    adapter = slots.read()
    for m in adapter.modules.values():
        m.A, m.B, m.R = torch.randn_like(m.A), torch.randn_like(m.B), torch.randn_like(m.R)
    slots.load(adapter)
    assert [p for p in slots.set_trainable(frozenset({"lora_R"}))] == [slots.params[k] for k in sorted(slots.params)
                                                                        if k.endswith("lora_R.weight")]
    with torch.no_grad():
        for name, m in adapter.modules.items():
            reference.get_submodule(name).weight += m.delta()
    x = torch.randint(0, 1000, (3, 7))
    with torch.no_grad():
        ours, theirs = model(input_ids=x).logits, reference(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    export_peft_adapter(adapter, lora_cfg, "SEQ_CLS", str(toy_model_dir), tmp_path / "adapter")
    loaded = load_peft_adapter(AutoModelForSequenceClassification.from_pretrained(toy_model_dir), tmp_path / "adapter")
    assert not any("lora_R" in k or ".core." in k for k, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours, rtol=1e-5, atol=1e-5)


def test_server_sample_is_seeded_and_spread_over_the_clients():
    from fedlora.engine.weight_gradients import server_sample

    sample = server_sample([5, 0, 7, 3], 6, seed=0)
    assert sample == server_sample([5, 0, 7, 3], 6, seed=0)
    assert sum(len(r) for _, r in sample) == 6 and all(k != 1 for k, _ in sample)
    assert all(rows == sorted(set(rows)) and max(rows) < [5, 0, 7, 3][k] for k, rows in sample)
    assert len({k for k, _ in server_sample([50] * 4, 20, seed=0)}) == 4  # spread over the clients, not the first
    assert server_sample([2, 1], 10, seed=0) == [(0, [0, 1]), (1, [0])]  # all rows when n ≥ their number


TOY = ["rounds=2", "model.max_length=24", "data.max_train_examples=60", "data.max_eval_examples=16", "clients.num=3",
       "clients.partition=iid", "train.batch_size=8", "train.local_steps=2", "train.lr=0.05", "model.threads=1",
       "method=fedsb", "fedsb.init_examples=12"]


def test_initial_adapter_reproduces_the_approximated_first_step(toy_model_dir, tmp_path):
    """The engine's weight gradients equal a plain autograd pass over the same server rows (dropout off), and the
    run starts from s·B R A = trunc_r(−η′ sign(G)) with η′ = lr / (rounds × local steps)."""
    from fedlora.config import load_config
    from fedlora.engine.prepare import prepare
    from fedlora.engine.runtime import build_engine, build_method
    from fedlora.engine.weight_gradients import server_sample, summed_weight_gradients

    cfg = load_config(None, [*TOY, f"model.name={toy_model_dir}"])
    eng = build_engine(prepare(cfg), log=lambda *_: None)
    for module in eng.model.modules():  # dropout off, so that the plain pass below sees the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    method = build_method(cfg, eng.spec)
    initial = eng.spec.initial(ranks=eng.default_ranks)
    grads = summed_weight_gradients(eng, initial, 12, log=lambda *_: None)
    inner = eng.model.base_model.model
    expected = {n: torch.zeros_like(g) for n, g in grads.items()}
    with eng.model.disable_adapter():
        for k, rows in server_sample([len(x) for x in eng.client_train], 12, cfg.seed):
            for i in rows:  # one example at a time: the sum over examples, independent of batching
                inner.zero_grad(set_to_none=True)
                for name in grads:
                    inner.get_submodule(name).get_base_layer().weight.requires_grad_(True)
                eng.prepared.task.loss(eng.model, eng.client_train[k].batch([i])).backward()
                for name in grads:
                    w = inner.get_submodule(name).get_base_layer().weight
                    expected[name] += w.grad.double()
                    w.requires_grad_(False)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-6)
    fitted = method.initial_from_gradients(initial, grads)
    eta = 0.05 / (2 * 2)
    for name, m in fitted.modules.items():
        update = -eta * torch.sign(grads[name])
        U, S, Vh = torch.linalg.svd(update)
        r = m.rank
        torch.testing.assert_close(m.delta().double(), (U[:, :r] * S[:r]) @ Vh[:r], rtol=1e-5, atol=1e-8)


def test_fedsb_under_dp_is_refused_unless_the_unaccounted_init_is_allowed(toy_model_dir, tmp_path):
    from fedlora.config import load_config
    from fedlora.engine.prepare import prepare
    from fedlora.engine.simulation import run_experiment
    from fedlora.errors import ConfigError

    dp = ["dp.enabled=true", "dp.epsilon=8", "rounds=1"]
    with pytest.raises(ConfigError, match="unaccounted_init"):
        prepare(load_config(None, [*TOY, f"model.name={toy_model_dir}", *dp]))
    with pytest.raises(ConfigError, match="zero head"):
        prepare(load_config(None, [*TOY, "model.head_init=zero"]))
    with pytest.raises(ConfigError, match="fedsb.init_lr"):
        prepare(load_config(None, [*TOY, "train.local_epochs=2"]))
    assert prepare(load_config(None, [*TOY, "train.local_epochs=2", "fedsb.init_lr=1e-6"])).cfg.fedsb.init_lr == 1e-6
    res = run_experiment(load_config(None, [*TOY, f"model.name={toy_model_dir}", *dp, "fedsb.unaccounted_init=true"]),
                         out_dir=tmp_path / "dp", progress=False, log=lambda *_: None)
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert 0 < summary["max_epsilon"] <= 8.0


def test_fedsb_resumes_exactly_with_the_factors_kept_on_the_clients(toy_model_dir, tmp_path):
    args = [a for o in [*TOY, "rounds=3", f"model.name={toy_model_dir}"] for a in ("--set", o)]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert fedlora_run(*args, "--out", str(full)).returncode == 0
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    r_bytes = rows[1]["upload_bytes"]
    assert rows[0]["download_bytes"] > 4 * rows[1]["download_bytes"]  # B and A only in the first round
    assert rows[1]["download_bytes"] == rows[2]["download_bytes"] == r_bytes  # then R and the head, both ways
    r = fedlora_run(*args, "--out", str(cut), fault="train@2")
    assert r.returncode == -9, r.stderr[-500:]
    r = fedlora_run("--resume", str(cut))
    assert r.returncode == 0, r.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the run started from LoRA-SB's fitted factors: orthonormal A (the shared-seed Kaiming A is not), and a non-zero
    # B·R (with B = 0 the core would get no gradient and only the head would train)
    for key, value in a.items():
        if key.endswith("lora_A.weight"):
            torch.testing.assert_close(value @ value.T, torch.eye(value.shape[0]), atol=1e-5, rtol=0)
        elif key.endswith("lora_B.weight"):
            assert float(value.abs().max()) > 0
    # what each client kept is those fitted factors: the export's A
    for f in sorted((full / "client_state").iterdir()):
        kept = load_file(str(f))
        As = {k: v for k, v in kept.items() if k.endswith("lora_A.weight")}
        assert As and all(torch.equal(v, a["base_model.model." + k]) for k, v in As.items())
