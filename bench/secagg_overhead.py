"""What secure aggregation (SecAgg+) costs on a loopback deployment: the same experiment on a real SuperLink and
SuperNodes (127.0.0.1), with and without ``secure.aggregation``, measured side by side in one run.

    python bench/secagg_overhead.py [--rounds 4] [--nodes 3] [--repeats 2] [--config examples/tiny.toml]
                                    [--set key=value ...]

A round's seconds are the ServerApp's own ``wall_s`` (metrics.jsonl).  Round 1 includes starting the client
processes and loading the model, so only rounds 2.. are compared; the plain and secure federations alternate
``--repeats`` times so that drift of the machine falls on both.  Traffic is what the server sent and received per
round: the tensors (plain), or the tensors sent plus the protocol's keys, key shares and masked vectors (secure).
The secure runs also report the seconds the SecAgg+ stages took inside a round.  Last line
``secagg_ratio=<secure s/round ÷ plain s/round, rounds 2..>``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "examples/tiny.toml"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    args = ap.parse_args()
    from fedlora.config import load_config
    from fedlora.engine.loopback import LoopbackFederation

    overrides = [f"rounds={args.rounds}", f"clients.num={args.nodes}", "model.threads=1", *args.overrides]
    cfg = load_config(args.config, overrides)
    runs: dict[str, list[list[dict]]] = {"plain": [], "secure": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, extra in (("plain", []), ("secure", ["secure.aggregation=true"])):
                out = Path(tmp) / f"{name}-{rep}"
                with LoopbackFederation(args.nodes, Path(tmp) / f"federation-{name}-{rep}") as fed:
                    res = fed.run(ROOT, {"config": args.config, "overrides": ";".join(overrides + extra),
                                         "out-dir": str(out)}, timeout=3600)
                if res.returncode != 0:
                    print(res.stdout[-3000:], file=sys.stderr)
                    return 1
                runs[name].append(_rows(out))
                later = [r["wall_s"] for r in runs[name][-1][1:]]
                print(f"  {name} #{rep + 1}: rounds 2.. {statistics.mean(later):.2f} s/round", file=sys.stderr)

    def per_round(name: str, key: str) -> float:
        return statistics.mean(r[key] for rows in runs[name] for r in rows[1:])

    plain_s, secure_s = per_round("plain", "wall_s"), per_round("secure", "wall_s")
    stages = statistics.mean(r["secure_aggregation"]["seconds"] for rows in runs["secure"] for r in rows[1:])
    print(f"# {cfg.method} on {cfg.model.name}, {args.nodes} SuperNodes on loopback, {args.rounds} rounds x "
          f"{args.repeats} repeats, {cfg.train.local_steps} local steps of batch {cfg.train.batch_size} "
          f"({os.cpu_count()} cores; rounds 2.. compared)")
    print("| run | s/round | upload B/round | download B/round |")
    print("|---|---|---|---|")
    for name, s in (("plain", plain_s), ("SecAgg+", secure_s)):
        key = "plain" if name == "plain" else "secure"
        print(f"| {name} | {s:.2f} | {per_round(key, 'upload_bytes'):,.0f} | {per_round(key, 'download_bytes'):,.0f} |")
    names = list(runs["secure"][0][-1]["secure_aggregation"]["stage_seconds"])
    stage_rows = [r["secure_aggregation"]["stage_seconds"] for rows in runs["secure"] for r in rows[1:]]
    split = ", ".join(f"{n} {statistics.mean(r[n] for r in stage_rows):.1f} s" for n in names)
    print(f"SecAgg+ stages inside a round: {stages:.2f} s ({split}; the training is in collect_masked_vectors); "
          f"upload ratio {per_round('secure', 'upload_bytes') / per_round('plain', 'upload_bytes'):.2f}x")
    print(f"secagg_ratio={secure_s / plain_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
