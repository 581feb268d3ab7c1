"""`fedlora compare` and `fedlora report`: grid cells on identical partitions, resumable, summary table and plots."""
import csv
import json

import pytest

from fedlora.cli import main
from fedlora.grid import Cell, parse_grid, parse_method_overrides, plan_cells
from fedlora.errors import ConfigError

TINY = ["--set", "rounds=1", "--set", "data.max_train_examples=48", "--set", "data.max_eval_examples=16",
        "--set", "train.local_steps=1", "--set", "train.batch_size=8", "--set", "model.max_length=16",
        "--set", "eval.per_client=false"]


def test_grid_parsing_and_cell_overrides():
    assert parse_grid(["dp.epsilon=1,3,inf", "lora.rank=4"]) == [("dp.epsilon", ["1", "3", "inf"]),
                                                                ("lora.rank", ["4"])]
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid(["dp.epsilon"])
    with pytest.raises(ConfigError, match="use --methods"):
        parse_grid(["method=ffa"])
    assert Cell("ffa", 0, (("dp.epsilon", "inf"),)).overrides() == ["method=ffa", "seed=0", "dp.enabled=false"]
    assert Cell("ffa", 1, (("dp.epsilon", "3"),)).overrides() == ["method=ffa", "seed=1", "dp.enabled=true",
                                                                 "dp.epsilon=3"]


def test_every_cell_is_validated_before_anything_runs():
    with pytest.raises(ConfigError, match=r"cell method=nope.*method must be one of"):
        plan_cells("examples/tiny.toml", [], ["ffa", "nope"], 1, [])
    with pytest.raises(ConfigError, match=r"cell .*lora.rank=0.*lora.rank must be a positive integer"):
        plan_cells("examples/tiny.toml", [], ["ffa"], 1, parse_grid(["lora.rank=8,0"]))
    cells = plan_cells("examples/tiny.toml", [], ["fedit", "ffa"], 3, parse_grid(["lora.rank=4,8"]))
    assert len(cells) == 12 and len({c.name for c, _ in cells}) == 12
    # a value the bare config lacks may come from the grid: a given DP noise multiplier with no epsilon target
    cells = plan_cells("examples/tiny.toml", ["dp.enabled=true", "dp.epsilon=0"], ["ffa"], 1,
                       parse_grid(["dp.noise_multiplier=0.5,1.0"]))
    assert [cfg.dp.noise_multiplier for _, cfg in cells] == [0.5, 1.0]
    with pytest.raises(ConfigError, match=r"dp.epsilon must be a positive finite target"):
        plan_cells("examples/tiny.toml", ["dp.enabled=true", "dp.epsilon=0"], ["ffa"], 1, [])


def test_compare_contract_then_resume_then_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--config", "examples/tiny.toml", "--methods", "fedit,ffa", "--seeds", "2", "--out", str(out),
            "--quiet", *TINY]
    assert main(args) == 0
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["method"] for r in rows} == {"fedit", "ffa"} and all(r["seeds"] == "2" for r in rows)
    for r in rows:
        assert 0 <= float(r["final_accuracy_mean"]) <= 1 and float(r["final_accuracy_std"]) >= 0
    up = {r["method"]: float(r["total_upload_bytes"]) for r in rows}
    assert 0.5 < up["ffa"] / up["fedit"] < 0.52  # measured: B (+head) vs A and B
    assert (out / "accuracy.png").is_file() and (out / "communication.png").is_file()
    assert "Who won where" in (out / "summary.md").read_text()
    # identical client partitions for one seed across methods, different ones across seeds
    digests = {}
    for d in (out / "cells").iterdir():
        digests.setdefault(d.name.split("__")[-1], set()).add(json.loads((d / "summary.json").read_text())
                                                              ["partition_sha256"])
    assert sorted(digests) == ["seed=0", "seed=1"] and all(len(v) == 1 for v in digests.values())
    assert digests["seed=0"] != digests["seed=1"]
    # resume: nothing finished is re-run
    mtimes = {d.name: (d / "summary.json").stat().st_mtime_ns for d in (out / "cells").iterdir()}
    victim = sorted(mtimes)[0]
    (out / "cells" / victim / "summary.json").unlink()  # as if that cell had been killed after its last checkpoint
    capsys.readouterr()
    assert main(args) == 0
    log = capsys.readouterr().out
    assert log.count("finished earlier, kept") == 3 and f"{victim}: resuming" in log
    after = {d.name: (d / "summary.json").stat().st_mtime_ns for d in (out / "cells").iterdir()}
    assert all(after[k] == v for k, v in mtimes.items() if k != victim)
    # a cell finished by an older fedlora, whose config.toml lacks a key added since, is still the same settings
    cfg_file = out / "cells" / victim / "config.toml"
    cfg_file.write_text("".join(line for line in cfg_file.read_text().splitlines(keepends=True)
                                if not line.startswith("prox_mu")))
    capsys.readouterr()
    assert main(args) == 0 and capsys.readouterr().out.count("finished earlier, kept") == 4
    # the same directory with different settings is refused, not mixed
    assert main([*args, "--set", "lora.rank=4"]) == 2
    assert "finished with a different configuration" in capsys.readouterr().err
    # report rebuilds from saved metrics only
    (out / "summary.csv").unlink()
    assert main(["report", str(out)]) == 0 and (out / "summary.csv").is_file()


