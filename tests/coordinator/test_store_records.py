"""The store's records read back exactly as written: every typed method against a real SQLite file,
with values chosen so that a swapped column, a wrong order, a dropped filter or a lost field shows.
These are the store's unit tests (the round-level tests drive it through the engine); each test
names the kinds of break it was written against (mutation group ``store``, docs/development.md)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.es_state import ESCore, ServerState
from coordinator.store import (
    ClosedRound,
    NewUpdate,
    Store,
    Validation,
    _pack,
    _unpack,
    decode_vector,
    encode_vector,
    select_state,
)
from protos import ClientMetrics


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "c.db")
    yield s
    s.close()


def _two_runs_three_clients(store: Store) -> None:
    """run-a (created first) with clients enrolled as zeta, alpha, mid; run-b with one client."""
    with store.transaction():
        store.add_run("run-a", '{"rounds": 3}', 10.0)
        store.add_run("run-b", '{"rounds": 5}', 11.0)
        store.add_client("c-z", "run-a", "zeta", "hash-z", 20.0)
        store.add_client("c-a", "run-a", "alpha", "hash-a", 21.0)
        store.add_client("c-m", "run-a", "mid", "hash-m", 22.0)
        store.add_client("c-b", "run-b", "alpha", "hash-b", 23.0)


def _update(value: float, n_samples: int, losses: list[float] | None = None) -> NewUpdate:
    return NewUpdate(
        mean=np.array([value, -value, 0.5]),
        fitness=value / 10,
        sigmas=[0.9, 0.8],
        mu=3,
        n_samples=n_samples,
        metrics=ClientMetrics(train_loss=value, n_val=n_samples),
        bytes_in=100 + n_samples,
        ack_bytes=7,
        losses=losses,
    )


def test_runs_read_back_field_by_field_and_in_creation_order(store: Store) -> None:
    """Breaks caught: a column read into the wrong field, run_ids not in creation order, a state
    change that touches the other run or writes the wrong column."""
    _two_runs_three_clients(store)
    assert store.run_ids() == ["run-a", "run-b"]
    a = store.run("run-a")
    assert a is not None
    assert (a.run_id, a.config, a.state, a.round, a.created_at) == (
        "run-a",
        '{"rounds": 3}',
        "created",
        0,
        10.0,
    )
    assert (a.started_at, a.finished_at, a.error) == (None, None, None)
    assert store.run("nope") is None
    with store.transaction():
        store.mark_running("run-a", 30.0)
        store.finish_run("run-a", 3, 40.0)
        store.fail_run("run-b", "boom", 41.0)
    a, b = store.run("run-a"), store.run("run-b")
    assert a is not None and b is not None
    assert (a.state, a.round, a.started_at, a.finished_at, a.error) == ("finished", 3, 30.0, 40.0, None)
    assert (b.state, b.round, b.started_at, b.finished_at, b.error) == ("failed", 0, None, 41.0, "boom")
    assert store.gauges() == ({"finished": 1, "failed": 1}, 4)


def test_clients_by_token_name_order_and_enrolment_order(store: Store) -> None:
    """Breaks caught: enrolled() not in name order (sampling of a rerun would differ), clients()
    not in enrolment order, a lookup that ignores its run or its token."""
    _two_runs_three_clients(store)
    assert store.enrolled("run-a") == ["c-a", "c-m", "c-z"]
    assert [c.client_id for c in store.clients("run-a")] == ["c-z", "c-a", "c-m"]
    assert [(c.run_id, c.name, c.created_at) for c in store.clients("run-b")] == [("run-b", "alpha", 23.0)]
    row = store.client_by_token("hash-m")
    assert row is not None and (row.client_id, row.run_id, row.name, row.created_at) == (
        "c-m",
        "run-a",
        "mid",
        22.0,
    )
    assert store.client_by_token("hash-x") is None
    assert store.has_client("run-a", "mid") and not store.has_client("run-b", "mid")
    assert not store.has_client("run-a", "beta")


def test_rounds_open_reissue_close_and_due(store: Store) -> None:
    """Breaks caught: a round's fields swapped or dropped on open, re-issue or close; the run's
    current round not advanced; due_rounds listing closed rounds, old rounds or idle runs."""
    _two_runs_three_clients(store)
    with store.transaction():
        store.mark_running("run-a", 1.0)
        store.open_round("run-a", 0, ["c-z", "c-a"], 50.0, 80.0, 1.5)
        store.open_round("run-b", 0, ["c-b"], 51.0, 81.0, 2.5)  # run-b never started: not due
    assert store.run("run-a").round == 0  # type: ignore[union-attr]
    assert store.due_rounds() == [("run-a", 0)]
    r = store.round("run-a", 0)
    assert r is not None
    assert (r.run_id, r.round, r.state, r.attempt, r.sampled) == ("run-a", 0, "open", 1, ["c-z", "c-a"])
    assert (r.opened_at, r.deadline, r.sigma_before, r.closed_at, r.sigma_after) == (
        50.0,
        80.0,
        1.5,
        None,
        None,
    )
    assert (r.used, r.clipped, r.rejected) == ([], [], [])
    with store.transaction():
        store.reissue_round("run-a", 0, 2, ["c-m"], 90.0)
    r = store.round("run-a", 0)
    assert r is not None and (r.attempt, r.sampled, r.deadline, r.opened_at) == (2, ["c-m"], 90.0, 50.0)
    assert store.round("run-b", 0).sampled == ["c-b"]  # type: ignore[union-attr]
    closed = ClosedRound(
        closed_at=95.0, sigma_after=1.25, server_sigma=0.75, mean_norm=3.5, aggregation_seconds=0.01,
        used=["c-m"], clipped=["c-z"], rejected=["c-a"],
    )  # fmt: skip
    with store.transaction():
        store.close_round("run-a", 0, closed)
        store.open_round("run-a", 1, ["c-a"], 96.0, 99.0, 1.25)
    r = store.round("run-a", 0)
    assert r is not None and (r.state, r.closed_at, r.sigma_after, r.server_sigma) == (
        "closed",
        95.0,
        1.25,
        0.75,
    )
    assert (r.mean_norm, r.aggregation_seconds, r.used, r.clipped, r.rejected) == (
        3.5,
        0.01,
        ["c-m"],
        ["c-z"],
        ["c-a"],
    )
    assert store.round("run-b", 0).state == "open"  # type: ignore[union-attr]
    assert [x.round for x in store.rounds("run-a")] == [0, 1]
    assert store.run("run-a").round == 1  # type: ignore[union-attr]
    assert store.due_rounds() == [("run-a", 1)]
    assert store.round("run-a", 7) is None


def test_updates_in_name_order_with_every_field(store: Store) -> None:
    """Breaks caught: round_updates in answer order instead of name order (the server step's input
    would depend on who answered first), a field lost or swapped, a filter on run or round dropped."""
    _two_runs_three_clients(store)
    with store.transaction():
        store.open_round("run-a", 0, ["c-z", "c-a", "c-m"], 1.0, 9.0, 1.0)
        store.open_round("run-a", 1, ["c-z"], 10.0, 19.0, 1.0)
        store.open_round("run-b", 0, ["c-b"], 1.0, 9.0, 1.0)
        store.add_update("run-a", 0, "c-z", _update(3.0, 30, [0.25, 0.5]), 5.0)
        store.add_update("run-a", 0, "c-a", _update(1.0, 10), 6.0)
        store.add_update("run-a", 1, "c-z", _update(9.0, 90), 11.0)
        store.add_update("run-b", 0, "c-b", _update(7.0, 70), 7.0)
    got = store.round_updates("run-a", 0)
    assert [c.client_id for c in got] == ["c-a", "c-z"]
    z = got[1]
    np.testing.assert_array_equal(z.mean, [3.0, -3.0, 0.5])
    assert (z.fitness, z.sigmas, z.mu, z.n_samples, z.losses) == (0.3, (0.9, 0.8), 3, 30, (0.25, 0.5))
    assert got[0].losses is None
    assert store.answered("run-a", 0) == {"c-a", "c-z"}
    assert store.answered("run-a", 1) == {"c-z"}
    assert store.has_update("run-a", 0, "c-a") and not store.has_update("run-a", 1, "c-a")
    assert not store.has_update("run-b", 0, "c-a")
    summaries = store.update_summaries("run-a")
    assert [(s.round, s.client_id, s.name) for s in summaries] == [
        (0, "c-z", "zeta"),
        (0, "c-a", "alpha"),
        (1, "c-z", "zeta"),
    ]
    first = summaries[0]
    assert (first.fitness, first.n_samples, first.received_at) == (0.3, 30, 5.0)
    assert first.metrics == ClientMetrics(train_loss=3.0, n_val=30)


def test_traffic_accumulates_per_round_and_client(store: Store) -> None:
    """Breaks caught: a second exchange of the same round overwriting the first instead of adding,
    bytes in and out swapped, another client's or run's bytes mixed in."""
    _two_runs_three_clients(store)
    with store.transaction():
        store.add_traffic("run-a", 0, "c-z", 100, 7)
        store.add_traffic("run-a", 0, "c-z", 20, 3)
        store.add_traffic("run-a", 1, "c-z", 5, 1)
        store.add_traffic("run-a", 0, "c-a", 50, 2)
        store.add_traffic("run-b", 0, "c-b", 999, 999)
    rows = sorted((t.round, t.client_id, t.bytes_in, t.bytes_out) for t in store.traffic("run-a"))
    assert rows == [(0, "c-a", 50, 2), (0, "c-z", 120, 10), (1, "c-z", 5, 1)]


def test_evals_and_final_reports(store: Store) -> None:
    """Breaks caught: evals read into the wrong fields or out of round order; a final report found
    for another client, round or run, or missed when it came as a validation of state last + 1."""
    _two_runs_three_clients(store)
    with store.transaction():
        store.add_eval("run-a", 3, "c-z", 0.75, 40, 0.5, 60.0)
        store.add_eval("run-a", 1, "c-a", 0.5, 20, None, 61.0)
        store.add_validation("run-a", 4, "c-m", 0.4, 0.9, 8)
    assert [
        (e.round, e.client_id, e.test_accuracy, e.n_test, e.received_at) for e in store.evals("run-a")
    ] == [
        (1, "c-a", 0.5, 20, 61.0),
        (3, "c-z", 0.75, 40, 60.0),
    ]
    assert store.evals("run-b") == []
    assert store.has_final_report("run-a", 3, "c-z")  # its test metrics under the last round
    assert store.has_final_report("run-a", 3, "c-m")  # its validation of state 4 = last + 1
    assert not store.has_final_report("run-a", 3, "c-a")  # evaluated round 1 only
    assert not store.has_final_report("run-a", 4, "c-m")  # validated state 4, not state 5
    assert not store.has_final_report("run-b", 3, "c-z")


def test_validation_is_count_weighted_and_first_report_wins(store: Store) -> None:
    """Breaks caught: an unweighted mean, an accuracy averaged over the reporting sites only (or
    0 where none reported one), a repeated report replacing the first, another run's reports counted."""
    _two_runs_three_clients(store)
    with store.transaction():
        store.add_validation("run-a", 0, "c-z", 0.6, 0.5, 3)
        store.add_validation("run-a", 0, "c-a", 0.2, None, 1)
        store.add_validation("run-a", 0, "c-z", 9.0, 0.0, 50)  # a repeat: ignored
        store.add_validation("run-a", 2, "c-m", 0.3, 1.0, 2)
        store.add_validation("run-a", 3, "c-m", 0.5, None, 2)  # no site reported an accuracy
        store.add_validation("run-b", 0, "c-b", 0.0, 1.0, 100)
    got = store.validation_by_state("run-a")
    assert set(got) == {0, 2, 3}
    assert got[0].loss == pytest.approx(0.6 * 3 / 4 + 0.2 * 1 / 4)
    assert got[0].accuracy == pytest.approx(0.5 * 3 / 4)
    assert got[0].n == 4
    assert got[2] == Validation(0.3, 1.0, 2)
    assert got[3] == Validation(0.5, None, 2)
    assert select_state(got) == 2
    assert store.validation_by_state("run-b")[0] == Validation(0.0, 1.0, 100)


