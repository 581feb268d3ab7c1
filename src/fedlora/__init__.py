"""fedlora: federated fine-tuning of foundation models with LoRA adapters.

Public API (every CLI command is a thin layer over it)::

    import fedlora
    summary = fedlora.run("examples/tiny.toml", ["method=fedit"], out="runs/tiny")     # -> summary.json as a dict
    rows = fedlora.compare("examples/tiny.toml", ["fedit", "ffa"], seeds=2, out="runs/cmp")
    fedlora.predict("runs/tiny", ["a gripping, beautifully acted film"])    # [{"label": ..., "probabilities": ...}]
    fedlora.export_merged("runs/tiny", "out/model")                          # a plain transformers model
    tokenizer, model = fedlora.load_adapter("runs/tiny")   # the run's exact model (base + PEFT adapter + pooling)
"""
from fedlora.config import ExperimentConfig, load_config
from fedlora.errors import ConfigError, DataError, FedloraError, ModelError, PrivacyBudgetError

__version__ = "0.1.0"


def run(config=None, overrides=(), out=None, **kwargs) -> dict:
    """Run one experiment; returns its summary (:func:`fedlora.api.run`)."""
    from fedlora.api import run as _run

    return _run(config, overrides, out, **kwargs)


def compare(config=None, methods=("fedit", "ffa"), overrides=(), **kwargs) -> list:
    """Run methods x seeds x grid on identical partitions; one row per cell group (:func:`fedlora.api.compare`)."""
    from fedlora.api import compare as _compare

    return _compare(config, methods, overrides, **kwargs)


def plan(config=None, overrides=(), out=None, **kwargs) -> dict:
    """Check everything a run needs and return its plan without training (:func:`fedlora.api.plan`)."""
    from fedlora.api import plan as _plan

    return _plan(config, overrides, out, **kwargs)


def predict(run, inputs, **kwargs) -> list:
    """Classify texts with a run's adapter (:func:`fedlora.inference.predict`)."""
    from fedlora.inference import predict as _predict

    return _predict(run, inputs, **kwargs)


def generate(run, inputs, **kwargs) -> list:
    """Greedy generation with an instruction run's adapter (:func:`fedlora.inference.generate`)."""
    from fedlora.inference import generate as _generate

    return _generate(run, inputs, **kwargs)


def export_merged(run, out, **kwargs):
    """The adapter merged into its base model, as a plain transformers model (:func:`fedlora.inference.export_merged`)."""
    from fedlora.inference import export_merged as _export

    return _export(run, out, **kwargs)


def run_experiment(cfg, out_dir=None, progress=True):
    """Run ``cfg`` with the in-process engine and return a :class:`fedlora.engine.simulation.RunResult`."""
    from fedlora.engine.simulation import run_experiment as _run

    return _run(cfg, out_dir=out_dir, progress=progress)


def load_adapter(path, base_model=None):
    """``(tokenizer, model)``: a run's adapter on its base model through PEFT, with the run's pooling
    (:func:`fedlora.models.load_adapter`)."""
    from fedlora.models import load_adapter as _load

    return _load(path, base_model=base_model)


__all__ = ["ExperimentConfig", "load_config", "run", "compare", "plan", "predict", "generate", "export_merged",
           "run_experiment", "load_adapter", "ConfigError", "DataError", "FedloraError",
           "ModelError", "PrivacyBudgetError", "__version__"]
