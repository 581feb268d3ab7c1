"""Seconds per round of the same experiment on three engines, measured side by side in one run: the in-process
engine (`fedlora run`), Flower's simulation runtime (Ray actors, `run_simulation`), and a loopback deployment (a real
SuperLink and SuperNodes on 127.0.0.1, `flwr run`).

    python bench/flower_overhead.py [--rounds 3] [--nodes 3] [--config examples/tiny.toml] [--set key=value ...]

A round's seconds are the ServerApp's own `wall_s` (metrics.jsonl): sending the plans, the clients' local work,
receiving, aggregating, evaluating and checkpointing.  Round 1 includes starting the client processes and loading
the model on them, so the table gives the mean of rounds 2.. as well.  The last line is
``deployment_ratio=<deployment s/round ÷ in-process s/round, rounds 2..>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]


def _walls(run_dir: Path) -> list[float]:
    return [json.loads(line)["wall_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/tiny.toml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    from fedlora.config import load_config
    from fedlora.engine import flower
    from fedlora.engine.loopback import LoopbackFederation
    from fedlora.engine.simulation import run_experiment

    overrides = [f"rounds={args.rounds}", f"clients.num={args.nodes}", "model.threads=1", *args.overrides]
    cfg = load_config(args.config, overrides)
    results: dict[str, tuple[list[float], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        run_experiment(cfg, out_dir=tmp / "inproc", progress=False, log=lambda *_: None)
        results["in-process"] = (_walls(tmp / "inproc"), time.time() - t0)

        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation

        run_config = {"config": args.config, "overrides": ";".join(overrides)}
        server = ServerApp()

        @server.main()
        def _main(grid, context):
            flower.run_on_grid(grid, {**run_config, "out-dir": str(tmp / "simulation")}, log=lambda *_: None)

        t0 = time.time()
        run_simulation(server, flower.client_app, num_supernodes=args.nodes,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": os.cpu_count(), "logging_level": "ERROR"}})
        results["Flower simulation runtime"] = (_walls(tmp / "simulation"), time.time() - t0)

        t0 = time.time()
        with LoopbackFederation(args.nodes, tmp / "federation") as fed:
            res = fed.run(ROOT, {**run_config, "out-dir": str(tmp / "deployment")}, timeout=3600)
            if res.returncode != 0:
                print(res.stdout[-3000:], file=sys.stderr)
                return 1
        results["loopback deployment"] = (_walls(tmp / "deployment"), time.time() - t0)

    base = sum(results["in-process"][0][1:]) / max(1, len(results["in-process"][0]) - 1)
    print(f"# {cfg.method} on {cfg.model.name}, {args.nodes} clients, {args.rounds} rounds, "
          f"{cfg.train.local_steps} local steps of batch {cfg.train.batch_size} (measured, {os.cpu_count()} cores)")
    print("| engine | round 1 s | rounds 2.. s/round | ratio to in-process (rounds 2..) | end-to-end s |")
    print("|---|---|---|---|---|")
    ratio = {}
    for name, (walls, total) in results.items():
        later = sum(walls[1:]) / max(1, len(walls) - 1)
        ratio[name] = later / base
        print(f"| {name} | {walls[0]:.1f} | {later:.2f} | {ratio[name]:.2f}× | {total:.1f} |")
    print(f"deployment_ratio={ratio['loopback deployment']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
