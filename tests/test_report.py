"""Metrics files: one CSV row per round with the contract columns first, per-client values as columns, a PNG."""
import csv
import json

from fedlora.report import BASE_COLUMNS, MAX_CSV_CLIENT_COLUMNS, MetricsLog, plot_run, read_metrics


def _row(t, n_clients=3):
    return {"round": t, "loss": 0.5 / t, "accuracy": 0.6 + t / 100, "eval_loss": 0.4, "upload_bytes": 100 * t,
            "download_bytes": 90 * t, "epsilon": 0.5 * t, "clients": n_clients, "wall_s": 1.0,
            "epsilon_per_client": {k: 0.1 * k * t for k in range(n_clients)},
            "client_accuracy": {k: 0.5 for k in range(n_clients)}, "dropped": {}}


def test_csv_and_jsonl_are_rewritten_every_round(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_row(1))
    with open(tmp_path / "metrics.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1
    log.append(_row(2))
    with open(tmp_path / "metrics.csv") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames[:len(BASE_COLUMNS)] == BASE_COLUMNS
    assert [r["round"] for r in rows] == ["1", "2"]
    assert rows[1]["epsilon_per_client.2"] == str(0.1 * 2 * 2)
    assert read_metrics(tmp_path) == json.loads(json.dumps(log.rows))


def test_many_clients_stay_out_of_the_csv(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_row(1, n_clients=MAX_CSV_CLIENT_COLUMNS + 1))
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "epsilon_per_client" not in header
    assert len(read_metrics(tmp_path)[0]["epsilon_per_client"]) == MAX_CSV_CLIENT_COLUMNS + 1


def test_columns_sort_clients_numerically(tmp_path):
    log = MetricsLog(tmp_path)
    log.append(_row(1, n_clients=12))
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    eps = [h for h in header if h.startswith("epsilon_per_client.")]
    assert eps == [f"epsilon_per_client.{k}" for k in range(12)]


def test_plot_is_a_png(tmp_path):
    plot_run([_row(1), _row(2)], tmp_path / "m.png", title="t")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
