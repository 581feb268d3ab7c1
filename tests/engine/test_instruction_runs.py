"""End to end on the real SmolLM2-135M (converted once from its GGUF) with 3 tiny SuperNI clients of different
LoRA ranks: every heterogeneous-rank method runs 2 rounds, counts its real traffic and exports a PEFT adapter."""
import json

import pytest
import torch

from fedlora.config import load_config
from fedlora.engine.simulation import run_experiment

RANKS = [1, [2, 4], 4]  # [attention, MLP] per client
TARGETS = ["q_proj", "up_proj"]
LAYERS, D, D_MLP = 30, 576, 1536
HEADER = 2 * LAYERS * len(TARGETS) * 150  # generous bound on one client's safetensors header (JSON per tensor)


def _cfg(method, *extra):
    return load_config(None, [
        f"method={method}", "rounds=2", 'model.name="smollm2"', "model.max_length=80",
        f"lora.target_modules={json.dumps(TARGETS)}", 'lora.rank_distribution="explicit"',
        f"lora.client_ranks={json.dumps(RANKS)}", 'data.task="instruction"', 'data.train="bundled:superni/train"',
        'data.validation="bundled:superni/validation"', 'clients.partition="by_task"', "clients.num=3",
        "clients.heldout_tasks=1", "train.batch_size=2", "train.local_steps=1", "train.lr=1e-3", "train.lr_decay=1.0",
        "train.eval_batch_size=4", "eval.per_client=false", "eval.max_client_examples=2", "eval.max_new_tokens=4",
        *extra])


def _upload_floats(attn, mlp):
    return LAYERS * (attn * (D + D) + mlp * (D + D_MLP))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for method in ("flexlora", "hetlora", "flora", "fedit"):
        out[method] = run_experiment(_cfg(method), out_dir=tmp_path_factory.mktemp(method) / "run", progress=False,
                                     log=lambda *_: None)
    return out


