"""Non-IID client splits: label skew by a symmetric Dirichlet prior (Hsu, Qi, Brown 2019, arXiv:1909.06335).

For every label c, draw ``q_c ~ Dir(α·1_K)`` and deal the rows of label c to the K clients in proportions q_c
(rows shuffled first, counts by rounding the cumulative proportions, as Flower Datasets' ``DirichletPartitioner``
does). Small α: each client sees mostly one or two labels; α → ∞: IID. A client that would get fewer than
``min_rows`` rows makes the draw repeat (with the next seed), up to 100 times, then a ConfigError.
The split is a pure function of (labels, K, α, seed): every client and the server compute the same one.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

__all__ = ["dirichlet_split", "label_histogram"]


def dirichlet_split(labels: list, clients: int, alpha: float, seed: int = 0, min_rows: int = 1) -> list[list[int]]:
    """Row indices of each client (sorted), a partition of ``range(len(labels))``."""
    if clients < 1:
        raise ConfigError(f"federated.clients={clients} must be >= 1")
    if not alpha > 0:
        raise ConfigError(f"federated.alpha={alpha} must be > 0")
    if len(labels) < clients * min_rows:
        raise ConfigError(f"{len(labels)} training rows cannot give {clients} clients {min_rows} row(s) each; "
                          "use fewer clients or more data (data.train_size)")
    classes = sorted(set(labels), key=str)
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    for attempt in range(100):
        rng = np.random.default_rng(seed + attempt * 7919)
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in classes:
            idx = np.array(by_class[c])
            rng.shuffle(idx)
            q = rng.dirichlet([alpha] * clients)
            cuts = (np.cumsum(q) * len(idx)).round().astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_rows:
            return [sorted(p) for p in parts]
    raise ConfigError(f"no Dirichlet(α={alpha}) split of {len(labels)} rows gives each of {clients} clients "
                      f"{min_rows} row(s) in 100 draws; raise federated.alpha or lower federated.clients")


def label_histogram(labels: list, parts: list[list[int]]) -> list[dict]:
    """``[{label: count}]`` per client (for logs and docs)."""
    out = []
    for p in parts:
        h: dict = {}
        for i in p:
            h[labels[i]] = h.get(labels[i], 0) + 1
        out.append(dict(sorted(h.items(), key=lambda kv: str(kv[0]))))
    return out
