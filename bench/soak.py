"""A long run stays flat: resident memory, open files and seconds per round sampled every ``--every`` rounds of a
long `fedlora run`, with their slopes; the checkpoint kept stays one; a run killed at ``--resume-at`` and resumed
ends with the same adapter as the uninterrupted run.

    python bench/soak.py [--rounds 200] [--every 10] [--resume-at 150] [--flexlora-rounds 50] [--out runs/soak]

Runs (each a real `fedlora run` process, offline; the bench reads its ``/proc`` entries while it runs):
1. ``examples/tiny.toml`` for ``--rounds`` rounds, uninterrupted (the one measured);
2. the same killed (SIGKILL, ``FEDLORA_FAULT=metrics@<resume-at>``) and continued with ``--resume``: its final adapter
   must equal run 1's byte for byte;
3. ``examples/flexlora_tiny.toml`` (SmolLM2, heterogeneous ranks) for ``--flexlora-rounds`` rounds, measured the same
   way (``--flexlora-rounds 0`` skips it).
Slopes are least-squares fits over the samples after the first (the first rounds warm caches up). Last line
``rss_growth_mb_per_100_rounds=<x> s_per_round_growth=<y>`` (run 1's; the second is seconds per round gained per 100
rounds).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _proc(pid: int) -> tuple[float, float, int]:
    """(resident MB now, peak resident MB so far, open file descriptors) of process ``pid``."""
    fields = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    rss = float(fields["VmRSS"].split()[0]) / 1024
    hwm = float(fields["VmHWM"].split()[0]) / 1024
    return rss, hwm, len(os.listdir(f"/proc/{pid}/fd"))


def _rounds_done(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _fedlora(args: list[str], log: Path, fault: str | None = None) -> subprocess.Popen:
    """``fedlora run --quiet ARGS`` in a fresh process; its output goes to ``log`` (read back if it fails)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FEDLORA_FAULT", None)
    if fault:
        env["FEDLORA_FAULT"] = fault
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedlora", "run", "--quiet", *args], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def _failed(what: str, log: Path) -> SystemExit:
    return SystemExit(f"{what} failed:\n{log.read_text()[-3000:]}")


def watch(args: list[str], run_dir: Path, every: int) -> list[dict]:
    """Run ``fedlora run ARGS --out RUN_DIR`` and sample the process each time ``every`` more rounds are done."""
    log = run_dir.with_name(run_dir.name + ".log")
    proc = _fedlora([*args, "--out", str(run_dir)], log)
    samples, next_round = [], every
    while proc.poll() is None:
        rows = _rounds_done(run_dir)
        if len(rows) >= next_round:
            try:
                rss, hwm, fds = _proc(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            walls = [float(r["wall_s"]) for r in rows[next_round - every:next_round]]
            checkpoints = len([p for p in run_dir.iterdir() if p.name.startswith("checkpoint")])
            samples.append({"round": next_round, "rss_mb": rss, "peak_rss_mb": hwm, "open_files": fds,
                            "s_per_round": sum(walls) / len(walls), "checkpoints": checkpoints})
            print(f"  round {next_round}: rss {rss:.0f} MB (peak {hwm:.0f}), {fds} open files, "
                  f"{samples[-1]['s_per_round']:.2f} s/round, {checkpoints} checkpoint dir(s)", flush=True)
            next_round += every
        time.sleep(0.5)
    if proc.wait() != 0:
        raise _failed("fedlora run", log)
    return samples


def slope_per_100(samples: list[dict], key: str) -> float:
    pts = samples[1:] if len(samples) > 2 else samples
    if len(pts) < 2:
        return float("nan")
    x = np.array([s["round"] for s in pts], dtype=float)
    y = np.array([s[key] for s in pts], dtype=float)
    return float(np.polyfit(x, y, 1)[0] * 100)


def same_adapter(a: Path, b: Path) -> bool:
    fa, fb = a / "adapter" / "adapter_model.safetensors", b / "adapter" / "adapter_model.safetensors"
    return fa.is_file() and fb.is_file() and fa.read_bytes() == fb.read_bytes()


def _report(name: str, samples: list[dict]) -> tuple[float, float]:
    rss, spr = slope_per_100(samples, "rss_mb"), slope_per_100(samples, "s_per_round")
    fds, peak = slope_per_100(samples, "open_files"), slope_per_100(samples, "peak_rss_mb")
    print(f"| {name} | {samples[-1]['round'] if samples else 0} | {samples[0]['rss_mb']:.0f} → {samples[-1]['rss_mb']:.0f} "
          f"| {rss:+.1f} | {samples[0]['peak_rss_mb']:.0f} → {samples[-1]['peak_rss_mb']:.0f} ({peak:+.1f}) "
          f"| {samples[0]['open_files']} → {samples[-1]['open_files']} ({fds:+.1f}) | "
          f"{samples[0]['s_per_round']:.2f} → {samples[-1]['s_per_round']:.2f} ({spr:+.3f}) | "
          f"{max(s['checkpoints'] for s in samples)} |")
    return rss, spr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--resume-at", type=int, default=150)
    ap.add_argument("--flexlora-rounds", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "soak")
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    tiny = ["--config", "examples/tiny.toml", "--set", f"rounds={args.rounds}"]
    print(f"# soak: examples/tiny.toml × {args.rounds} rounds, sampled every {args.every} -> {out}", flush=True)
    samples = watch(tiny, out / "tiny", args.every)
    print(f"# the same, killed at round {args.resume_at} and resumed", flush=True)
    log = out / "tiny-resumed.log"
    _fedlora([*tiny, "--out", str(out / "tiny-resumed")], log, fault=f"metrics@{args.resume_at}").wait()
    if _fedlora(["--resume", str(out / "tiny-resumed")], log).wait() != 0:
        raise _failed("resume", log)
    equal = same_adapter(out / "tiny", out / "tiny-resumed")
    flex = []
    if args.flexlora_rounds:
        print(f"# examples/flexlora_tiny.toml × {args.flexlora_rounds} rounds", flush=True)
        flex = watch(["--config", "examples/flexlora_tiny.toml", "--set", f"rounds={args.flexlora_rounds}"],
                     out / "flexlora", args.every)
    print()
    print("| run | rounds | RSS MB (first → last sample) | RSS slope MB / 100 rounds | peak RSS MB (slope) | "
          "open files (slope) | s / round (slope per 100 rounds) | checkpoint dirs (max) |")
    print("|---|---|---|---|---|---|---|---|")
    rss, spr = _report("tiny.toml", samples)
    if flex:
        _report("flexlora_tiny.toml", flex)
    print(f"resumed at round {args.resume_at}: final adapter {'identical' if equal else 'DIFFERENT'} to the "
          f"uninterrupted run's")
    print(f"rss_growth_mb_per_100_rounds={rss:.1f} s_per_round_growth={spr:.3f}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
