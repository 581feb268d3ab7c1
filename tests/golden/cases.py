"""Golden runs: short runs of every method, recorded once and compared in CI (architecture redesign, issue 16).

Each case is a config file and overrides, in-process unless its engine is ``"flower"`` (Flower's simulation
runtime).  ``model.threads = 1`` (and ``memory.calibrate = false`` for the layer methods) make every number a
function of the code alone.
``record.py`` writes ``<case>/adapter.safetensors`` (the exported PEFT adapter) and ``<case>/metrics.csv`` (without
the columns that measure time or memory); ``tests/test_golden.py`` re-runs each case and compares at rtol 1e-6.
Where a change deliberately alters a method's results it re-records that case in the same commit and says why.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TINY = "examples/tiny.toml"
PILOT = "examples/pilot_tiny.toml"
COMMON = ["rounds=2", "model.max_length=32", "data.max_train_examples=72", "data.max_eval_examples=24",
          "train.batch_size=8", "train.local_steps=2", "model.threads=1",
          "lora.rank=4", 'lora.target_modules=["query"]']  # small files: LoRA r=4 on the query of each block
HETERO = ['lora.rank_distribution="explicit"', "lora.client_ranks=[1, 2, 4]"]

CASES: dict[str, tuple[str, list[str], str]] = {
    "fedit": (TINY, ["method=fedit"], "inprocess"),
    "ffa": (TINY, ["method=ffa"], "inprocess"),
    "ffa_dp": (TINY, ["method=ffa", "dp.enabled=true", "dp.epsilon=8", "train.optimizer=\"sgd\"", "train.lr=0.5"],
               "inprocess"),
    "flexlora": (TINY, ["method=flexlora", *HETERO], "inprocess"),
    "hetlora": (TINY, ["method=hetlora", *HETERO], "inprocess"),
    "flora": (TINY, ["method=flora", *HETERO], "inprocess"),
    "pilot": (PILOT, ["method=pilot"], "inprocess"),
    "fedra": (PILOT, ["method=fedra"], "inprocess"),
    "topk": (PILOT, ["method=topk"], "inprocess"),
    "flower_ffa": (TINY, ["method=ffa"], "flower"),
    # recorded after the redesign (σ now travels in the plan): it must equal the in-process ffa_dp case
    "flower_ffa_dp": (TINY, ["method=ffa", "dp.enabled=true", "dp.epsilon=8", "train.optimizer=\"sgd\"",
                             "train.lr=0.5"], "flower"),
}
SAME_AS = {"flower_ffa": "ffa", "flower_ffa_dp": "ffa_dp"}  # a Flower run gives the in-process run's numbers
VOLATILE = ("wall_s", "memory_measured")  # columns that measure the machine, not the method


def overrides(case: str) -> list[str]:
    # memory.calibrate only where a memory model is built (a run refuses settings its method ignores)
    return COMMON + (["memory.calibrate=false"] if CASES[case][0] == PILOT else []) + CASES[case][1]


def run_case(case: str, out: Path) -> Path:
    """Run one golden case into ``out`` (a fresh directory) and return it."""
    from fedlora.config import load_config

    config, _, engine = CASES[case]
    cfg_path, extra = str(ROOT / config), overrides(case)
    if engine == "inprocess":
        from fedlora.engine.simulation import run_experiment

        run_experiment(load_config(cfg_path, extra), out_dir=out, progress=False, log=lambda *_: None)
        return out
    import os

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedlora.engine import flower

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    server = ServerApp()
    run_config = {"config": cfg_path, "overrides": ";".join(extra), "out-dir": str(out)}

    @server.main()
    def _main(grid, context):
        flower.run_on_grid(grid, run_config, log=lambda *_: None)

    run_simulation(server, flower.client_app, num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "logging_level": "ERROR"}})
    return out


def stable_metrics(run_dir: Path) -> str:
    """``metrics.csv`` without the columns that measure time or memory, as CSV text."""
    rows = list(csv.DictReader((Path(run_dir) / "metrics.csv").open(encoding="utf-8")))
    keep = [c for c in (rows[0].keys() if rows else []) if not any(v in c for v in VOLATILE)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, keep, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
