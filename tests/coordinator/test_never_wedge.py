"""One site's upload, however extreme within the schema, cannot stop a run (issue: rounds that can
never wedge): refused at the door with 400 and nothing stored; a server step that fails is retried
without the contribution that breaks it; one that cannot be repaired, or a close that keeps
raising, fails the run with the reason instead of looping."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from coordinator.admission import max_step, sigma_bounds
from coordinator.aggregators import AggregationError, Contribution, Step, make_aggregator, server_step
from coordinator.aggregators.cmaes import ServerCMAES
from coordinator.es_state import ServerState
from coordinator.rounds import MAX_CLOSE_FAILURES
from protos import Array, ClientMetrics, ClientUpdate, GlobalState, RunConfig
from tests.coordinator.conftest import Coordinator, Site, synthetic_update


def _update(task: Any, *, mean: np.ndarray | None = None, **fields: Any) -> ClientUpdate:
    honest = synthetic_update(task, 1)
    values: dict[str, Any] = {
        "mean": Array.from_numpy(mean, dtype="float64") if mean is not None else honest.mean,
        "fitness": honest.fitness,
        "sigmas": honest.sigmas,
        "mu": honest.mu,
        "n_samples": honest.n_samples,
        "metrics": ClientMetrics(train_loss=0.5),
    }
    values.update(fields)
    return ClientUpdate(**values)


def _hostile(task: Any) -> dict[str, ClientUpdate]:
    """The uploads of the issue's report and their neighbours: finite, schema-valid, extreme."""
    assert task.state is not None and task.config is not None
    d, iters, sigma = task.config.dim, task.config.local_iters, task.state.sigma
    m = task.state.mean.numpy()
    return {
        "huge mean entries": _update(task, mean=np.full(d, 1e30)),
        "mean just past the step bound": _update(task, mean=m + np.full(d, 1e9 / math.sqrt(d))),
        "huge local sigmas": _update(task, sigmas=[1e150] * iters),
        "vanishing local sigmas": _update(task, sigmas=[sigma * 1e-30] * iters),
        "huge fitness": _update(task, fitness=1e300),
        "the issue's case: huge mean and sigmas": _update(
            task, mean=np.full(d, 1e150), sigmas=[1e150] * iters
        ),
    }


def test_extreme_updates_are_refused_at_the_door_and_store_nothing(coord: Coordinator) -> None:
    """Breaks caught: removing the magnitude checks of coordinator/admission.py (the uploads are
    then accepted: 200 instead of 400, and the dump changes)."""
    run_id, sites = coord.new_run(3, rounds=2, local_iters=3)
    task = coord.task(run_id, sites[0])
    before = coord.dump()
    for what, update in _hostile(task).items():
        r = coord.post_update(run_id, 0, sites[0], update)
        assert r.status_code == 400, (what, r.text)
        assert (
            "allowed" in r.json()["detail"]
            or "possible" in r.json()["detail"]
            or "fitness" in r.json()["detail"]
        )
    assert coord.dump() == before
    for k, site in enumerate(sites):
        assert coord.train(run_id, site, k).status_code == 200
    info = coord.info(run_id)
    assert info["round"] == 1 and info["state"] == "running"
    assert coord.rounds(run_id)[0]["state"] == "closed"


def test_the_honest_extremes_of_the_bounds_are_admitted(coord: Coordinator) -> None:
    """The bounds do not refuse what pycma can produce: an update at 99% of every bound is taken,
    and the round closes with a finite state. Breaks caught: bounds tightened below what they claim."""
    run_id, sites = coord.new_run(2, rounds=2, local_iters=3)
    task = coord.task(run_id, sites[0])
    assert task.state is not None and task.config is not None
    config = task.config
    state = ServerState(mean=task.state.mean.numpy(), sigma=task.state.sigma, es=None)
    low, high = sigma_bounds(config, state.sigma)
    direction = np.ones(config.dim) / math.sqrt(config.dim)
    # The server keeps C = I at round 0, so its bound is the one computed from a state without ES.
    far = state.mean + 0.99 * max_step(config, state) * direction
    for sigmas in ([high * 0.99] * 3, [low * 1.01] * 3):
        update = _update(task, mean=far, sigmas=sigmas, fitness=-1e9 * 0.99)
        r = coord.post_update(run_id, 0, sites[0], update)
        assert r.status_code == 200, r.text
        run_id, sites = coord.new_run(2, rounds=2, local_iters=3)
        task = coord.task(run_id, sites[0])


