"""coordinator/admission.py on its own: what an update must satisfy beyond its schema, the bounds'
formulas as the module documents them, their edges (honest values at a bound are admitted), and a
refusal that says what is wrong and what is allowed (the 400's detail a site operator reads)."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from coordinator.admission import (
    MAX_LOG_SPREAD,
    SIGMA_LOG_SLACK,
    STEP_MULTIPLE,
    admit_update,
    check_metrics,
    max_step,
    sigma_bounds,
)
from coordinator.errors import BadRequest
from coordinator.es_state import ServerState, initial_es
from protos import Array, ClientMetrics, ClientUpdate, ProjectionSpec, RunConfig

DIM, ITERS, POPSIZE = 4, 3, 6


def _config(local_iters: int = ITERS) -> RunConfig:
    return RunConfig(
        projection=ProjectionSpec(intrinsic_dim=DIM), local_iters=local_iters, local_popsize=POPSIZE
    )


CONFIG = _config()
STATE = ServerState(mean=np.zeros(DIM), sigma=1.0, es=None)


def _update(**fields: Any) -> ClientUpdate:
    values: dict[str, Any] = {
        "mean": Array.from_numpy(np.full(DIM, 0.25)),
        "fitness": 0.5,
        "sigmas": [1.0, 0.9, 0.8],
        "mu": 3,
        "n_samples": 10,
        "metrics": ClientMetrics(train_loss=0.5),
    }
    values.update(fields)
    return ClientUpdate(**values)


def _refusal(update: ClientUpdate, state: ServerState = STATE) -> str:
    with pytest.raises(BadRequest) as refused:
        admit_update(CONFIG, state, update)
    return refused.value.detail


def test_an_honest_update_is_admitted_as_float64() -> None:
    """The mean comes back as float64 whatever precision it was sent in (float32 here), so the
    server step never mixes precisions."""
    sent = np.array([0.1, -0.2, 0.3, 0.4], dtype=np.float32)
    mean = admit_update(CONFIG, STATE, _update(mean=Array.from_numpy(sent)))
    assert mean.dtype == np.float64
    np.testing.assert_array_equal(mean, sent.astype(np.float64))


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"mean": Array.from_numpy(np.zeros(DIM, np.int32))}, "mean must be a float array, got dtype int32"),
        (
            {"mean": Array.from_numpy(np.zeros(DIM + 1))},
            "mean has shape [5]; this run's intrinsic dimension is 4 (expected shape [4])",
        ),
        (
            {"sigmas": [1.0, 1.0]},
            "2 sigmas given; this run has local_iters = 3 (one sigma per local generation)",
        ),
        ({"mu": POPSIZE + 1}, "mu = 7 is out of range [1, local_popsize = 6]"),
    ],
)
def test_an_update_that_does_not_fit_the_run_is_refused_saying_why(
    fields: dict[str, Any], detail: str
) -> None:
    assert _refusal(_update(**fields)) == detail


def test_the_documented_sigma_bounds() -> None:
    """sigma * exp(+-SIGMA_LOG_SLACK * local_iters), the exponent capped at MAX_LOG_SPREAD."""
    low, high = sigma_bounds(CONFIG, 2.0)
    assert low == pytest.approx(2.0 * math.exp(-SIGMA_LOG_SLACK * ITERS), rel=1e-12)
    assert high == pytest.approx(2.0 * math.exp(SIGMA_LOG_SLACK * ITERS), rel=1e-12)
    assert sigma_bounds(_config(10_000), 1.0) == pytest.approx(
        (math.exp(-MAX_LOG_SPREAD), math.exp(MAX_LOG_SPREAD))
    )


def test_one_impossible_sigma_among_honest_ones_is_named() -> None:
    """The refusal names the offending sigma, even when it is the only one out of range."""
    low, high = sigma_bounds(CONFIG, STATE.sigma)
    detail = _refusal(_update(sigmas=[1.0, high * 2, 0.8]))
    assert detail == (
        f"local sigma {high * 2:g} is impossible from this round's sigma 1 in 3 local generations "
        f"(allowed: [{low:.3g}, {high:.3g}])"
    )
    assert admit_update(CONFIG, STATE, _update(sigmas=[low, high, 1.0])) is not None  # the edges pass


def test_the_step_bound_uses_the_covariance_trace() -> None:
    """STEP_MULTIPLE * local_iters * the highest honest sigma * sqrt(tr C): with an ES, tr C is the
    ES's own (here 0.04, below 1 and far from the dimension); without one, C = I and tr C = d."""
    _, high = sigma_bounds(CONFIG, STATE.sigma)
    assert max_step(CONFIG, STATE) == pytest.approx(STEP_MULTIPLE * ITERS * high * math.sqrt(DIM), rel=1e-12)
    es_state = initial_es(DIM, 1.0, 2, 10)
    assert es_state.es is not None
    narrow = replace(es_state, es=replace(es_state.es, C=np.eye(DIM) * 0.01))
    assert max_step(CONFIG, narrow) == pytest.approx(STEP_MULTIPLE * ITERS * high * 0.2, rel=1e-12)


