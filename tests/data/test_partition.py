"""Partitioners: IID, Dirichlet label skew, FFA-LoRA's fixed label proportions; per-client local split."""
import types

import numpy as np
import pytest

from fedlora.data.partition import dirichlet, iid, label_skew, partition, split_local
from fedlora.errors import ConfigError, DataError


def _labels(n0=600, n1=900, seed=0):
    y = [0] * n0 + [1] * n1
    np.random.default_rng(seed).shuffle(y)
    return y


def _cfg(**clients):
    base = dict(num=3, partition="iid", dirichlet_alpha=0.5, proportions=[], val_fraction=0.1, min_examples=4)
    base.update(clients)
    return types.SimpleNamespace(seed=0, clients=types.SimpleNamespace(**base))


def _check_disjoint(parts, n):
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) and all(0 <= i < n for i in flat)


def test_iid_is_a_disjoint_cover_of_near_equal_sizes_and_reproducible():
    y = _labels()
    parts = iid(y, 4, seed=1)
    _check_disjoint(parts, len(y))
    assert sum(map(len, parts)) == len(y) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts == iid(y, 4, seed=1) and parts != iid(y, 4, seed=2)
    shares = [np.mean([y[i] for i in p]) for p in parts]
    assert max(shares) - min(shares) < 0.15  # label shares stay close to the global 0.6


def test_dirichlet_skews_labels_and_respects_min_size():
    y = _labels()
    parts = dirichlet(y, 5, alpha=0.1, seed=0, min_size=10)
    _check_disjoint(parts, len(y))
    assert min(map(len, parts)) >= 10
    shares = [np.mean([y[i] for i in p]) for p in parts]
    assert max(shares) - min(shares) > 0.5  # strong skew at alpha = 0.1
    assert parts == dirichlet(y, 5, alpha=0.1, seed=0, min_size=10)


def test_dirichlet_large_alpha_is_close_to_iid():
    y = _labels()
    shares = [np.mean([y[i] for i in p]) for p in dirichlet(y, 3, alpha=1000.0, seed=0, min_size=10)]
    assert max(shares) - min(shares) < 0.1


def test_label_skew_uses_ffa_proportions_and_equal_sizes():
    y = _labels(600, 900)
    props = [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]]
    parts = label_skew(y, 2, props, seed=0)
    _check_disjoint(parts, len(y))
    # class 0 is the binding one: 600 / (0.1 + 0.9 + 0.5) = 400 per client
    assert [len(p) for p in parts] == [400, 400, 400]
    for p, row in zip(parts, props):
        assert np.mean([y[i] == 0 for i in p]) == pytest.approx(row[0], abs=1e-9)


def test_partition_defaults_to_ffa_proportions_for_three_clients():
    y = _labels()
    parts = partition(y, 2, _cfg(partition="label_skew"))
    assert np.mean([y[i] for i in parts[0]]) == pytest.approx(0.9)


def test_partition_label_skew_without_defaults_asks_for_proportions():
    with pytest.raises(ConfigError, match="set clients.proportions"):
        partition(_labels(), 2, _cfg(partition="label_skew", num=4))


def test_more_clients_than_data_is_a_clear_error():
    with pytest.raises((ConfigError, DataError), match="clients"):
        partition([0, 1] * 10, 2, _cfg(num=8, partition="iid"))
    with pytest.raises(ConfigError, match="needs at least"):
        partition([0, 1] * 10, 2, _cfg(num=8, partition="dirichlet"))


def test_split_local_is_seeded_disjoint_and_sized():
    rows = list(range(100, 150))
    tr, va = split_local(rows, 0.2, seed=0, client_id=3)
    assert len(va) == 10 and len(tr) == 40 and not set(tr) & set(va) and set(tr) | set(va) == set(rows)
    assert (tr, va) == split_local(rows, 0.2, seed=0, client_id=3)
    assert split_local(rows, 0.0, seed=0, client_id=3) == (rows, [])