class Poisoned:
    """The cmaes step, except that a contribution from ``poison`` makes its sigma NaN: a stand-in
    for a step that some admitted contribution breaks."""

    name = "cmaes"
    scores_candidates = False

    def __init__(self, inner: ServerCMAES, poison: set[str]) -> None:
        self.inner = inner
        self.poison = poison

    def initial_state(self) -> ServerState:
        return self.inner.initial_state()

    def aggregate(self, state: ServerState, contributions: Sequence[Contribution]) -> Step:
        step = self.inner.aggregate(state, contributions)
        if any(c.client_id in self.poison for c in contributions):
            step.state.sigma = float("nan")
        return step

    def payload(self, state: ServerState) -> GlobalState:
        return self.inner.payload(state)

    def pending_decomposition(self, state: ServerState, expected_clients: int) -> np.ndarray | None:
        return None


def _contributions(state: ServerState, names: list[str]) -> list[Contribution]:
    rng = np.random.default_rng(3)
    return [
        Contribution(
            n, state.mean + 0.3 * rng.normal(size=state.dim), float(rng.uniform()), (0.9, 0.8), 2, 10
        )
        for n in names
    ]


def test_the_step_leaves_out_the_contribution_that_breaks_it() -> None:
    """Breaks caught: no retry (AggregationError), or a retry that keeps the offender."""
    config = RunConfig.model_validate({"projection": {"intrinsic_dim": 8}, "local_iters": 2})
    inner = ServerCMAES.from_config(config, eigenmethod=np.linalg.eigh)
    state = inner.initial_state()
    honest = _contributions(state, ["a", "b", "d"])
    bad = _contributions(state, ["c"])
    outcome = server_step(Poisoned(inner, {"c"}), config, state, honest[:2] + bad + honest[2:])
    assert outcome.rejected == ["c"] and outcome.used == ["a", "b", "d"]
    clean = server_step(inner, config, state, honest)
    assert np.array_equal(outcome.state.mean, clean.state.mean) and outcome.state.sigma == clean.state.sigma
    # Two offenders: each on its own breaks the step; the rest aggregate.
    two = server_step(Poisoned(inner, {"a", "c"}), config, state, honest[:2] + bad + honest[2:])
    assert sorted(two.rejected) == ["a", "c"] and two.used == ["b", "d"]
    assert math.isfinite(two.state.sigma)


def test_a_step_nothing_repairs_is_a_clean_refusal() -> None:
    config = RunConfig.model_validate({"projection": {"intrinsic_dim": 8}, "local_iters": 2})
    inner = ServerCMAES.from_config(config)
    state = inner.initial_state()

    class Broken(Poisoned):
        def aggregate(self, state: ServerState, contributions: Sequence[Contribution]) -> Step:
            raise FloatingPointError("overflow in the covariance update")

    with pytest.raises(AggregationError, match="overflow in the covariance update"):
        server_step(Broken(inner, set()), config, state, _contributions(state, ["a", "b"]))


def _answer_all(coord: Coordinator, run_id: str, sites: list[Site]) -> None:
    for k, site in enumerate(sites):
        assert coord.train(run_id, site, k).status_code == 200


def test_a_round_that_cannot_be_aggregated_fails_the_run_with_the_reason(coord: Coordinator) -> None:
    """Breaks caught: an AggregationError left to propagate (the round stays open and every
    deadline check fails again: the issue's endless loop)."""
    run_id, sites = coord.new_run(2, rounds=3)
    engine = coord.http.app.state.engine  # type: ignore[attr-defined]

    class Broken(Poisoned):
        def aggregate(self, state: ServerState, contributions: Sequence[Contribution]) -> Step:
            step = self.inner.aggregate(state, contributions)
            step.state.mean[0] = float("inf")
            return step

    engine.runs._aggregators[run_id] = Broken(make_aggregator(engine.runs.config(run_id)), set())  # type: ignore[arg-type]
    _answer_all(coord, run_id, sites)
    info = coord.info(run_id)
    assert info["state"] == "failed"
    assert "round 0 could not be aggregated" in info["error"] and "mean" in info["error"]
    r = coord.http.get(f"/v1/runs/{run_id}/task", headers=sites[0].headers)
    assert r.status_code == 409 and "could not be aggregated" in r.json()["detail"]


def test_a_close_that_keeps_raising_fails_the_run_after_a_few_tries(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any other error while closing (here the disk refusing the new state) is retried by the
    deadline checker MAX_CLOSE_FAILURES times, then fails the run with the reason.
    Breaks caught: dropping the failure count (the checker then retries forever)."""
    run_id, sites = coord.new_run(2, rounds=3)
    engine = coord.http.app.state.engine  # type: ignore[attr-defined]

    def full_disk(*args: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(engine.store, "save_state", full_disk)
    _answer_all(coord, run_id, sites)
    for _ in range(MAX_CLOSE_FAILURES + 1):
        engine.check_rounds()
    info = coord.info(run_id)
    assert info["state"] == "failed"
    assert f"closing round 0 failed {MAX_CLOSE_FAILURES} times" in info["error"]
    assert "disk is full" in info["error"]
    assert coord.rounds(run_id)[0]["state"] == "open"  # nothing of the failed close was stored
