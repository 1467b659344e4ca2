"""Split one dataset among N clients: IID, or Dirichlet label skew.

IID: one seeded permutation cut into N nearly equal parts (sizes differ by at most one). Unlike the
reference, the remainder is not dropped: every example goes to exactly one client.

Dirichlet label skew (per-class shares, the scheme of Yurochkin et al. 2019 / Hsu et al. 2019 used
by most FL benchmarks): for each class c, draw client shares p_c ~ Dir(alpha * 1_N) and cut that
class's shuffled examples at the cumulative shares. Small alpha puts each class on few clients
(strong skew, unequal sizes); large alpha approaches IID. Every client must get at least one
example: the draw is repeated (up to ``max_attempts``) until it does, and if it never does, single
examples are moved from the largest clients to the empty ones.

The reference (NVFlare ``Dirichlet_noniid``) instead draws per-CLIENT class proportions
q_k ~ Dir(alpha * prior), then solves a quadratic program for the client sizes and samples
floor(q_k[c] * x_k) per class, giving leftovers to random clients. Both skew labels more as alpha
shrinks, but the same alpha is not the same skew: there, alpha is split over the classes (for two
balanced classes each gets alpha/2) and sizes are balanced by the QP; here alpha is split over the
clients, and sizes follow the draws.
"""

from __future__ import annotations

import numpy as np


def iid_partition(n: int, clients: int, seed: int) -> list[np.ndarray]:
    _check(n, clients)
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, clients)]


def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, seed: int, max_attempts: int = 100
) -> list[np.ndarray]:
    labels = np.asarray(labels)
    _check(len(labels), clients)
    if not alpha > 0:
        raise ValueError("alpha must be positive")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    parts: list[list[int]] = []
    for _ in range(max_attempts):
        parts = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= 1:
            break
    else:
        _fill_empty(parts, rng)
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _fill_empty(parts: list[list[int]], rng: np.random.Generator) -> None:
    """Give each empty client one example taken at random from the currently largest client."""
    for k in range(len(parts)):
        if not parts[k]:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            parts[k].append(parts[donor].pop(int(rng.integers(len(parts[donor])))))


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[clients, classes] example counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def mean_label_entropy(counts: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of each client's label distribution."""
    totals = counts.sum(axis=1, keepdims=True)
    q = counts / np.maximum(totals, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)
    return float(h.mean())


def _check(n: int, clients: int) -> None:
    if clients < 1:
        raise ValueError("clients must be at least 1")
    if n < clients:
        raise ValueError(f"{n} examples cannot give each of {clients} clients at least one")
