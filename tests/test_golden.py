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

from tests.golden.cases import CASES, HERE, run_case, stable_metrics

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
    want_rows = list(csv.reader(io.StringIO((HERE / case / "metrics.csv").read_text(encoding="utf-8"))))
    got_rows = list(csv.reader(io.StringIO(stable_metrics(run_dir))))
    assert got_rows[0] == want_rows[0], "metrics.csv columns changed"
    assert len(got_rows) == len(want_rows)
    for got, want in zip(got_rows[1:], want_rows[1:]):
        bad = [(col, g, w) for col, g, w in zip(want_rows[0], got, want) if not _close(g, w)]
        assert not bad, f"round {want[0]}: {bad}"
