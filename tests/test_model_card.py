"""The adapter's model card (issue 19): Hub metadata a PEFT adapter page shows, and what a reader needs later."""
import yaml

from fedlora import __version__
from fedlora.config import load_config
from fedlora.model_card import command_line, render

SUMMARY = {"method": "ffa", "rounds": 12, "final_accuracy": 0.7912, "headline_metric": "accuracy",
           "final_score": 0.7912, "total_upload_bytes": 5_000_000, "total_download_bytes": 4_000_000,
           "max_epsilon": 2.9931, "wall_s": 1234.5, "client_train_examples": [700, 710, 690], "num_clients": 3}


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_private_run_card_states_the_guarantee_the_paper_and_the_command():
    cfg = load_config(None, ["method=ffa", "dp.enabled=true", "dp.epsilon=3", "clients.num=3",
                             "clients.partition=label_skew", "rounds=12"])
    text = render(cfg, SUMMARY, command="fedlora run --config examples/ffa_dp_sst2.toml", pooling="mean")
    meta = _front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "text-classification" and meta["datasets"] == ["stanfordnlp/sst2"]
    assert {"fedlora", "federated-learning", "ffa", "differential-privacy"} <= set(meta["tags"])
    for needle in ("Sun et al., Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024",
                   "ε = 2.9931 spent (target 3)", "δ = 1e-05", "label_skew over 3 clients", "700, 710, 690",
                   "| accuracy (final, headline) | 0.7912 |", "fedlora run --config examples/ffa_dp_sst2.toml",
                   'method = "ffa"', f"fedlora {__version__}", "rounds | 12", "mean-pooled"):
        assert needle in text, needle


def test_non_private_instruction_card():
    cfg = load_config(None, ["method=flexlora", 'model.name="smollm2"', 'data.task="instruction"',
                             'data.train="bundled:superni/train"', 'data.validation="bundled:superni/validation"',
                             'clients.partition="by_task"', "model.max_length=128"])
    summary = {**SUMMARY, "method": "flexlora", "max_epsilon": None, "headline_metric": "rougeL", "final_score": 0.31,
               "final_accuracy": None}
    text = render(cfg, summary, command="x")
    meta = _front_matter(text)
    assert meta["pipeline_tag"] == "text-generation" and "differential-privacy" not in meta["tags"]
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "datasets" not in meta
    assert "none (not differentially private)" in text and "| rougeL (final, headline) | 0.3100 |" in text
    assert "fedlora generate RUN_DIR" in text and "Super-NaturalInstructions" in text


def test_personal_card_and_command_line():
    cfg = load_config(None, ["method=fedsa"])
    text = render(cfg, SUMMARY, command="x", client=2)
    assert "client 2's personal adapter" in text and "--client 2" in text
    assert command_line(["/usr/bin/fedlora", "run", "--set", "a=b c"]) == "fedlora run --set 'a=b c'"
    assert command_line(["/x/src/fedlora/__main__.py", "info"]) == "fedlora info"
    assert command_line(["train.py", "--x"]) == "python train.py --x"
