"""Losses and accuracy from logits [P, B, C], against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fed_clients.losses import (
    MIN_DENOMINATOR,
    accuracy,
    confusion,
    cross_entropy,
    fitness,
    hinge,
    loss_function,
)

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


def test_float32_logits_are_scored_in_float64() -> None:
    """The service sends float32 logits; the losses are computed on their float64 values, so two
    prompts whose losses differ by less than float32 resolution still rank apart."""
    logits32 = np.array([[[16.1, 16.3], [15.9, 16.4], [16.25, 16.2]]], dtype=np.float32)
    wide = logits32.astype(np.float64)
    rows = [(float(a), float(b), y) for (a, b), y in zip(wide[0], LABELS, strict=True)]
    ce = sum(math.log1p(math.exp((b - a) if y == 0 else (a - b))) for a, b, y in rows) / 3
    scored = cross_entropy(logits32, LABELS)
    assert scored.dtype == np.float64
    assert float(scored[0]) == pytest.approx(ce, rel=1e-14)
    margin = sum(max(0.0, ((b - a) if y == 0 else (a - b)) + 2) for a, b, y in rows) / 3
    assert float(hinge(logits32, LABELS)[0]) == pytest.approx(margin, rel=1e-14)
    assert fitness(np.array([0.7], np.float32), None).dtype == np.float64


def test_each_prompt_is_stabilised_on_its_own() -> None:
    """One prompt's huge logits do not push another's into underflow (the softmax shift is per
    input row, not one shift for the whole batch)."""
    logits = np.array([[[1000.0, 999.0]], [[0.0, -1.0]]])
    both = cross_entropy(logits, np.array([0]))
    assert both == pytest.approx([math.log1p(math.exp(-1))] * 2, rel=1e-12)


def test_logits_of_one_prompt_may_come_without_the_prompt_axis() -> None:
    """[B, C] is read as one prompt's [1, B, C]."""
    for loss in (cross_entropy, hinge, accuracy):
        assert loss(LOGITS[1], LABELS).tolist() == loss(LOGITS[1:], LABELS).tolist()


def test_the_confusion_matrix_counts_the_first_prompts_predictions() -> None:
    logits = np.array([[[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]], [[0.0, 2.0], [0.0, 2.0], [2.0, 0.0]]])
    cm = confusion(logits, np.array([0, 1, 1]))  # prompt 0 predicts 0, 0, 1
    assert cm.dtype.kind == "i"
    assert cm.tolist() == [[1, 0], [1, 1]]


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^logits \(2, 3, 2\) do not match 2 labels$"):
        cross_entropy(LOGITS, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"^labels outside \[0, 2\)$"):
        hinge(LOGITS, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"^labels outside \[0, 2\)$"):
        accuracy(LOGITS, np.array([0, -1, 1]))
    with pytest.raises(ValueError, match=r"^unknown loss 'mse'; one of \['ce', 'hinge'\]$"):
        loss_function("mse")


def test_a_zero_perturbed_loss_divides_by_the_guard_exactly() -> None:
    """Whatever precision the losses come in, the guard is the float64 MIN_DENOMINATOR (a float32
    copy of it is 4e-9 off), so the fitness of a perfectly fitted perturbed copy is the same on
    every client."""
    for perturbed in (np.array([0.0]), np.array([0.0], np.float32)):
        assert fitness(np.array([0.5]), perturbed).tolist() == [0.5 / MIN_DENOMINATOR]
