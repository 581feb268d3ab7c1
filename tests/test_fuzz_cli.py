"""Fuzzing the front door: generated configs and data files, valid and broken, through `fedlora run` (1 round, tiny).

Each example must either succeed (exit 0) or exit 2 with a one-paragraph message; an uncaught exception (a
traceback) fails the test.  Runs in-process through ``fedlora.cli.main`` so one example costs milliseconds when
validation stops it and a few seconds when it trains.
"""
import json
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedlora.cli import main
from fedlora.config import describe

BASE = ["rounds=1", "data.max_train_examples=40", "data.max_eval_examples=8", "clients.num=2",
        "clients.partition=iid", "train.local_steps=1", "train.batch_size=4", "model.max_length=16",
        "eval.per_client=false"]
KEYS = [k for k, _, _ in describe()]
VALUES = st.one_of(st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.booleans(), st.sampled_from(["", "x", "ffa", "fedit", "iid", "label_skew", "sgd", "median",
                                                   "frozen", "[]", "[[0.5,0.5],[0.5,0.5]]", '["query"]', "inf"]))


def _run(tmp_path, overrides, capsys):
    out = tmp_path / f"run{random.getrandbits(40)}"
    args = ["run", "--quiet", "--out", str(out)]
    for o in BASE + overrides:
        args += ["--set", o]
    code = main(args)  # an uncaught exception here fails the test: that is the point
    err = capsys.readouterr().err
    assert code in (0, 2)
    event(f"exit {code}")  # shown by --hypothesis-show-statistics (docs/reliability.md counts)
    if code == 2:
        message = [line for line in err.strip().splitlines() if line.startswith("fedlora: error:")]
        assert message and "Traceback" not in err
    return code


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(KEYS + ["nope", "lora.nope", "train"]), VALUES), max_size=3))
def test_fuzzed_overrides_succeed_or_fail_cleanly(tmp_path_factory, capsys, pairs):
    tmp = tmp_path_factory.mktemp("fz")
    overrides = [f"{k}={json.dumps(v) if isinstance(v, float) and v == v and abs(v) != float('inf') else v}"
                 for k, v in pairs]
    _run(tmp, overrides, capsys)


VALID_ROW = st.fixed_dictionaries({"sentence": st.text(alphabet="abcdefgh ", min_size=1, max_size=20).filter(str.strip),
                                   "label": st.sampled_from([0, 1])})
RANDOM_ROW = st.fixed_dictionaries({}, optional={
    "sentence": st.one_of(st.text(max_size=30), st.integers(), st.none()),
    "label": st.one_of(st.integers(-1, 3), st.sampled_from(["pos", "neg", ""]), st.none(), st.floats(width=16)),
    "other": st.text(max_size=5)})
ROW = st.one_of(VALID_ROW, VALID_ROW, VALID_ROW, RANDOM_ROW)  # mostly valid rows, so some files are usable


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.lists(VALID_ROW, min_size=12, max_size=40), st.lists(ROW, max_size=50)),
       st.sampled_from(["jsonl", "jsonl", "csv", "garbage"]))
def test_fuzzed_data_files_succeed_or_fail_cleanly(tmp_path_factory, capsys, rows, kind):
    tmp = tmp_path_factory.mktemp("fd")
    path = tmp / f"data.{'jsonl' if kind != 'csv' else 'csv'}"
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif kind == "csv":
        path.write_text("sentence,label\n" + "".join(f"{r.get('sentence')},{r.get('label')}\n" for r in rows))
    else:
        path.write_bytes(bytes(random.Random(len(rows)).getrandbits(8) for _ in range(200)))
    _run(tmp, [f"data.train={path}"], capsys)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_fuzzed_overrides_many(tmp_path_factory, capsys, pairs):
    test_fuzzed_overrides_succeed_or_fail_cleanly.hypothesis.inner_test(tmp_path_factory, capsys, pairs)
