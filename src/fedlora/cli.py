"""Command line: a thin layer over the public API.

    fedlora run [--config FILE] [--set KEY=VALUE ...] [--out DIR]
    fedlora info

Bad input exits with status 2 and a one-paragraph message on stderr (no traceback).
"""
from __future__ import annotations

import argparse
import sys

from fedlora.console import quiet_console


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with LoRA adapters.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment (defaults: FFA-LoRA, MiniLM, SST-2, offline)")
    run.add_argument("--config", help="TOML config file (see examples/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set lora.rank=4 (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/<time>-<method>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint (uses RUN_DIR/config.toml)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp = sub.add_parser("compare", help="run a grid of methods x seeds x config values on identical partitions")
    cmp.add_argument("--config", help="TOML config file shared by every cell")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key for every cell (repeatable)")
    cmp.add_argument("--methods", required=True, help="comma-separated methods, e.g. fedit,ffa")
    cmp.add_argument("--set-for", dest="method_overrides", action="append", default=[],
                     metavar="METHOD:KEY=VALUE", help="override a key for one method only, e.g. fedit:train.lr=1e-3")
    cmp.add_argument("--seeds", type=int, default=1, help="seeds per cell: seed, seed+1, ... (default 1)")
    cmp.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="a config key and its values (repeatable; cartesian product); dp.epsilon=inf = no DP")
    cmp.add_argument("--out", required=True, help="comparison directory (re-run the command to resume it)")
    cmp.add_argument("--jobs", type=int, default=1,
                     help="cells run at once, each in its own process with cpu_count/jobs threads (default 1)")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    rep = sub.add_parser("report", help="rebuild tables and plots of a run or comparison from its saved metrics")
    rep.add_argument("path", help="a run directory or a comparison directory")
    info = sub.add_parser("info", help="list methods, models, data, partitioners and config keys")
    info.add_argument("--config-keys", action="store_true", help="also list every config key with its help")
    return ap


def _cmd_run(args) -> int:
    from fedlora.config import load_config, to_toml
    from fedlora.engine.simulation import run_experiment

    if args.resume:
        from pathlib import Path

        from fedlora.errors import ConfigError

        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--resume RUN_DIR continues in RUN_DIR; drop --out")
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise ConfigError(f"{args.resume} is not a run directory (no config.toml)")
        cfg = load_config(args.config or saved, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    print("# resolved configuration\n" + to_toml(cfg), flush=True)
    run_experiment(cfg, out_dir=args.resume or args.out, progress=not args.quiet, resume=bool(args.resume))
    return 0


def _cmd_compare(args) -> int:
    from fedlora.compare import parse_grid, parse_method_overrides, plan_cells, run_compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cells = plan_cells(args.config, args.overrides, methods, args.seeds, parse_grid(args.grid),
                       parse_method_overrides(args.method_overrides, methods))
    print(f"fedlora compare: {len(cells)} runs ({len(methods)} methods x {args.seeds} seeds x grid) -> {args.out}",
          flush=True)
    out = run_compare(cells, args.out, progress=not args.quiet, jobs=args.jobs)
    print((out / "summary.md").read_text(encoding="utf-8"))
    return 0


def _cmd_report(args) -> int:
    from pathlib import Path

    from fedlora.compare import report_compare, report_run
    from fedlora.errors import ConfigError

    path = Path(args.path)
    if (path / "compare.json").is_file():
        report_compare(path)
        print((path / "summary.md").read_text(encoding="utf-8"))
    elif (path / "metrics.jsonl").is_file():
        report_run(path)
        print(f"rewrote {path / 'metrics.csv'} and {path / 'metrics.png'}")
    else:
        raise ConfigError(f"{path} is neither a run directory (metrics.jsonl) nor a comparison (compare.json)")
    return 0


def _cmd_info(args) -> int:
    from fedlora.config import describe
    from fedlora.data.sources import BUNDLED
    from fedlora.methods import available_methods, get_method
    from fedlora.models import BUNDLED_MODELS, resolve_model_path

    print("methods:")
    for name in available_methods():
        method = get_method(name)
        print(f"  {name:<8} {method.summary}" + (f"\n           paper: {method.citation}" if method.citation else ""))
    print("models (bundled, offline):")
    for alias, (_, desc) in BUNDLED_MODELS.items():
        try:
            where = resolve_model_path(alias)
        except Exception as exc:  # not installed: say how to get it
            where = f"not installed ({exc})"
        print(f"  {alias:<8} {desc}\n           {where}")
    print("  or any Hugging Face model id / local directory (model.name)")
    print("data (bundled):")
    for name in BUNDLED:
        print(f"  bundled:{name}")
    print("  or a local .jsonl/.json/.csv/.tsv/.parquet file (optionally .gz), or hf:DATASET_ID[:CONFIG]:SPLIT")
    print("partitioners: iid, dirichlet (clients.dirichlet_alpha), label_skew (FFA-LoRA's fixed proportions)")
    print("optimisers: adamw, sgd;  DP-SGD: [dp] enabled = true (Opacus, RDP accounting)")
    from fedlora.server_optimizer import OPTIMIZERS

    averaging = [n for n in available_methods() if get_method(n).accepts_server_optimizer]
    print(f"server optimisers (server.optimizer): {', '.join(OPTIMIZERS)} — for {', '.join(averaging)}")
    print("local objective: FedProx (train.prox_mu = mu; Li et al., MLSys 2020) — for every method, also under DP")
    if args.config_keys:
        print("config keys:")
        for key, default, help_ in describe():
            print(f"  {key} = {default!r}\n      {help_}")
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_console()
    args = _parser().parse_args(argv)
    from fedlora.errors import FedloraError

    try:
        return {"run": _cmd_run, "compare": _cmd_compare, "report": _cmd_report, "info": _cmd_info}[args.command](args)
    except FedloraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; every completed round is checkpointed in the run directory: continue with "
              "`fedlora run --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