def test_a_mean_exactly_at_the_step_bound_is_admitted_and_one_past_it_is_not() -> None:
    limit = max_step(CONFIG, STATE)
    at = np.zeros(DIM)
    at[0] = limit
    np.testing.assert_array_equal(admit_update(CONFIG, STATE, _update(mean=Array.from_numpy(at))), at)
    past = at.copy()
    past[0] = np.nextafter(limit, np.inf)
    detail = _refusal(_update(mean=Array.from_numpy(past)))
    assert re.fullmatch(
        r"mean lies \S+ from this round's global mean; at most \S+ is possible from this round's state",
        detail,
    ), detail
    assert f"at most {limit:.3g} is possible" in detail


def test_a_fitness_beyond_the_bound_is_refused() -> None:
    assert _refusal(_update(fitness=-2e9)) == "fitness -2000000000.0 is outside [-1e+09, 1e+09]"


# Metrics are recorded and shown: what check_metrics promises.


def _metrics_refusal(**fields: Any) -> str:
    with pytest.raises(BadRequest) as refused:
        check_metrics(ClientMetrics(**fields))
    return refused.value.detail


def test_validation_loss_and_its_count_go_together() -> None:
    expected = "metrics.val_loss and metrics.n_val >= 1 go together (n_val = 0: no validation)"
    assert _metrics_refusal(val_loss=0.5) == expected
    assert _metrics_refusal(n_val=3) == expected
    check_metrics(ClientMetrics(val_loss=0.5, n_val=3))


@pytest.mark.parametrize(
    "name",
    ["train_loss", "train_accuracy", "test_accuracy", "test_loss", "val_loss", "val_accuracy", "seconds"],
)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_every_metric_must_be_finite(name: str, bad: float) -> None:
    extra: dict[str, Any] = {"n_val": 1} if name == "val_loss" else {}
    if name == "val_accuracy":
        extra = {"val_loss": 0.5, "n_val": 1}
    assert _metrics_refusal(**{name: bad}, **extra) == f"metrics.{name} must be finite, got {bad}"


@pytest.mark.parametrize("name", ["train_accuracy", "test_accuracy", "val_accuracy"])
def test_accuracies_lie_in_the_closed_unit_interval(name: str) -> None:
    extra: dict[str, Any] = {"val_loss": 0.5, "n_val": 1} if name == "val_accuracy" else {}
    for edge in (0.0, 0.5, 1.0):
        check_metrics(ClientMetrics(**{name: edge}, **extra))
    for bad in (-0.25, 1.25, 1.75):
        assert _metrics_refusal(**{name: bad}, **extra) == f"metrics.{name} must lie in [0, 1], got {bad}"


@pytest.mark.parametrize(
    "name",
    ["n_test", "service_calls", "service_rows", "service_bytes_sent", "service_bytes_received", "seconds"],
)
def test_counts_must_not_be_negative(name: str) -> None:
    assert _metrics_refusal(**{name: -1}) == f"metrics.{name} must not be negative"