@pytest.mark.parametrize("method", ["flexlora", "hetlora", "flora", "fedit"])
def test_two_rounds_on_smollm2_with_heterogeneous_clients(runs, method):
    res = runs[method]
    rows = res.metrics
    assert [r["round"] for r in rows] == [1, 2] and all(r["clients"] == 3 for r in rows)
    assert all(0.0 <= r["rougeL_teacher_forced"] <= 1.0 and r["eval_loss"] > 0 for r in rows)
    assert 0.0 <= rows[-1]["rougeL"] <= 1.0  # generated text, after the last round
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["headline_metric"] == "rougeL" and summary["final_score"] == rows[-1]["rougeL"]
    clients = json.loads((res.run_dir / "clients.json").read_text())
    assert len(clients["heldout_tasks"]) == 1 and len(clients["clients"]) == 3
    # measured uplink = the client factors at their own ranks (fedit: everyone at the smallest, r1), fp32
    if method == "fedit":
        expected = 3 * _upload_floats(1, 1) * 4
    else:
        expected = sum(_upload_floats(*((r, r) if isinstance(r, int) else r)) for r in RANKS) * 4
    assert expected < rows[0]["upload_bytes"] < expected + 3 * HEADER
    assert (res.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_flora_downlink_is_the_stack_of_every_client(runs):
    rows = runs["flora"].metrics
    assert rows[0]["download_bytes"] < 1000  # round 1: fresh LoRA everywhere, nothing to merge
    stack = sum(_upload_floats(*((r, r) if isinstance(r, int) else r)) for r in RANKS) * 4
    assert 3 * stack < rows[1]["download_bytes"] < 3 * (stack + HEADER)  # each client downloads all 3 clients' factors


def test_flexlora_downlink_is_each_clients_truncation(runs):
    rows = runs["flexlora"].metrics
    assert rows[0]["download_bytes"] < 1000
    expected = sum(_upload_floats(*((r, r) if isinstance(r, int) else r)) for r in RANKS) * 4
    assert expected < rows[1]["download_bytes"] < expected + 3 * HEADER


@pytest.mark.parametrize("method", ["flexlora", "flora"])
def test_exported_adapter_reloads_in_peft_and_reproduces_the_evaluation(runs, method):
    """The PEFT folder (per-module ranks via rank_pattern) gives the same response loss as our merged evaluation."""
    from peft import PeftModel

    from fedlora.data.instruction import InstructionTask
    from fedlora.engine.simulation import prepare
    from fedlora.models import load_causal_lm

    cfg = _cfg(method)
    prepared = prepare(cfg)
    tok, base = load_causal_lm(cfg.model)
    model = PeftModel.from_pretrained(base, str(runs[method].run_dir / "adapter"))
    task: InstructionTask = prepared.task
    rows = [task.val_rows[i] for i in prepared.global_eval_rows]
    ev = task.evaluate(model, tok, task.tokenise(tok, rows, cfg.model.max_length), 4)
    assert ev["loss"] == pytest.approx(runs[method].metrics[-1]["eval_loss"], rel=1e-4)


def test_hetlora_clients_report_their_tail_norm(runs):
    state = runs["hetlora"].adapter
    assert {m.rank for m in state.modules.values()} == {4}  # the global adapter lives at r_max


def test_a_rank_larger_than_a_module_fails_before_training(tmp_path):
    from fedlora.errors import ModelError

    cfg = load_config(None, ["method=flexlora", 'model.name="smollm2"', "model.max_length=80",
                             'lora.target_modules=["k_proj"]', 'lora.rank_distribution="explicit"',
                             "lora.client_ranks=[4, 300]", 'data.task="instruction"',
                             'data.train="bundled:superni/train"', 'data.validation="bundled:superni/validation"',
                             'clients.partition="by_task"', "clients.num=2"])
    with pytest.raises(ModelError, match="r300 = 300 exceeds .*k_proj .*192"):
        run_experiment(cfg, out_dir=tmp_path / "r", progress=False, log=lambda *_: None)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_instruction_data_needs_a_by_task_partition():
    from fedlora.engine.simulation import prepare
    from fedlora.errors import ConfigError

    cfg = _cfg("flexlora", 'clients.partition="iid"', "clients.heldout_tasks=0")
    with pytest.raises(ConfigError, match="by_task"):
        prepare(cfg)


def test_unseen_tasks_never_train(runs):
    clients = json.loads((runs["flexlora"].run_dir / "clients.json").read_text())
    seen = {c["task"] for c in clients["clients"]}
    assert not seen & set(clients["heldout_tasks"])
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("method", ["flora", "hetlora"])
def test_a_run_resumed_after_round_1_ends_exactly_where_the_uninterrupted_run_does(runs, method, tmp_path):
    """Checkpoints hold the methods' own state (FLoRA's merged base update, HetLoRA's pruned ranks)."""
    out = tmp_path / "run"
    run_experiment(_cfg(method, "rounds=1"), out_dir=out, progress=False, log=lambda *_: None)
    resumed = run_experiment(_cfg(method), out_dir=out, progress=False, log=lambda *_: None, resume=True)
    full = runs[method].metrics[-1]
    assert resumed.metrics[-1]["eval_loss"] == full["eval_loss"]
    assert resumed.metrics[-1]["rougeL_teacher_forced"] == full["rougeL_teacher_forced"]
    assert [r["upload_bytes"] for r in resumed.metrics] == [r["upload_bytes"] for r in runs[method].metrics]


def test_fed_pilot_assigns_smollm2_blocks_within_budgets(tmp_path):
    """Layer assignment works on the decoder too: 30 blocks of q_proj/up_proj LoRA, 3 memory groups."""
    from fedlora.report import read_metrics

    cfg = load_config(None, [
        "method=pilot", "rounds=1", 'model.name="smollm2"', "model.max_length=80",
        f"lora.target_modules={json.dumps(TARGETS)}", "lora.rank=2", 'data.task="instruction"',
        'data.train="bundled:superni/train"', 'data.validation="bundled:superni/validation"',
        'clients.partition="by_task"', "clients.num=3", "clients.heldout_tasks=1", "train.batch_size=2",
        "train.local_steps=1", "train.eval_batch_size=4", "eval.per_client=false", "eval.max_client_examples=2",
        "eval.max_new_tokens=4", "memory.budgets=[0.3, 0.6, 1.0]", "memory.calibrate=false", "pilot.ig_examples=4"])
    res = run_experiment(cfg, out_dir=tmp_path / "run", progress=False, log=lambda *_: None)
    row = read_metrics(res.run_dir)[0]
    info = json.loads((res.run_dir / "clients.json").read_text())
    budgets = {str(c["client"]): c["memory_budget_mb"] for c in info["clients"]}
    assert len(info["memory_model"]["per_layer_activation_mb"]) == LAYERS
    for cid, layers in row["layers_trained"].items():
        assert row["memory_predicted_mb_per_client"][cid] <= budgets[cid] * (1 + 1e-9)
        assert all(0 <= j < LAYERS for j in layers)
    assert len(row["layers_trained"]["2"]) == LAYERS  # the full budget trains every block
    assert 0 < len(row["layers_trained"]["0"]) < LAYERS


def test_generate_continues_the_training_prompt_greedily(runs, tmp_path, capsys):
    """`fedlora generate` (issue 19): the prompt is the one training built (Alpaca template, the run's columns and
    truncation), and the response is the adapter model's greedy continuation up to eos or max_new_tokens."""
    import fedlora
    from fedlora.cli import main
    from fedlora.data.instruction import InstructionTask
    from fedlora.models import load_adapter, load_causal_lm

    run = runs["fedit"].run_dir
    cfg = _cfg("fedit")
    task = InstructionTask(cfg.data, seed=cfg.seed)
    rows = task.val_rows[:2]
    texts = fedlora.generate(run, rows, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    tok, _ = load_causal_lm(cfg.model)
    blank = [{**r, cfg.data.output_column: ""} for r in rows]
    prompts = InstructionTask.prompts_only({"instruction": "definition", "input": "input", "output": "output"})
    assert prompts.tokenise(tok, blank, 80).prompt_ids == task.tokenise(tok, blank, 80).prompt_ids
    _, model = load_adapter(run)
    ids = torch.tensor([task.tokenise(tok, blank[:1], 80).prompt_ids[0]])
    with torch.no_grad():
        for _ in range(4):  # greedy by hand
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    prompt_len = len(task.tokenise(tok, blank[:1], 80).prompt_ids[0])
    assert texts[0] == tok.decode(ids[0, prompt_len:], skip_special_tokens=True)
    assert fedlora.generate(run, [(rows[0]["definition"], rows[0]["input"])], max_new_tokens=4) == texts[:1]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"definition": rows[0]["definition"], "input": rows[0]["input"], "id": 3}) + "\n")
    assert main(["generate", str(run), "--file", str(src), "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["id"] == 3 and out["generated"] == texts[0]
    assert main(["predict", str(run), "a text"]) == 2
    assert "needs a classification adapter" in capsys.readouterr().err
