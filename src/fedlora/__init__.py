"""fedlora: federated fine-tuning of foundation models with LoRA adapters.

Public API::

    from fedlora import load_config, run_experiment
    cfg = load_config("examples/tiny.toml", ["method=fedit"])
    result = run_experiment(cfg, out_dir="runs/tiny")
"""
from fedlora.config import ExperimentConfig, load_config
from fedlora.errors import ConfigError, DataError, FedloraError, ModelError, PrivacyBudgetError

__version__ = "0.1.0"


def run_experiment(cfg, out_dir=None, progress=True):
    """Run ``cfg`` with the in-process engine and return a :class:`fedlora.engine.simulation.RunResult`."""
    from fedlora.engine.simulation import run_experiment as _run

    return _run(cfg, out_dir=out_dir, progress=progress)


__all__ = ["ExperimentConfig", "load_config", "run_experiment", "ConfigError", "DataError", "FedloraError",
           "ModelError", "PrivacyBudgetError", "__version__"]
