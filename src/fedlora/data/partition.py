"""Partitioners: how the training rows are split across clients (label skew for non-IID experiments).

* ``iid``: uniform random split (flwr-datasets ``IidPartitioner``);
* ``dirichlet``: per-class client proportions ~ Dir(α) (flwr-datasets ``DirichletPartitioner``);
* ``label_skew``: FFA-LoRA's fixed label proportions (Sun et al., ICLR 2024; docs/methods.md §5): binary, 3 clients
  ``[0.1,0.9], [0.9,0.1], [0.5,0.5]``; 3 classes ``0.9/0.05/0.05`` rotated.  Every client gets the same number of
  examples, the largest the class counts allow.

Each returns one list of row indices per client; :func:`split_local` then holds out a local validation split.
"""
from __future__ import annotations

import numpy as np

from fedlora.errors import ConfigError, DataError

FFA_DEFAULT_PROPORTIONS = {
    (3, 2): [[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]],
    (3, 3): [[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]],
}


def _as_dataset(labels: list[int]):
    import datasets

    return datasets.Dataset.from_dict({"label": labels, "row": list(range(len(labels)))})


def iid(labels: list[int], num_clients: int, seed: int) -> list[list[int]]:
    from flwr_datasets.partitioner import IidPartitioner

    part = IidPartitioner(num_partitions=num_clients)
    part.dataset = _as_dataset(labels)
    # IidPartitioner splits in order; shuffle rows first with our seed so the split is random and reproducible.
    perm = np.random.default_rng(seed).permutation(len(labels))
    out = []
    for k in range(num_clients):
        rows = part.load_partition(k)["row"]
        out.append(sorted(int(perm[r]) for r in rows))
    return out


def dirichlet(labels: list[int], num_clients: int, alpha: float, seed: int, min_size: int) -> list[list[int]]:
    from flwr_datasets.partitioner import DirichletPartitioner

    if len(labels) < num_clients * min_size:
        raise ConfigError(f"clients.num = {num_clients} needs at least {num_clients * min_size} training rows "
                          f"({min_size} per client), but the data has {len(labels)}")
    part = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                min_partition_size=min_size, self_balancing=True, shuffle=True, seed=seed)
    part.dataset = _as_dataset(labels)
    try:
        return [sorted(int(r) for r in part.load_partition(k)["row"]) for k in range(num_clients)]
    except ValueError as exc:  # raised when no draw meets min_partition_size
        raise ConfigError(f"Dirichlet partition (alpha={alpha}) could not give every one of {num_clients} clients "
                          f"{min_size} rows: {exc}. Use fewer clients, more data or a larger alpha.") from None


def label_skew(labels: list[int], num_classes: int, proportions: list[list[float]], seed: int) -> list[list[int]]:
    num_clients = len(proportions)
    if not proportions:
        raise ConfigError("clients.proportions is empty")
    P = np.asarray(proportions, dtype=float)
    if P.shape[1] != num_classes:
        raise ConfigError(f"clients.proportions rows have {P.shape[1]} entries but the task has {num_classes} classes")
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(num_classes)]
    demand = P.sum(axis=0)  # per class: fraction of one client's size needed across all clients
    size = min(int(len(by_class[c]) / demand[c]) for c in range(num_classes) if demand[c] > 0)
    out: list[list[int]] = [[] for _ in range(num_clients)]
    cursor = [0] * num_classes
    for k in range(num_clients):
        counts = np.floor(P[k] * size).astype(int)
        for c in range(num_classes):
            take = by_class[c][cursor[c]: cursor[c] + counts[c]]
            cursor[c] += counts[c]
            out[k].extend(int(i) for i in take)
        out[k].sort()
    return out


def partition(labels: list[int], num_classes: int, cfg) -> list[list[int]]:
    """Dispatch on ``cfg.clients.partition`` and check every client gets enough rows."""
    c = cfg.clients
    if c.partition in ("iid", "dirichlet") and len(labels) < c.num * _min_rows(c):
        raise ConfigError(f"clients.num = {c.num} needs at least {c.num * _min_rows(c)} training rows "
                          f"({_min_rows(c)} per client), but the data has {len(labels)}")
    if c.partition == "iid":
        parts = iid(labels, c.num, cfg.seed)
    elif c.partition == "dirichlet":
        parts = dirichlet(labels, c.num, c.dirichlet_alpha, cfg.seed, _min_rows(c))
    else:
        props = c.proportions or FFA_DEFAULT_PROPORTIONS.get((c.num, num_classes))
        if props is None:
            raise ConfigError(f"clients.partition = 'label_skew' has no default proportions for {c.num} clients and "
                              f"{num_classes} classes; set clients.proportions (one row of {num_classes} per client)")
        if len(props) != c.num:
            raise ConfigError(f"clients.proportions has {len(props)} rows but clients.num = {c.num}")
        parts = label_skew(labels, num_classes, props, cfg.seed)
    for k, rows in enumerate(parts):
        if len(rows) < _min_rows(c):
            raise DataError(f"client {k} got {len(rows)} training rows, fewer than the {_min_rows(c)} needed "
                            f"(clients.min_examples = {c.min_examples}, val_fraction = {c.val_fraction}); "
                            f"use fewer clients or more data")
    return parts


def _min_rows(c) -> int:
    return max(c.min_examples, int(np.ceil(c.min_examples / max(1e-9, 1.0 - c.val_fraction))))


def split_local(rows: list[int], val_fraction: float, seed: int, client_id: int) -> tuple[list[int], list[int]]:
    """Seeded per-client train/validation split of a client's rows."""
    if val_fraction <= 0 or len(rows) < 2:
        return list(rows), []
    rng = np.random.default_rng([seed, client_id, 7])
    perm = rng.permutation(len(rows))
    n_val = max(1, int(round(val_fraction * len(rows))))
    val = sorted(rows[i] for i in perm[:n_val])
    train = sorted(rows[i] for i in perm[n_val:])
    return train, val