def test_select_state_prefers_the_lowest_loss_then_the_earlier_state() -> None:
    """Breaks caught: the highest loss chosen, or the later state on a tie."""
    assert select_state({}) is None
    tie = {3: Validation(0.5, None, 1), 1: Validation(0.5, None, 1), 2: Validation(0.7, None, 1)}
    assert select_state(tie) == 1
    assert select_state({0: Validation(0.9, None, 1), 5: Validation(0.1, None, 1)}) == 5


def _core(dim: int) -> ESCore:
    rng = np.random.default_rng(3)
    c = rng.normal(size=(dim, dim))
    return ESCore(
        countiter=7, countevals=70, pc=rng.normal(size=dim), pc2=rng.normal(size=dim), ps=rng.normal(size=dim),
        csa_delta=0.125, C=c @ c.T, B=np.asfortranarray(rng.normal(size=(dim, dim))), D=rng.random(dim),
        count_tell=7, last_update=6, count_eigen=2,
    )  # fmt: skip


def test_state_round_trips_every_number_and_array(tmp_path: Path) -> None:
    """Save states 0 and 1, reopen the file, load: the latest state's mean, sigma and every pycma
    field come back bit for bit (B in Fortran order), every earlier mean stays readable, and a
    state without an ES (fedavg) loads as one. Breaks caught: a field lost or swapped, arrays of
    an earlier state left behind, the wrong index loaded, layout or shape mixed up."""
    store = Store(tmp_path / "c.db")
    with store.transaction():
        store.add_run("run-a", "{}", 1.0)
        store.add_run("run-b", "{}", 1.0)
        store.save_state("run-a", 0, ServerState(np.zeros(3), 1.0, _core(3)), 2.0)
        store.save_state("run-a", 1, ServerState(np.array([1.0, 2.0, 3.0]), 0.5, _core(3)), 3.0)
        store.save_state("run-b", 0, ServerState(np.array([4.0, 5.0]), 2.0, None), 4.0)
    store.close()
    store = Store(tmp_path / "c.db")
    idx, state = store.load_state("run-a")
    assert idx == 1 and state.sigma == 0.5
    np.testing.assert_array_equal(state.mean, [1.0, 2.0, 3.0])
    want = _core(3)
    assert state.es is not None
    assert state.es.numbers() == want.numbers()
    for name, array in want.arrays().items():
        got = state.es.arrays()[name]
        assert got.shape == array.shape and got.dtype == np.float64, name
        np.testing.assert_array_equal(got, array, err_msg=name)
    assert state.es.B.flags.f_contiguous
    np.testing.assert_array_equal(store.state_mean("run-a", 0), np.zeros(3))  # type: ignore[arg-type]
    assert store.state_mean("run-a", 2) is None
    idx_b, state_b = store.load_state("run-b")
    assert (idx_b, state_b.sigma, state_b.es) == (0, 2.0, None)
    np.testing.assert_array_equal(state_b.mean, [4.0, 5.0])
    with pytest.raises(LookupError, match="run-c has no global state"):
        store.load_state("run-c")
    with store.transaction():  # a damaged file: the ES row points at a state that is gone
        store._exec("DELETE FROM states WHERE run_id = 'run-b'")
    with pytest.raises(LookupError, match="run run-b has no state 0"):
        store.load_state("run-b")
    arrays = store._all("SELECT run_id, name FROM es_arrays")
    assert sorted((r["run_id"], r["name"]) for r in arrays) == [("run-a", n) for n in sorted(want.arrays())]
    store.close()


