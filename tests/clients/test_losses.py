"""Losses and accuracy from logits [P, B, C], against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_clients.losses import accuracy, confusion, cross_entropy, fitness, hinge, loss_function

LOGITS = np.array(
    [
        [[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]],  # prompt 0
        [[0.0, 0.0], [5.0, 0.0], [0.0, 4.0]],  # prompt 1
    ]
)
LABELS = np.array([0, 1, 1])


def test_cross_entropy_by_hand() -> None:
    # CE of logits (a, b) with label 0 is log(1 + e^(b - a)).
    p0 = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 3
    p1 = (math.log(2) + math.log1p(math.exp(5)) + math.log1p(math.exp(-4))) / 3
    assert cross_entropy(LOGITS, LABELS) == pytest.approx([p0, p1], rel=1e-12)


def test_cross_entropy_is_stable_for_large_logits() -> None:
    big = np.array([[[1000.0, -1000.0]]])
    assert cross_entropy(big, np.array([0]))[0] == pytest.approx(0.0, abs=1e-12)
    assert cross_entropy(big, np.array([1]))[0] == pytest.approx(2000.0)


def test_hinge_by_hand() -> None:
    # margin 2: per input, the sum over wrong labels of max(0, logit_j - logit_y + 2).
    p0 = (max(0, 0 - 2 + 2) + max(0, 0 - 1 + 2) + max(0, 3 - 1 + 2)) / 3  # 0, 1, 4
    p1 = (max(0, 0 - 0 + 2) + max(0, 5 - 0 + 2) + max(0, 0 - 4 + 2)) / 3  # 2, 7, 0
    assert hinge(LOGITS, LABELS) == pytest.approx([p0, p1])
    three = np.array([[[1.0, 2.0, 0.5]]])  # label 0: (2 - 1 + 2) + (0.5 - 1 + 2) = 3 + 1.5
    assert hinge(three, np.array([0]))[0] == pytest.approx(4.5)


def test_accuracy_and_confusion() -> None:
    assert accuracy(LOGITS, LABELS) == pytest.approx([2 / 3, 2 / 3])  # p1: argmax of [0, 0] is 0
    cm = confusion(LOGITS, LABELS)  # prompt 0: predictions 0, 1, 0
    assert cm.tolist() == [[1, 0], [1, 1]]


def test_fitness_ratio_and_guard() -> None:
    assert fitness(np.array([1.0, 2.0]), np.array([2.0, 4.0])).tolist() == [0.5, 0.5]
    assert fitness(np.array([1.0]), None).tolist() == [1.0]
    assert np.isfinite(fitness(np.array([1.0]), np.array([0.0]))).all()


def test_bad_shapes_and_names() -> None:
    with pytest.raises(ValueError):
        cross_entropy(LOGITS, np.array([0, 1]))
    with pytest.raises(ValueError):
        cross_entropy(LOGITS, np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        loss_function("mse")
    assert loss_function("hinge") is hinge
