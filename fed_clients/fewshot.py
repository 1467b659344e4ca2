"""Few-shot sampling: k examples per class, seeded.

As the reference (``construct_true_few_shot_data``): shuffle all indices once with the seed, then
walk the shuffled order taking each example whose class still has fewer than k. A class with fewer
than k examples gives all it has (the caller may warn). ``dev`` takes the next k per class from the
same walk, disjoint from the training pick.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FewShot:
    train: np.ndarray  # indices, in the shuffled order
    dev: np.ndarray
    short_classes: dict[int, int]  # class -> examples available, for classes with fewer than k


def k_shot(labels: np.ndarray, k: int, seed: int, dev_k: int = 0) -> FewShot:
    """Indices of k examples per class (and ``dev_k`` more per class for a dev split)."""
    if k < 1:
        raise ValueError("k must be at least 1")
    labels = np.asarray(labels)
    order = np.random.RandomState(seed).permutation(len(labels))
    train: list[int] = []
    dev: list[int] = []
    taken: dict[int, int] = {}
    for i in order:
        c = int(labels[i])
        n = taken.get(c, 0)
        if n < k:
            train.append(int(i))
        elif n < k + dev_k:
            dev.append(int(i))
        else:
            continue
        taken[c] = n + 1
    counts = {int(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True), strict=True)}
    short = {c: n for c, n in counts.items() if n < k}
    return FewShot(np.array(train, dtype=np.int64), np.array(dev, dtype=np.int64), short)