def test_report_of_a_single_run_and_of_nothing(tmp_path, capsys):
    d = tmp_path / "run"
    assert main(["run", "--config", "examples/tiny.toml", "--out", str(d), "--quiet", *TINY]) == 0
    (d / "metrics.csv").unlink()
    (d / "metrics.png").unlink()
    assert main(["report", str(d)]) == 0
    assert (d / "metrics.csv").is_file() and (d / "metrics.png").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_per_method_overrides_apply_to_that_method_only():
    per = parse_method_overrides(["fedit:train.lr=1e-3", "fedit:lora.alpha=8"], ["fedit", "ffa"])
    cells = plan_cells("examples/tiny.toml", ["train.lr=0.02"], ["fedit", "ffa"], 1, [], per)
    lrs = {c.method: (cfg.train.lr, cfg.lora.alpha) for c, cfg in cells}
    assert lrs == {"fedit": (1e-3, 8.0), "ffa": (0.02, 16.0)}
    with pytest.raises(ConfigError, match="METHOD:KEY=VALUE"):
        parse_method_overrides(["train.lr=1"], ["ffa"])
    with pytest.raises(ConfigError, match="not one of --methods"):
        parse_method_overrides(["fedsa:train.lr=1"], ["ffa"])


def test_parallel_cells_match_sequential_ones(tmp_path, capsys):
    """--jobs 2: cells run in two spawned processes; each cell is the same run as in a sequential compare."""
    common = ["compare", "--config", "examples/tiny.toml", "--methods", "fedit,ffa", "--quiet", *TINY]
    assert main([*common, "--out", str(tmp_path / "seq")]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    log = capsys.readouterr().out
    assert log.count("in parallel") == 2 and log.count(": done") == 2
    for method in ("fedit", "ffa"):
        seq, par = (json.loads((tmp_path / kind / "cells" / f"method={method}__seed=0" / "summary.json").read_text())
                    for kind in ("seq", "par"))
        assert seq["partition_sha256"] == par["partition_sha256"]
        assert par["final_accuracy"] == pytest.approx(seq["final_accuracy"], abs=1 / 16)  # thread count may differ
    with open(tmp_path / "par" / "summary.csv") as fh:
        assert {r["method"] for r in csv.DictReader(fh)} == {"fedit", "ffa"}
    assert main([*common, "--out", str(tmp_path / "bad"), "--jobs", "0"]) == 2
    assert "--jobs must be a positive integer" in capsys.readouterr().err


def test_report_lays_out_a_two_key_grid_and_plots_privacy_spent(tmp_path):
    """partition × ε cells: accuracy panels in rows × columns, privacy.png from the rounds' ε (no model runs)."""
    from matplotlib.image import imread

    from fedlora.grid import report_compare

    plan = []
    for method in ("fedit", "ffa"):
        for part in ("iid", "skew"):
            for eps in ("1", "3", "inf"):
                cell = Cell(method, 0, (("clients.partition", part), ("dp.epsilon", eps)))
                d = tmp_path / "cells" / cell.name
                d.mkdir(parents=True)
                spent = [None if eps == "inf" else float(eps) * (0.8 + 0.1 * r) for r in range(3)]
                (d / "metrics.jsonl").write_text("".join(
                    json.dumps({"round": r + 1, "accuracy": 0.5 + 0.1 * r, "epsilon": spent[r]}) + "\n"
                    for r in range(3)))
                (d / "summary.json").write_text(json.dumps({
                    "final_accuracy": 0.7, "total_upload_bytes": 100 if method == "ffa" else 200,
                    "total_download_bytes": 200, "max_epsilon": spent[-1], "wall_s": 1.0}))
                plan.append({"cell": cell.name, "method": method, "seed": 0, "grid": dict(cell.grid)})
    (tmp_path / "compare.json").write_text(json.dumps(plan))
    rows = report_compare(tmp_path)
    assert len(rows) == 12
    height, width = imread(tmp_path / "accuracy.png").shape[:2]
    assert width > height  # 2 rows of 3 panels, not 6 panels in one row
    assert 1.0 < width / height < 2.5
    assert (tmp_path / "privacy.png").is_file()
    with open(tmp_path / "summary.csv") as fh:
        eps = {(r["method"], r["clients.partition"], r["dp.epsilon"]): r["max_epsilon"] for r in csv.DictReader(fh)}
    assert float(eps[("ffa", "skew", "3")]) == pytest.approx(3.0) and eps[("ffa", "skew", "inf")] == ""


def test_accuracy_plot_joins_the_evaluated_rounds(tmp_path, monkeypatch):
    """With evaluation every 2nd round, each curve is drawn through the evaluated rounds only (no NaN gaps, no
    empty-slice warnings from the rounds nobody evaluated)."""
    import warnings

    import matplotlib.pyplot as plt

    from fedlora.grid import report_compare

    plan = []
    for seed in (0, 1):
        cell = Cell("ffa", seed, ())
        d = tmp_path / "cells" / cell.name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("".join(json.dumps(
            {"round": r, "accuracy": 0.5 + 0.05 * r + 0.01 * seed if r % 2 == 0 else None}) + "\n" for r in range(1, 7)))
        (d / "summary.json").write_text(json.dumps({"final_accuracy": 0.8, "total_upload_bytes": 1,
                                                    "total_download_bytes": 1, "wall_s": 1.0}))
        plan.append({"cell": cell.name, "method": "ffa", "seed": seed, "grid": {}})
    (tmp_path / "compare.json").write_text(json.dumps(plan))
    drawn = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (drawn.append(fig), real_close(fig)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report_compare(tmp_path)
    line = drawn[0].axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [2, 4, 6]
    assert list(line.get_ydata()) == pytest.approx([0.605, 0.705, 0.805])