def test_packed_arrays_keep_their_layout_and_refuse_what_is_not_ours() -> None:
    """Breaks caught: a Fortran array stored in C order (or read back transposed), a C array
    labelled F, a wrong size or a foreign dtype/layout read as if it were ours, a vector stored in
    its own dtype instead of float64."""
    f = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    c = np.arange(6.0).reshape(2, 3)
    assert _pack(f)[0::2] == ("<f8", "F") and _pack(c)[0::2] == ("<f8", "C")
    assert _pack(np.arange(3.0))[2] == "C"
    for a in (f, c, np.arange(4.0), np.ones((1, 1))):
        back = _unpack(*_pack(a))
        np.testing.assert_array_equal(back, a)
        assert back.flags.writeable and back.dtype == np.float64
    assert _unpack(*_pack(f)).flags.f_contiguous
    # A mean of another dtype (float32 from a wire decode, ints) is stored as float64 all the same.
    for vector in (np.array([1.5, -2.0], dtype=np.float32), np.array([3, 4])):
        assert len(encode_vector(vector)) == 16
        back = decode_vector(encode_vector(vector))
        assert back.dtype == np.float64 and back.tolist() == vector.tolist() and back.flags.writeable
    dtype, shape, layout, data = _pack(c)
    with pytest.raises(ValueError, match="6 values for shape \\(3, 3\\)"):
        _unpack(dtype, "[3, 3]", layout, data)
    with pytest.raises(ValueError, match="dtype '<f4' and layout 'C' is not ours"):
        _unpack("<f4", shape, layout, data)
    with pytest.raises(ValueError, match="layout 'X' is not ours"):
        _unpack(dtype, shape, "X", data)


def test_reopening_keeps_the_schema_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    """Breaks caught: reopening a current file re-runs migrations or rewrites the version; a file
    from an unknown schema opened as if it were ours, or refused without naming the file; a
    store in a folder that does not exist yet."""
    path = tmp_path / "new" / "nested" / "c.db"  # folders made as needed
    Store(path).close()
    Store(path).close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchall() == [("2",)]
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(RuntimeError, match=f"^{path}: schema version 99 is not 2$"):
        Store(path)
