"""Losses and accuracy from label logits [P, B, C], computed on the client (labels stay here).

``ce``: mean cross-entropy over the B inputs (the reference's per-sample mean, so clients with
different data sizes compare). ``hinge``: BBT's multi-class hinge, per input the sum over wrong
labels of max(0, logit_j - logit_y + margin) with margin 2, averaged over the inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

HINGE_MARGIN = 2.0
# A perturbed loss of exactly 0 (possible with hinge) would make the ratio infinite.
MIN_DENOMINATOR = 1e-12


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim == 2:
        logits = logits[None]
    if logits.ndim != 3 or logits.shape[1] != labels.shape[0]:
        raise ValueError(f"logits {logits.shape} do not match {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[2]):
        raise ValueError(f"labels outside [0, {logits.shape[2]})")
    return logits, labels


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[P] mean cross-entropy of each prompt over the inputs."""
    logits, labels = _check(logits, labels)
    logp = log_softmax(logits)
    picked = np.take_along_axis(logp, labels[None, :, None], axis=2)[..., 0]
    return np.asarray(-picked.mean(axis=1))


def hinge(logits: np.ndarray, labels: np.ndarray, margin: float = HINGE_MARGIN) -> np.ndarray:
    """[P] mean multi-class hinge loss of each prompt over the inputs."""
    logits, labels = _check(logits, labels)
    target = np.take_along_axis(logits, labels[None, :, None], axis=2)
    terms = np.maximum(logits - target + margin, 0.0)
    np.put_along_axis(terms, np.broadcast_to(labels[None, :, None], target.shape).copy(), 0.0, axis=2)
    return np.asarray(terms.sum(axis=2).mean(axis=1))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[P] share of inputs whose highest label logit is the true label."""
    logits, labels = _check(logits, labels)
    return np.asarray((logits.argmax(axis=2) == labels[None, :]).mean(axis=1))


def confusion(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[C, C] counts (row: true label, column: predicted) of the first prompt."""
    logits, labels = _check(logits, labels)
    num_classes = logits.shape[2]
    pred = logits[0].argmax(axis=1)
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (labels, pred), 1)
    return out


LOSSES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"ce": cross_entropy, "hinge": hinge}


def loss_function(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; one of {sorted(LOSSES)}") from None


def fitness(clean: np.ndarray, perturbed: np.ndarray | None) -> np.ndarray:
    """The local objective per prompt: loss(clean) / loss(perturbed), or loss(clean) alone."""
    if perturbed is None:
        return np.asarray(clean, dtype=np.float64)
    return np.asarray(clean, dtype=np.float64) / np.maximum(
        np.asarray(perturbed, dtype=np.float64), MIN_DENOMINATOR
    )
