"""The round lifecycle's edges, read from what an operator and a site see: the exact refusals of
an update, how a close that keeps raising is counted, when a run's end is stored, and what the
metrics and the log say. Each test names the broken copies of coordinator/rounds.py it was run
against (mutmut's numbering, `make mutation GROUP=rounds`; docs/development.md)."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

import coordinator.rounds as rounds_module
from coordinator.aggregators import AggregationError
from coordinator.rounds import MAX_CLOSE_FAILURES
from tests.coordinator.conftest import Coordinator, synthetic_update

NEVER = 3600.0  # a deadline checker that never runs by itself: the test calls it


def _engine(coord: Coordinator) -> Any:
    return coord.http.app.state.engine  # type: ignore[attr-defined]


def _metric(coord: Coordinator, line: str) -> bool:
    return line in coord.http.get("/metrics").text


def _round_results(coord: Coordinator) -> list[str]:
    """The round-result counter's lines of /metrics (one per result label counted so far)."""
    text = coord.http.get("/metrics").text
    return [line for line in text.splitlines() if line.startswith("fedbpt_coordinator_rounds_total{")]


def _full_disk(*args: Any) -> None:
    raise sqlite3.OperationalError("database or disk is full")


def _answered_on_a_full_disk(
    coordinator_factory: Callable[..., Coordinator], monkeypatch: pytest.MonkeyPatch
) -> tuple[Coordinator, str, Any]:
    """A run whose two sites answered round 0 while saving a state fails (the deadline checker
    runs only when the test calls it): (coordinator, run id, engine)."""
    coord = coordinator_factory(deadline_check_interval_s=NEVER)
    run_id, sites = coord.new_run(2, rounds=3)
    engine = _engine(coord)
    monkeypatch.setattr(engine.store, "save_state", _full_disk)
    for k, site in enumerate(sites):
        assert coord.train(run_id, site, k).status_code == 200
    return coord, run_id, engine


def test_refused_updates_say_which_round_and_why(coord: Coordinator) -> None:
    """Breaks caught: `accept` 5, 6, 8, 9 (the round checks' and/or, the created state's name),
    13 and 20 (a 404 without its detail), 60 and 61 (a failed run's update refused as a late one,
    or without the reason), 65-67 (the not-sampled hint)."""
    run_id, sites = coord.new_run(2, frac=0.5, rounds=2)
    insider = next(s for s in sites if s.client_id in coord.rounds(run_id)[0]["sampled"])
    outsider = next(s for s in sites if s is not insider)
    task = coord.task(run_id, insider)
    for round_ in (-1, 1):
        r = coord.post_update(run_id, round_, insider, synthetic_update(task, 1))
        assert r.status_code == 404
        assert r.json()["detail"] == f"run {run_id} has no round {round_} (the current round is 0)"
    r = coord.post_update(run_id, 0, outsider, synthetic_update(task, 1))
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"client {outsider.client_id} was not sampled for round 0 of run {run_id}; "
        "ask GET /task for what to do"
    )
    created = coord.create_run()
    (member,) = coord.enrol(created, 1)
    r = coord.post_update(created, 0, member, synthetic_update(task, 1))
    assert r.status_code == 404
    assert r.json()["detail"] == f"run {created} has no round 0 (the current round is 0)"

    _engine(coord).store.fail_run(run_id, "stopped by the test", time.time())
    r = coord.post_update(run_id, 0, insider, synthetic_update(task, 1))
    assert r.status_code == 409 and r.json()["detail"] == f"run {run_id} failed: stopped by the test"


