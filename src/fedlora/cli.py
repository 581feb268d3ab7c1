"""Command line: a thin layer over the Python API (:mod:`fedlora.api`, :mod:`fedlora.inference`).

    fedlora run [--config FILE] [--set KEY=VALUE ...] [--out DIR] [--resume RUN_DIR]
    fedlora compare --methods fedit,ffa [--seeds N] [--grid KEY=V1,V2] --out DIR
    fedlora report PATH
    fedlora predict RUN TEXT [TEXT_PAIR] | --file IN.jsonl [--output OUT.jsonl]
    fedlora generate RUN INSTRUCTION [INPUT] | --file IN.jsonl [--output OUT.jsonl]
    fedlora export RUN --merged --out DIR
    fedlora info [--config-keys]

Bad input exits with status 2 and a one-paragraph message on stderr (no traceback).
"""
from __future__ import annotations

import argparse
import sys

from fedlora.console import quiet_console


RUN_EXAMPLES = """examples:
  fedlora run                                        # FFA-LoRA on the bundled MiniLM and SST-2, offline
  fedlora run --config examples/tiny.toml --set method=fedit --set rounds=2
  fedlora run --resume runs/20261202-120000-ffa      # continue an interrupted run

every config key, its default and its meaning: fedlora info --config-keys
"""


def _parser() -> argparse.ArgumentParser:
    from fedlora import __version__

    ap = argparse.ArgumentParser(prog="fedlora", description="Federated fine-tuning with LoRA adapters.")
    ap.add_argument("--version", action="version", version=f"fedlora {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one federated experiment (defaults: FFA-LoRA, MiniLM, SST-2, offline)",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RUN_EXAMPLES)
    run.add_argument("--config", help="TOML config file (see examples/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set lora.rank=4 (repeatable)")
    run.add_argument("--out", help="run directory (default: runs/<time>-<method>)")
    run.add_argument("--resume", metavar="RUN_DIR",
                     help="continue an interrupted run from its last checkpoint (uses RUN_DIR/config.toml)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true",
                     help="check config, data, model, ranks and DP budget, print the plan (clients, ranks, steps, "
                          "sigma, traffic) and exit without training")
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
    for name, what, second in (("predict", "classify text with a run's adapter", "TEXT_PAIR"),
                               ("generate", "greedy generation from an instruction run's adapter", "INPUT")):
        p = sub.add_parser(name, help=what)
        p.add_argument("run", help="a run directory or an adapter folder")
        p.add_argument("text", nargs="?", help="the text" if name == "predict" else "the instruction")
        p.add_argument("second", nargs="?", metavar=second,
                       help="the second text of a sentence pair" if name == "predict" else "the instruction's input")
        p.add_argument("--file", help="a JSON Lines file of inputs with the run's own column names")
        p.add_argument("--output", help="with --file: write one JSON line per input here (default: stdout)")
        p.add_argument("--client", type=int, help="client K's personal adapter (personalised methods)")
        p.add_argument("--base-model", help="the base model, if it moved since the run (alias, hub id or folder)")
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    exp = sub.add_parser("export", help="write the adapter merged into its base model (a plain transformers model)")
    exp.add_argument("run", help="a run directory or an adapter folder")
    exp.add_argument("--merged", action="store_true", required=True,
                     help="merge the adapter into the base weights (PEFT merge_and_unload)")
    exp.add_argument("--out", required=True, help="a new or empty folder")
    exp.add_argument("--client", type=int, help="client K's personal adapter (personalised methods)")
    exp.add_argument("--base-model", help="the base model, if it moved since the run (alias, hub id or folder)")
    info = sub.add_parser("info", help="list methods, models, data, partitioners and config keys")
    info.add_argument("--config-keys", action="store_true", help="also list every config key with its help")
    return ap


def _print_plan(plan: dict) -> None:
    clients = plan["clients"]
    print(f"plan: {plan['method']} on {plan['model']}, {len(clients)} clients ({plan['clients_per_round']} per round), "
          f"{plan['rounds']} rounds, {plan['validation_examples']} validation rows")
    private = plan["dp"] is not None
    print("  client  train  val  ranks  steps/round" + ("  sigma    q" if private else ""))
    for row in clients[:20]:
        line = (f"  {row['client']:>6}  {row['train_examples']:>5}  {row['validation_examples']:>3}  "
                f"{row['ranks']:>5}  {row['local_steps']:>11}")
        if private:
            line += f"  {row['noise_multiplier']:.3f}  {row['sample_rate']:.4f}"
        print(line)
    if len(clients) > 20:
        print(f"  ... {len(clients) - 20} more")
    if private:
        dp = plan["dp"]
        print(f"DP-SGD per client: epsilon <= {dp['epsilon']:g} at delta = {dp['delta']:g}, clip {dp['clip']:g} "
              f"(the budget is reachable: sigma calibrated for every client)")
    print("trainable parameters per client: " + ", ".join(f"{k}: {v:,}" for k, v in plan["trainable_parameters"].items()))
    print(f"round 1 traffic: {plan['round1_download_bytes'] / 1e6:.2f} MB down, {plan['round1_upload_bytes'] / 1e6:.2f} "
          f"MB up (measured on the encoded plans; later rounds may differ by method)")
    print("dry run: nothing was trained or written")


