"""The store's durability promises: a committed transaction is on disk (WAL, synchronous=FULL), a
failed one leaves nothing behind, and a round close that fails half-way stores none of its parts."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from coordinator.store import Store
from protos import RunConfig
from tests.coordinator.conftest import Coordinator, synthetic_update


def test_commits_are_synchronous_and_write_ahead_logged(tmp_path: Path) -> None:
    """Breaks caught: synchronous lowered to NORMAL or OFF (a power cut may then lose what was
    acknowledged), or the journal left in rollback mode."""
    store = Store(tmp_path / "c.db")
    try:
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    finally:
        store.close()


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    """Breaks caught: committing instead of rolling back when the body raises."""
    store = Store(tmp_path / "c.db")
    config = RunConfig().model_dump_json()
    with pytest.raises(RuntimeError, match="half-way"), store.transaction():
        store.add_run("run-a", config, 1.0)
        raise RuntimeError("half-way")
    assert store.run("run-a") is None
    with store.transaction():
        store.add_run("run-b", config, 2.0)
    store.close()
    other = sqlite3.connect(tmp_path / "c.db")  # what is on disk, seen by another connection
    assert [r[0] for r in other.execute("SELECT run_id FROM runs")] == ["run-b"]
    other.close()


def test_a_close_failing_half_way_stores_none_of_it_and_closes_later(
    coord: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The close writes state r+1, then the round's record; if the second write fails, the first
    must not stay (it would make the next try fail on a duplicate state). Breaks caught: a close
    that commits on error, or one that writes outside its transaction."""
    run_id, sites = coord.new_run(2, rounds=3)
    engine = coord.http.app.state.engine  # type: ignore[attr-defined]
    real = engine.store.close_round

    def fails(*args: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(engine.store, "close_round", fails)
    for k, site in enumerate(sites):
        task = coord.task(run_id, site)
        assert coord.post_update(run_id, 0, site, synthetic_update(task, k)).status_code == 200
    on_disk = sqlite3.connect(coord.db)
    stored = on_disk.execute("SELECT COUNT(*) FROM states WHERE run_id = ? AND idx = 1", (run_id,)).fetchone()
    on_disk.close()
    assert stored[0] == 0  # state 1 was written in the failed close and rolled back with it
    assert engine.runs.state(run_id)[0] == 0
    monkeypatch.setattr(engine.store, "close_round", real)
    engine.check_rounds()  # what the deadline checker does on its next pass (it may have been first)
    assert engine.runs.state(run_id)[0] == 1
    assert coord.rounds(run_id)[0]["state"] == "closed" and coord.info(run_id)["state"] == "running"