def test_duplicates_and_round_results_are_counted(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks caught: `accept` 46, 50 and 79 (a resent update counted as new, or a new one with
    no label), `_fail` 15 and 16 (a failed round counted under another result), `_close` 68 (an
    aggregation failure without its end time)."""
    run_id, (a, b) = coord.new_run(2, rounds=2)
    update = synthetic_update(coord.task(run_id, a), 1)
    assert coord.post_update(run_id, 0, a, update).status_code == 200
    assert coord.post_update(run_id, 0, a, update).json()["duplicate"] is True
    assert _metric(coord, 'fedbpt_coordinator_updates_total{duplicate="false"} 1.0')
    assert _metric(coord, 'fedbpt_coordinator_updates_total{duplicate="true"} 1.0')

    def refuses(*args: Any) -> Any:
        raise AggregationError("the test's step refuses")

    monkeypatch.setattr(rounds_module, "server_step", refuses)
    before = time.time()
    assert coord.train(run_id, b, 2).status_code == 200
    assert coord.info(run_id)["state"] == "failed"
    finished_at = _engine(coord).store.run(run_id).finished_at
    assert finished_at is not None and before <= finished_at <= time.time()
    assert _metric(coord, 'fedbpt_coordinator_rounds_total{result="failed"} 1.0')


def test_a_close_that_keeps_raising_fails_the_run_exactly_at_the_limit(
    coordinator_factory: Callable[..., Coordinator],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The deadline checker counts failed closes per round; the run fails at the
    MAX_CLOSE_FAILURES-th, with the exception's type and text, its end time stored, the failure
    counted and logged, and the count forgotten.
    Breaks caught: `_count_failure` 7 (counting from 1), 10 and 11 (an open round reported as
    changed), 16 (the type's name), 19 (no end time), 33, 36, 37 (the metric's label), `_fail` 3,
    8, 9, 13 (the log line and its time), `_close` 11, 21, 22 (a failed run's open round closed
    anyway, or reported)."""
    coord, run_id, engine = _answered_on_a_full_disk(coordinator_factory, monkeypatch)
    for _ in range(MAX_CLOSE_FAILURES - 1):
        assert engine.check_rounds() == []
        assert coord.info(run_id)["state"] == "running"
    caplog.set_level(logging.WARNING, logger="coordinator.rounds")
    before = time.time()
    assert engine.check_rounds() == [run_id]
    error = f"closing round 0 failed {MAX_CLOSE_FAILURES} times: OperationalError: database or disk is full"
    assert coord.info(run_id)["error"] == error
    finished_at = engine.store.run(run_id).finished_at
    assert finished_at is not None and before <= finished_at <= time.time()
    assert f"run {run_id}: {error}" in [r.getMessage() for r in caplog.records]
    assert _round_results(coord) == ['fedbpt_coordinator_rounds_total{result="failed"} 1.0']
    assert engine.rounds_._failures == {}
    # The disk is back, but the run failed: its open round is never closed.
    monkeypatch.undo()
    assert engine.rounds_.close(run_id, 0, at_deadline=True) == "open"
    assert coord.info(run_id)["state"] == "failed" and coord.rounds(run_id)[0]["state"] == "open"
    assert _round_results(coord) == ['fedbpt_coordinator_rounds_total{result="failed"} 1.0']


def test_a_close_that_succeeds_forgets_the_failures_and_an_open_one_reports_nothing(
    coordinator_factory: Callable[..., Coordinator], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Breaks caught: `close` 15 and 16 (a round still open counted as a result and its failures
    forgotten), 17 (the failures of a round that then closed kept), `_close` 39 and 40 (a round
    waiting for answers reported under another result)."""
    coord = coordinator_factory(deadline_check_interval_s=NEVER)
    run_id, (a, b) = coord.new_run(2, rounds=3)
    engine = _engine(coord)
    assert coord.train(run_id, a, 1).status_code == 200
    engine.rounds_._failures[(run_id, 0)] = 1
    assert engine.rounds_.close(run_id, 0, at_deadline=False) == "open"  # b has not answered
    assert engine.rounds_._failures == {(run_id, 0): 1}
    assert _round_results(coord) == []
    with monkeypatch.context() as m:
        m.setattr(engine.store, "save_state", _full_disk)
        assert coord.train(run_id, b, 2).status_code == 200
        assert engine.check_rounds() == []
    assert engine.rounds_._failures == {(run_id, 0): 2}
    assert engine.check_rounds() == [run_id]  # the disk is back: the round closes
    assert coord.info(run_id)["round"] == 1 and engine.rounds_._failures == {}


def test_a_failure_that_cannot_be_recorded_is_retried_from_a_fresh_count(
    coordinator_factory: Callable[..., Coordinator],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When even recording the failure raises, the round stays open (and is logged); the next
    checks count again from zero.
    Breaks caught: `_count_failure` 12 (the count kept), 23-30 (the log line), 31 and 32 (the
    round reported as changed)."""
    coord, run_id, engine = _answered_on_a_full_disk(coordinator_factory, monkeypatch)
    caplog.set_level(logging.ERROR, logger="coordinator.rounds")
    with monkeypatch.context() as m:
        m.setattr(engine.store, "fail_run", _full_disk)
        for _ in range(MAX_CLOSE_FAILURES):
            assert engine.check_rounds() == []
    assert coord.info(run_id)["state"] == "running"
    assert f"run {run_id}: could not record the failure of round 0" in [
        r.getMessage() for r in caplog.records
    ]
    for _ in range(MAX_CLOSE_FAILURES - 1):
        assert engine.check_rounds() == []
    assert engine.check_rounds() == [run_id]
    assert coord.info(run_id)["state"] == "failed"


def test_a_finished_run_stores_when_it_ended(coord: Coordinator) -> None:
    """Breaks caught: `_commit` 42 (a finished run without its end time), `close` 21 (the
    aggregation time not observed)."""
    run_id, sites = coord.new_run(2, rounds=1)
    before = time.time()
    for k, site in enumerate(sites):
        assert coord.train(run_id, site, k).status_code == 200
    row = _engine(coord).store.run(run_id)
    assert row.state == "finished"
    assert row.finished_at is not None and before <= row.finished_at <= time.time()
    assert _metric(coord, "fedbpt_coordinator_aggregation_seconds_count 1.0")


def test_a_reissue_is_logged_and_counted_and_the_last_attempt_fails_with_its_time(
    coord: Coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    """Breaks caught: `_reissue_or_fail` 4 (the failure's time), 14 (the re-issued round without
    the sigma its task carries), 28-35 and 38 (the log line), 39 and 40 (the metric's label)."""
    caplog.set_level(logging.INFO, logger="coordinator.rounds")
    run_id, (a, *_) = coord.new_run(3, min_clients=2, round_timeout_s=0.3, max_round_attempts=2)
    coord.train(run_id, a, 1)
    before = time.time()
    for _ in range(300):
        if coord.info(run_id)["state"] == "failed":
            break
        time.sleep(0.05)
    assert coord.info(run_id)["state"] == "failed"
    record = coord.rounds(run_id)[0]
    assert record["attempt"] == 2 and record["sigma_before"] == pytest.approx(1.0)  # sigma0
    sample = record["sampled"]
    assert f"run {run_id}: round 0 re-issued (attempt 2, 1 answer(s) kept, sample {sample})" in [
        r.getMessage() for r in caplog.records
    ]
    assert _metric(coord, 'fedbpt_coordinator_rounds_total{result="reissued"} 1.0')
    finished_at = _engine(coord).store.run(run_id).finished_at
    assert finished_at is not None and before <= finished_at <= time.time()


def test_a_close_logs_what_it_used_and_what_it_left_out(
    coord: Coordinator, caplog: pytest.LogCaptureFixture
) -> None:
    """The robust screen (`robust: reject`) leaves out the site whose mean moved too far; the
    close logs that and how many of the updates it used.
    Breaks caught: `_close` 91-100 (the left-out line), 101-109 (the closed line)."""
    caplog.set_level(logging.INFO, logger="coordinator.rounds")
    run_id, (a, b, far) = coord.new_run(3, rounds=2, robust="reject")
    for k, site in enumerate((a, b)):
        assert coord.train(run_id, site, k).status_code == 200
    assert coord.train(run_id, far, 2, scale=5.0).status_code == 200  # ~20 > 3 * sigma * sqrt(16)
    messages = [r.getMessage() for r in caplog.records]
    assert f"run {run_id}: round 0 left out ['{far.client_id}']" in messages
    closed = [m for m in messages if m.startswith(f"run {run_id}: round 0 closed with")]
    assert len(closed) == 1
    assert re.fullmatch(
        rf"run {run_id}: round 0 closed with 3 update\(s\) \(2 used\) in \d+\.\d ms of aggregation", closed[0]
    )