def _cmd_run(args) -> int:
    from fedlora import api
    from fedlora.errors import ConfigError

    if args.dry_run:
        if args.resume:
            raise ConfigError("--dry-run checks a new run; drop --resume")
        _print_plan(api.plan(args.config, args.overrides, out=args.out))
        return 0
    api.run(args.config, args.overrides, out=args.out, resume=args.resume, progress=not args.quiet)
    return 0


def _cmd_compare(args) -> int:
    from pathlib import Path

    from fedlora import api

    api.compare(args.config, args.methods, args.overrides, out=args.out, seeds=args.seeds, grid=args.grid,
                method_overrides=args.method_overrides, jobs=args.jobs, progress=not args.quiet)
    print((Path(args.out) / "summary.md").read_text(encoding="utf-8"))
    return 0


def _inputs(args, command: str) -> list:
    from fedlora.errors import ConfigError
    from fedlora.inference import read_jsonl

    if args.file:
        if args.text is not None:
            raise ConfigError(f"`fedlora {command}`: give inputs either as arguments or with --file, not both")
        return read_jsonl(args.file)
    if args.output:
        raise ConfigError("--output goes with --file (one output line per input line)")
    if args.text is None:
        raise ConfigError(f"`fedlora {command}` needs an input: a text argument or --file IN.jsonl")
    return [(args.text, args.second) if args.second is not None else args.text]


def _emit(args, inputs: list, outputs: list[dict]) -> None:
    import json

    from fedlora.inference import write_jsonl

    if args.file:
        rows = [{**row, **out} for row, out in zip(inputs, outputs)]
        if args.output:
            write_jsonl(rows, args.output)
            print(f"wrote {len(rows)} rows to {args.output}")
        else:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False))


def _cmd_predict(args) -> int:
    from fedlora.inference import predict

    inputs = _inputs(args, "predict")
    results = predict(args.run, inputs, client=args.client, base_model=args.base_model)
    if args.file:
        _emit(args, inputs, [{"prediction": r["label"], "probabilities": r["probabilities"]} for r in results])
    else:
        r = results[0]
        print(f"{r['label']}\t" + "  ".join(f"p({k})={v:.4f}" for k, v in r["probabilities"].items()))
    return 0


def _cmd_generate(args) -> int:
    from fedlora.inference import generate

    inputs = _inputs(args, "generate")
    texts = generate(args.run, inputs, client=args.client, base_model=args.base_model,
                     max_new_tokens=args.max_new_tokens)
    if args.file:
        _emit(args, inputs, [{"generated": t} for t in texts])
    else:
        print(texts[0])
    return 0


def _cmd_export(args) -> int:
    from fedlora.inference import export_merged

    target = export_merged(args.run, args.out, client=args.client, base_model=args.base_model)
    print(f"wrote the merged model and its tokenizer to {target}")
    return 0


def _cmd_report(args) -> int:
    from pathlib import Path

    from fedlora.grid import report_compare, report_run
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
    from pathlib import Path

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
    print("partitioners: iid, dirichlet (clients.dirichlet_alpha), label_skew (FFA-LoRA's fixed proportions), "
          "by_task (one client per data.client_column value: FlexLoRA's one SuperNI task per client)")
    print("optimisers: adamw, sgd;  DP-SGD: [dp] enabled = true (Opacus, RDP accounting)")
    from fedlora.server_optimizer import OPTIMIZERS

    averaging = [n for n in available_methods() if get_method(n).accepts_server_optimizer]
    print(f"server optimisers (server.optimizer): {', '.join(OPTIMIZERS)} — for {', '.join(averaging)}")
    print("local objective: FedProx (train.prox_mu = mu; Li et al., MLSys 2020) — for every method, also under DP")
    print("tracking: track.tensorboard = true, track.mlflow = URI, track.wandb = 'offline' (pip install 'fedlora[track]')")
    print("using a run: fedlora predict / generate / export --merged; fedlora run --dry-run checks without training")
    examples = Path(__file__).resolve().parents[2] / "examples"  # a clone of the repository
    if examples.is_dir():
        print(f"example configs ({examples}):")
        for path in sorted(examples.glob("*.toml")):
            first = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                          if line.startswith("#")), "")
            print(f"  {path.name:<22} {first[:90]}")
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
        return {"run": _cmd_run, "compare": _cmd_compare, "report": _cmd_report, "predict": _cmd_predict,
                "generate": _cmd_generate, "export": _cmd_export, "info": _cmd_info}[args.command](args)
    except FedloraError as exc:
        print(f"fedlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlora: interrupted; every completed round is checkpointed in the run directory: continue with "
              "`fedlora run --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
