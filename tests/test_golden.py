"""Golden outputs (tests/golden/cases.py): every method's short run gives the recorded adapter and metrics.

The redesign of issue 16 is behaviour-preserving; these runs hold it to that.  Tensors are compared per element at a
relative tolerance of 1e-6 of the tensor's scale (``atol = 1e-6 · max|golden|``, so that entries near zero do not
demand more than the float32 arithmetic of another CPU can give); metrics at rtol 1e-6.
"""
from __future__ import annotations

import csv
import io
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.golden.cases import CASES, HERE, SAME_AS, run_case, stable_metrics

RTOL = 1e-6


def _close(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=RTOL, abs_tol=1e-12) or (math.isnan(x) and math.isnan(y))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_run_is_reproduced(case, tmp_path):
    if CASES[case][2] == "flower":
        pytest.importorskip("flwr")
    threads = torch.get_num_threads()
    try:
        run_dir = run_case(case, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    golden = load_file(str(HERE / case / "adapter.safetensors"))
    ours = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == golden.keys()
    for key, want in golden.items():
        got = ours[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        scale = float(want.abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * scale, msg=lambda m, k=key: f"{k}: {m}")
    _assert_same_metrics(stable_metrics(run_dir), (HERE / case / "metrics.csv").read_text(encoding="utf-8"))


def _assert_same_metrics(got_text: str, want_text: str) -> None:
    want_rows = list(csv.reader(io.StringIO(want_text)))
    got_rows = list(csv.reader(io.StringIO(got_text)))
    assert got_rows[0] == want_rows[0], "metrics.csv columns changed"
    assert len(got_rows) == len(want_rows)
    for got, want in zip(got_rows[1:], want_rows[1:]):
        bad = [(col, g, w) for col, g, w in zip(want_rows[0], got, want) if not _close(g, w)]
        assert not bad, f"round {want[0]}: {bad}"


@pytest.mark.parametrize("case", ["ffa", "ffa_dp", "hetlora", "pilot"])
def test_a_checkpoint_written_before_the_redesign_resumes_to_the_golden_run(tmp_path, case):
    """``tests/golden/<case>_round1_checkpoint`` is round 1 of that golden case written by the code before the
    redesign (commit bd4a28d; killed in round 2): plain FFA-LoRA, with DP (the accountants' history), HetLoRA (its
    pruned ranks in the method state) and Fed-piLot (global scores and per-tensor momentum).  Resumed to 2 rounds by
    today's code, each ends where the uninterrupted golden run does."""
    import shutil

    from fedlora.config import load_config
    from fedlora.engine.simulation import run_experiment
    from tests.golden.cases import CASES, ROOT, overrides

    run_dir = tmp_path / "run"
    shutil.copytree(HERE / f"{case}_round1_checkpoint", run_dir)
    threads = torch.get_num_threads()
    try:
        run_experiment(load_config(str(ROOT / CASES[case][0]), overrides(case)), out_dir=run_dir, progress=False,
                       log=lambda *_: None, resume=True)
    finally:
        torch.set_num_threads(threads)
    golden = load_file(str(HERE / case / "adapter.safetensors"))
    ours = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert ours.keys() == golden.keys()
    for key, want in golden.items():
        torch.testing.assert_close(ours[key], want, rtol=RTOL, atol=RTOL * float(want.abs().max()))
    _assert_same_metrics(stable_metrics(run_dir), (HERE / case / "metrics.csv").read_text(encoding="utf-8"))


@pytest.mark.parametrize("flower_case", sorted(SAME_AS))
def test_flower_goldens_equal_their_in_process_goldens(flower_case):
    """The Flower engine's recorded run is the in-process one (for DP: σ calibrated by the server, sent in plans)."""
    ours = load_file(str(HERE / flower_case / "adapter.safetensors"))
    theirs = load_file(str(HERE / SAME_AS[flower_case] / "adapter.safetensors"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    _assert_same_metrics((HERE / flower_case / "metrics.csv").read_text(encoding="utf-8"),
                         (HERE / SAME_AS[flower_case] / "metrics.csv").read_text(encoding="utf-8"))
