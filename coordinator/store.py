"""SQLite persistence of the coordinator: runs, clients, rounds, updates, traffic, evaluations and
the global state (mean and sigma for every state index; the full CMA-ES state of the latest one),
and the sites' validation of each state (what selection reads).

The file is opened in WAL mode with ``synchronous=FULL``: a transaction that returned from
``COMMIT`` is on disk, so whatever the coordinator acknowledged survives a SIGKILL or a power cut.
Arrays are stored as raw little-endian bytes with their dtype, shape and memory order in typed
columns; nothing is pickled. One connection is shared under the engine's lock (SQLite serialises
writers anyway, and the coordinator's work per request is small).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.es_state import ESCore, ServerState

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    round INTEGER NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    UNIQUE (run_id, name)
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    sampled TEXT NOT NULL,
    opened_at REAL NOT NULL,
    deadline REAL NOT NULL,
    closed_at REAL,
    sigma_before REAL NOT NULL,
    sigma_after REAL,
    server_sigma REAL,
    mean_norm REAL,
    aggregation_seconds REAL,
    used TEXT,
    clipped TEXT,
    rejected TEXT,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS updates (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL REFERENCES clients(client_id),
    mean BLOB NOT NULL,
    fitness REAL NOT NULL,
    sigmas TEXT NOT NULL,
    mu INTEGER NOT NULL,
    n_samples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    bytes_in INTEGER NOT NULL,
    ack_bytes INTEGER NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, client_id),
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round)
);
CREATE TABLE IF NOT EXISTS traffic (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    bytes_out INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, round, client_id)
);
CREATE TABLE IF NOT EXISTS evals (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL REFERENCES clients(client_id),
    test_accuracy REAL NOT NULL,
    n_test INTEGER NOT NULL,
    test_loss REAL,
    received_at REAL NOT NULL,
    PRIMARY KEY (run_id, round, client_id)
);
CREATE TABLE IF NOT EXISTS validations (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    idx INTEGER NOT NULL,
    client_id TEXT NOT NULL REFERENCES clients(client_id),
    loss REAL NOT NULL,
    accuracy REAL,
    n INTEGER NOT NULL,
    PRIMARY KEY (run_id, idx, client_id)
);
CREATE TABLE IF NOT EXISTS states (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    idx INTEGER NOT NULL,
    mean BLOB NOT NULL,
    sigma REAL NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (run_id, idx)
);
CREATE TABLE IF NOT EXISTS es_state (
    run_id TEXT PRIMARY KEY REFERENCES runs(run_id),
    idx INTEGER NOT NULL,
    numbers TEXT
);
CREATE TABLE IF NOT EXISTS es_arrays (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    name TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    layout TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""


@dataclass(frozen=True)
class Validation:
    """One global state's validation over the sites that reported it (weighted by count)."""

    loss: float
    accuracy: float | None
    n: int


def select_state(validations: dict[int, Validation]) -> int | None:
    """The state to hand out: lowest validation loss, the earlier state on a tie; None if none."""
    if not validations:
        return None
    return min(validations, key=lambda idx: (validations[idx].loss, idx))


def encode_vector(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f8").tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f8").copy()


def _pack(array: np.ndarray) -> tuple[str, str, str, bytes]:
    """(dtype, shape, layout, bytes) of a float64 array, keeping Fortran order where it has it."""
    a = np.asarray(array, dtype=np.float64).astype("<f8", copy=False)
    if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous:
        return "<f8", json.dumps(list(a.shape)), "F", a.tobytes(order="F")
    return "<f8", json.dumps(list(a.shape)), "C", a.tobytes(order="C")


