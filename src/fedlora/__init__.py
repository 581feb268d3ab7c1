"""fedlora: federated fine-tuning of foundation models with LoRA adapters.

Public API::

    from fedlora import load_config, run_experiment
    cfg = load_config("examples/tiny.toml", ["method=fedit"])
    result = run_experiment(cfg, out_dir="runs/tiny")
    tokenizer, model = load_adapter("runs/tiny")   # the run's exact model (base + PEFT adapter + pooling), eval mode
"""
from fedlora.config import ExperimentConfig, load_config
from fedlora.errors import ConfigError, DataError, FedloraError, ModelError, PrivacyBudgetError

__version__ = "0.1.0"


def run_experiment(cfg, out_dir=None, progress=True):
    """Run ``cfg`` with the in-process engine and return a :class:`fedlora.engine.simulation.RunResult`."""
    from fedlora.engine.simulation import run_experiment as _run

    return _run(cfg, out_dir=out_dir, progress=progress)


def load_adapter(path, base_model=None):
    """``(tokenizer, model)``: a run's adapter on its base model through PEFT, with the run's pooling
    (:func:`fedlora.models.load_adapter`)."""
    from fedlora.models import load_adapter as _load

    return _load(path, base_model=base_model)


__all__ = ["ExperimentConfig", "load_config", "run_experiment", "load_adapter", "ConfigError", "DataError", "FedloraError",
           "ModelError", "PrivacyBudgetError", "__version__"]