def _unpack(dtype: str, shape: str, layout: str, data: bytes) -> np.ndarray:
    if dtype != "<f8" or layout not in ("C", "F"):
        raise ValueError(f"stored array of dtype {dtype!r} and layout {layout!r} is not ours")
    dims = tuple(int(s) for s in json.loads(shape))
    flat = np.frombuffer(data, dtype="<f8")
    if flat.size != int(np.prod(dims)):
        raise ValueError(f"stored array has {flat.size} values for shape {dims}")
    shaped = flat.reshape(dims, order="F") if layout == "F" else flat.reshape(dims, order="C")
    return shaped.astype(np.float64, order="K", copy=True)


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        # CREATE ... IF NOT EXISTS is idempotent; executescript runs outside any transaction.
        self.conn.executescript(SCHEMA)
        with self.transaction():
            row = self.conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self.conn.execute("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row["value"] != SCHEMA_VERSION:
                raise RuntimeError(f"{path}: schema version {row['value']} is not {SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self.conn.execute(sql, params).fetchall())

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    # ----- global state -----
    def save_state(self, run_id: str, idx: int, state: ServerState, now: float) -> None:
        """Record state ``idx`` (mean and sigma kept for every index; the ES itself replaced)."""
        self.execute(
            "INSERT INTO states (run_id, idx, mean, sigma, created_at) VALUES (?, ?, ?, ?, ?)",
            (run_id, idx, encode_vector(state.mean), float(state.sigma), now),
        )
        numbers = None if state.es is None else json.dumps(state.es.numbers())
        self.execute(
            "INSERT OR REPLACE INTO es_state (run_id, idx, numbers) VALUES (?, ?, ?)", (run_id, idx, numbers)
        )
        self.execute("DELETE FROM es_arrays WHERE run_id = ?", (run_id,))
        if state.es is not None:
            for name, array in state.es.arrays().items():
                self.execute(
                    "INSERT INTO es_arrays (run_id, name, dtype, shape, layout, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, name, *_pack(array)),
                )

    def load_state(self, run_id: str) -> tuple[int, ServerState]:
        head = self.one("SELECT idx, numbers FROM es_state WHERE run_id = ?", (run_id,))
        if head is None:
            raise LookupError(f"run {run_id} has no global state")
        idx = int(head["idx"])
        row = self.one("SELECT mean, sigma FROM states WHERE run_id = ? AND idx = ?", (run_id, idx))
        if row is None:
            raise LookupError(f"run {run_id} has no state {idx}")
        core = None
        if head["numbers"] is not None:
            values: dict[str, Any] = dict(json.loads(head["numbers"]))
            for a in self.all(
                "SELECT name, dtype, shape, layout, data FROM es_arrays WHERE run_id = ?", (run_id,)
            ):
                values[a["name"]] = _unpack(a["dtype"], a["shape"], a["layout"], a["data"])
            core = ESCore(**values)
        return idx, ServerState(mean=decode_vector(row["mean"]), sigma=float(row["sigma"]), es=core)

    def state_mean(self, run_id: str, idx: int) -> tuple[np.ndarray, float] | None:
        row = self.one("SELECT mean, sigma FROM states WHERE run_id = ? AND idx = ?", (run_id, idx))
        return None if row is None else (decode_vector(row["mean"]), float(row["sigma"]))

    # ----- validation (selection) -----
    def add_validation(
        self, run_id: str, idx: int, client_id: str, loss: float, accuracy: float | None, n: int
    ) -> None:
        """A site's validation of global state ``idx`` (a repeat of the same report changes nothing)."""
        self.execute(
            "INSERT OR IGNORE INTO validations (run_id, idx, client_id, loss, accuracy, n) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, idx, client_id, float(loss), accuracy, int(n)),
        )

    def has_final_report(self, run_id: str, last_round: int, client_id: str) -> bool:
        """Whether the client already reported its evaluation of the final state (test metrics in
        ``evals`` under the last round, or its validation of state last_round + 1)."""
        row = self.one(
            "SELECT (SELECT COUNT(*) FROM evals WHERE run_id = ? AND round = ? AND client_id = ?) "
            "+ (SELECT COUNT(*) FROM validations WHERE run_id = ? AND idx = ? AND client_id = ?) AS n",
            (run_id, last_round, client_id, run_id, last_round + 1, client_id),
        )
        return row is not None and int(row["n"]) > 0

    def validation_by_state(self, run_id: str) -> dict[int, Validation]:
        """Per global state: the sites' validation loss and accuracy, weighted by their counts."""
        rows = self.all(
            "SELECT idx, SUM(loss * n) / SUM(n) AS loss, SUM(accuracy * n) / SUM(n) AS accuracy, "
            "SUM(n) AS n FROM validations WHERE run_id = ? GROUP BY idx ORDER BY idx",
            (run_id,),
        )
        return {int(r["idx"]): Validation(float(r["loss"]), r["accuracy"], int(r["n"])) for r in rows}

    # ----- traffic -----
    def add_traffic(self, run_id: str, round_: int, client_id: str, bytes_in: int, bytes_out: int) -> None:
        self.execute(
            "INSERT INTO traffic (run_id, round, client_id, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (run_id, round, client_id) DO UPDATE SET "
            "bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out",
            (run_id, round_, client_id, bytes_in, bytes_out),
        )
