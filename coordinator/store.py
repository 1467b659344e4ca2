"""SQLite persistence of the coordinator: runs, clients, rounds, updates, traffic, evaluations and
the global state (mean and sigma for every state index; the full CMA-ES state of the latest one),
and the sites' validation of each state (what selection reads).

The file is opened in WAL mode with ``synchronous=FULL``: a transaction that returned from
``COMMIT`` is on disk, so whatever the coordinator acknowledged survives a SIGKILL or a power cut.
Arrays are stored as raw little-endian bytes with their dtype, shape and memory order in typed
columns; nothing is pickled.

All of the coordinator's SQL is in this module, behind typed methods that return dataclasses or
protos. One connection is shared under the engine's lock (SQLite serialises writers anyway, and the
coordinator's work per request is small); a second, read-only one serves ``/metrics``, so a scrape
never waits for a round to close (WAL lets it read the last committed state meanwhile).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from coordinator.aggregators.base import Contribution
from coordinator.es_state import ESCore, ServerState
from protos import ClientMetrics

SCHEMA_VERSION = "2"
# What an older schema needs to become this one (version -> statements to the next).
MIGRATIONS: dict[str, tuple[str, ...]] = {
    "1": ("ALTER TABLE updates ADD COLUMN losses TEXT",),  # shared_es: one loss per candidate
}

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
    losses TEXT,
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


# ----- what the store returns -----
RunStateName = Literal["created", "running", "finished", "failed"]
RoundStateName = Literal["open", "closed"]


@dataclass(frozen=True)
class RunRow:
    run_id: str
    config: str  # RunConfig as JSON (the engine parses and caches it)
    state: RunStateName
    round: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None


@dataclass(frozen=True)
class ClientRow:
    client_id: str
    run_id: str
    name: str
    created_at: float


@dataclass(frozen=True)
class RoundRow:
    run_id: str
    round: int
    state: RoundStateName
    attempt: int
    sampled: list[str]
    opened_at: float
    deadline: float
    sigma_before: float
    closed_at: float | None = None
    sigma_after: float | None = None
    server_sigma: float | None = None
    mean_norm: float | None = None
    aggregation_seconds: float | None = None
    used: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClosedRound:
    """What closing a round records about it."""

    closed_at: float
    sigma_after: float
    server_sigma: float | None
    mean_norm: float
    aggregation_seconds: float
    used: list[str]
    clipped: list[str]
    rejected: list[str]


@dataclass(frozen=True)
class NewUpdate:
    """An admitted update, with what its HTTP exchange weighed."""

    mean: np.ndarray
    fitness: float
    sigmas: list[float]
    mu: int
    n_samples: int
    metrics: ClientMetrics
    bytes_in: int
    ack_bytes: int
    losses: list[float] | None = None  # shared_es: one per candidate


@dataclass(frozen=True)
class UpdateSummary:
    """An update as the read models show it (no mean)."""

    round: int
    client_id: str
    name: str
    fitness: float
    n_samples: int
    metrics: ClientMetrics
    received_at: float


@dataclass(frozen=True)
class EvalRow:
    round: int
    client_id: str
    test_accuracy: float
    n_test: int
    received_at: float


@dataclass(frozen=True)
class TrafficRow:
    round: int
    client_id: str
    bytes_in: int
    bytes_out: int


@dataclass(frozen=True)
class Validation:
    """One global state's validation over the sites that reported it (weighted by count)."""

    loss: float
    accuracy: float | None
    n: int


def _weighted_validation(rows: Sequence[sqlite3.Row]) -> Validation:
    """The count-weighted mean of the sites' validation reports of one state (the accuracy over
    the sites that reported one, with every site's count in the total, as for the loss). Each
    value is scaled by its weight n_i / n before the sum, so finite reports give a finite mean."""
    n = sum(int(r["n"]) for r in rows)
    loss = sum(float(r["loss"]) * (int(r["n"]) / n) for r in rows)
    accuracies = [float(r["accuracy"]) * (int(r["n"]) / n) for r in rows if r["accuracy"] is not None]
    return Validation(loss, sum(accuracies) if accuracies else None, n)


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


def _ids(text: str | None) -> list[str]:
    return [] if text is None else [str(x) for x in json.loads(text)]


def _round_row(r: sqlite3.Row) -> RoundRow:
    return RoundRow(
        run_id=r["run_id"],
        round=int(r["round"]),
        state=cast(RoundStateName, r["state"]),
        attempt=int(r["attempt"]),
        sampled=_ids(r["sampled"]),
        opened_at=float(r["opened_at"]),
        deadline=float(r["deadline"]),
        sigma_before=float(r["sigma_before"]),
        closed_at=r["closed_at"],
        sigma_after=r["sigma_after"],
        server_sigma=r["server_sigma"],
        mean_norm=r["mean_norm"],
        aggregation_seconds=r["aggregation_seconds"],
        used=_ids(r["used"]),
        clipped=_ids(r["clipped"]),
        rejected=_ids(r["rejected"]),
    )


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.row_factory = sqlite3.Row
    return conn


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect(path)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        # CREATE ... IF NOT EXISTS is idempotent; executescript runs outside any transaction.
        self._conn.executescript(SCHEMA)
        with self.transaction():
            row = self._one("SELECT value FROM meta WHERE key = 'schema'")
            if row is None:
                self._exec("INSERT INTO meta (key, value) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            else:
                self._migrate(path, str(row["value"]))
        self._reader = _connect(path)
        self._reader.execute("PRAGMA query_only=ON")
        self._reader_lock = threading.Lock()

    def _migrate(self, path: Path, version: str) -> None:
        """Bring a database of an older schema to this one (inside the opening transaction)."""
        while version != SCHEMA_VERSION:
            if version not in MIGRATIONS:
                raise RuntimeError(f"{path}: schema version {version} is not {SCHEMA_VERSION}")
            for statement in MIGRATIONS[version]:
                self._exec(statement)
            version = str(int(version) + 1)
            self._exec("UPDATE meta SET value = ? WHERE key = 'schema'", (version,))

    def close(self) -> None:
        self._conn.close()
        with self._reader_lock:
            self._reader.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any exception): the store's methods
        called inside commit together or not at all."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
        return row

    def _all(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return list(self._conn.execute(sql, params).fetchall())

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self._conn.execute(sql, params)

    # ----- runs -----
    def add_run(self, run_id: str, config_json: str, now: float) -> None:
        seq = self._one("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM runs")
        assert seq is not None
        self._exec(
            "INSERT INTO runs (run_id, seq, config, state, round, created_at) VALUES (?, ?, ?, 'created', 0, ?)",
            (run_id, seq["s"], config_json, now),
        )

    def run(self, run_id: str) -> RunRow | None:
        r = self._one("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if r is None:
            return None
        return RunRow(
            run_id=r["run_id"],
            config=r["config"],
            state=cast(RunStateName, r["state"]),
            round=int(r["round"]),
            created_at=float(r["created_at"]),
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            error=r["error"],
        )

    def run_ids(self) -> list[str]:
        return [r["run_id"] for r in self._all("SELECT run_id FROM runs ORDER BY seq")]

    def mark_running(self, run_id: str, now: float) -> None:
        self._exec("UPDATE runs SET state = 'running', started_at = ? WHERE run_id = ?", (now, run_id))

    def finish_run(self, run_id: str, final_round: int, now: float) -> None:
        self._exec(
            "UPDATE runs SET state = 'finished', round = ?, finished_at = ? WHERE run_id = ?",
            (final_round, now, run_id),
        )

    def fail_run(self, run_id: str, error: str, now: float) -> None:
        self._exec(
            "UPDATE runs SET state = 'failed', error = ?, finished_at = ? WHERE run_id = ?",
            (error, now, run_id),
        )

    # ----- clients -----
    def client_by_token(self, token_hash: str) -> ClientRow | None:
        r = self._one(
            "SELECT client_id, run_id, name, created_at FROM clients WHERE token_hash = ?", (token_hash,)
        )
        return (
            None if r is None else ClientRow(r["client_id"], r["run_id"], r["name"], float(r["created_at"]))
        )

    def has_client(self, run_id: str, name: str) -> bool:
        return self._one("SELECT 1 FROM clients WHERE run_id = ? AND name = ?", (run_id, name)) is not None

    def add_client(self, client_id: str, run_id: str, name: str, token_hash: str, now: float) -> None:
        seq = self._one("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM clients")
        assert seq is not None
        self._exec(
            "INSERT INTO clients (client_id, run_id, seq, name, token_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (client_id, run_id, seq["s"], name, token_hash, now),
        )

    def enrolled(self, run_id: str) -> list[str]:
        """The run's client ids in name order (unique in a run; sites enrol concurrently, so only
        the names make the sampling of a rerun with the same seed and names the same)."""
        rows = self._all("SELECT client_id FROM clients WHERE run_id = ? ORDER BY name", (run_id,))
        return [r["client_id"] for r in rows]

    def clients(self, run_id: str) -> list[ClientRow]:
        """The run's clients in enrolment order."""
        rows = self._all(
            "SELECT client_id, run_id, name, created_at FROM clients WHERE run_id = ? ORDER BY seq", (run_id,)
        )
        return [ClientRow(r["client_id"], r["run_id"], r["name"], float(r["created_at"])) for r in rows]

    # ----- rounds -----
    def open_round(
        self, run_id: str, round_: int, sampled: list[str], now: float, deadline: float, sigma_before: float
    ) -> None:
        """Round ``round_``'s first attempt; it becomes the run's current round."""
        self._exec(
            "INSERT INTO rounds (run_id, round, state, attempt, sampled, opened_at, deadline, sigma_before) "
            "VALUES (?, ?, 'open', 1, ?, ?, ?, ?)",
            (run_id, round_, json.dumps(sampled), now, deadline, sigma_before),
        )
        self._exec("UPDATE runs SET round = ? WHERE run_id = ?", (round_, run_id))

    def reissue_round(
        self, run_id: str, round_: int, attempt: int, sampled: list[str], deadline: float
    ) -> None:
        self._exec(
            "UPDATE rounds SET attempt = ?, sampled = ?, deadline = ? WHERE run_id = ? AND round = ?",
            (attempt, json.dumps(sampled), deadline, run_id, round_),
        )

    def round(self, run_id: str, round_: int) -> RoundRow | None:
        r = self._one("SELECT * FROM rounds WHERE run_id = ? AND round = ?", (run_id, round_))
        return None if r is None else _round_row(r)

    def rounds(self, run_id: str) -> list[RoundRow]:
        return [
            _round_row(r)
            for r in self._all("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))
        ]

    def close_round(self, run_id: str, round_: int, closed: ClosedRound) -> None:
        self._exec(
            "UPDATE rounds SET state = 'closed', closed_at = ?, sigma_after = ?, server_sigma = ?, "
            "mean_norm = ?, aggregation_seconds = ?, used = ?, clipped = ?, rejected = ? "
            "WHERE run_id = ? AND round = ?",
            (
                closed.closed_at,
                closed.sigma_after,
                closed.server_sigma,
                closed.mean_norm,
                closed.aggregation_seconds,
                json.dumps(closed.used),
                json.dumps(closed.clipped),
                json.dumps(closed.rejected),
                run_id,
                round_,
            ),
        )

    def due_rounds(self) -> list[tuple[str, int]]:
        """(run, round) of every running run's open current round."""
        rows = self._all(
            "SELECT r.run_id, r.round FROM rounds r JOIN runs u ON u.run_id = r.run_id AND u.round = r.round "
            "WHERE u.state = 'running' AND r.state = 'open'"
        )
        return [(r["run_id"], int(r["round"])) for r in rows]

    # ----- updates -----
    def has_update(self, run_id: str, round_: int, client_id: str) -> bool:
        row = self._one(
            "SELECT 1 FROM updates WHERE run_id = ? AND round = ? AND client_id = ?",
            (run_id, round_, client_id),
        )
        return row is not None

    def round_updates(self, run_id: str, round_: int) -> list[Contribution]:
        """The round's updates, as the server step reads them, in client-name order (not by who enrolled or answered first)."""
        rows = self._all(
            "SELECT u.* FROM updates u JOIN clients c ON c.client_id = u.client_id "
            "WHERE u.run_id = ? AND u.round = ? ORDER BY c.name",
            (run_id, round_),
        )
        return [
            Contribution(
                client_id=r["client_id"],
                mean=decode_vector(r["mean"]),
                fitness=float(r["fitness"]),
                sigmas=tuple(float(s) for s in json.loads(r["sigmas"])),
                mu=int(r["mu"]),
                n_samples=int(r["n_samples"]),
                losses=None if r["losses"] is None else tuple(float(x) for x in json.loads(r["losses"])),
            )
            for r in rows
        ]

    def answered(self, run_id: str, round_: int) -> set[str]:
        rows = self._all("SELECT client_id FROM updates WHERE run_id = ? AND round = ?", (run_id, round_))
        return {r["client_id"] for r in rows}

    def add_update(self, run_id: str, round_: int, client_id: str, update: NewUpdate, now: float) -> None:
        self._exec(
            "INSERT INTO updates (run_id, round, client_id, mean, fitness, sigmas, mu, n_samples, metrics, "
            "bytes_in, ack_bytes, received_at, losses) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                round_,
                client_id,
                encode_vector(update.mean),
                float(update.fitness),
                json.dumps([float(s) for s in update.sigmas]),
                update.mu,
                update.n_samples,
                update.metrics.model_dump_json(),
                update.bytes_in,
                update.ack_bytes,
                now,
                None if update.losses is None else json.dumps([float(x) for x in update.losses]),
            ),
        )

    def update_summaries(self, run_id: str) -> list[UpdateSummary]:
        """Every update of the run, by round and then enrolment order."""
        rows = self._all(
            "SELECT u.round, u.client_id, c.name, u.fitness, u.n_samples, u.metrics, u.received_at "
            "FROM updates u JOIN clients c ON c.client_id = u.client_id "
            "WHERE u.run_id = ? ORDER BY u.round, c.seq",
            (run_id,),
        )
        return [
            UpdateSummary(
                round=int(r["round"]),
                client_id=r["client_id"],
                name=r["name"],
                fitness=float(r["fitness"]),
                n_samples=int(r["n_samples"]),
                metrics=ClientMetrics.model_validate_json(r["metrics"]),
                received_at=float(r["received_at"]),
            )
            for r in rows
        ]

    # ----- evaluations of the final state -----
    def add_eval(
        self,
        run_id: str,
        round_: int,
        client_id: str,
        accuracy: float,
        n_test: int,
        loss: float | None,
        now: float,
    ) -> None:
        self._exec(
            "INSERT INTO evals (run_id, round, client_id, test_accuracy, n_test, test_loss, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (run_id, round_, client_id, accuracy, n_test, loss, now),
        )

    def evals(self, run_id: str) -> list[EvalRow]:
        rows = self._all(
            "SELECT round, client_id, test_accuracy, n_test, received_at FROM evals WHERE run_id = ? ORDER BY round",
            (run_id,),
        )
        return [
            EvalRow(
                int(r["round"]),
                r["client_id"],
                float(r["test_accuracy"]),
                int(r["n_test"]),
                float(r["received_at"]),
            )
            for r in rows
        ]

    def has_final_report(self, run_id: str, last_round: int, client_id: str) -> bool:
        """Whether the client already reported its evaluation of the final state (test metrics in
        ``evals`` under the last round, or its validation of state last_round + 1)."""
        row = self._one(
            "SELECT (SELECT COUNT(*) FROM evals WHERE run_id = ? AND round = ? AND client_id = ?) "
            "+ (SELECT COUNT(*) FROM validations WHERE run_id = ? AND idx = ? AND client_id = ?) AS n",
            (run_id, last_round, client_id, run_id, last_round + 1, client_id),
        )
        return row is not None and int(row["n"]) > 0

    # ----- global state -----
    def save_state(self, run_id: str, idx: int, state: ServerState, now: float) -> None:
        """Record state ``idx`` (mean and sigma kept for every index; the ES itself replaced)."""
        self._exec(
            "INSERT INTO states (run_id, idx, mean, sigma, created_at) VALUES (?, ?, ?, ?, ?)",
            (run_id, idx, encode_vector(state.mean), float(state.sigma), now),
        )
        numbers = None if state.es is None else json.dumps(state.es.numbers())
        self._exec(
            "INSERT OR REPLACE INTO es_state (run_id, idx, numbers) VALUES (?, ?, ?)", (run_id, idx, numbers)
        )
        self._exec("DELETE FROM es_arrays WHERE run_id = ?", (run_id,))
        if state.es is not None:
            for name, array in state.es.arrays().items():
                self._exec(
                    "INSERT INTO es_arrays (run_id, name, dtype, shape, layout, data) VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, name, *_pack(array)),
                )

    def load_state(self, run_id: str) -> tuple[int, ServerState]:
        head = self._one("SELECT idx, numbers FROM es_state WHERE run_id = ?", (run_id,))
        if head is None:
            raise LookupError(f"run {run_id} has no global state")
        idx = int(head["idx"])
        row = self._one("SELECT mean, sigma FROM states WHERE run_id = ? AND idx = ?", (run_id, idx))
        if row is None:
            raise LookupError(f"run {run_id} has no state {idx}")
        core = None
        if head["numbers"] is not None:
            values: dict[str, Any] = dict(json.loads(head["numbers"]))
            for a in self._all(
                "SELECT name, dtype, shape, layout, data FROM es_arrays WHERE run_id = ?", (run_id,)
            ):
                values[a["name"]] = _unpack(a["dtype"], a["shape"], a["layout"], a["data"])
            core = ESCore(**values)
        return idx, ServerState(mean=decode_vector(row["mean"]), sigma=float(row["sigma"]), es=core)

    def state_mean(self, run_id: str, idx: int) -> np.ndarray | None:
        """The mean of global state ``idx`` (every index is kept); None if there is none."""
        row = self._one("SELECT mean FROM states WHERE run_id = ? AND idx = ?", (run_id, idx))
        return None if row is None else decode_vector(row["mean"])

    # ----- validation (selection) -----
    def add_validation(
        self, run_id: str, idx: int, client_id: str, loss: float, accuracy: float | None, n: int
    ) -> None:
        """A site's validation of global state ``idx`` (a repeat of the same report changes nothing)."""
        self._exec(
            "INSERT OR IGNORE INTO validations (run_id, idx, client_id, loss, accuracy, n) VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, idx, client_id, float(loss), accuracy, int(n)),
        )

    def validation_by_state(self, run_id: str) -> dict[int, Validation]:
        """Per global state: the sites' validation loss and accuracy, weighted by their counts.
        Summed here, not by SQL: each count may be up to 2**62 (admission's bound), and SQLite's
        SUM of two of them overflows (a 500 on every read of the run)."""
        rows = self._all(
            "SELECT idx, loss, accuracy, n FROM validations WHERE run_id = ? ORDER BY idx, client_id",
            (run_id,),
        )
        by_state: dict[int, list[sqlite3.Row]] = {}
        for r in rows:
            by_state.setdefault(int(r["idx"]), []).append(r)
        return {idx: _weighted_validation(group) for idx, group in by_state.items()}

    # ----- traffic -----
    def add_traffic(self, run_id: str, round_: int, client_id: str, bytes_in: int, bytes_out: int) -> None:
        self._exec(
            "INSERT INTO traffic (run_id, round, client_id, bytes_in, bytes_out) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (run_id, round, client_id) DO UPDATE SET "
            "bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out",
            (run_id, round_, client_id, bytes_in, bytes_out),
        )

    def traffic(self, run_id: str) -> list[TrafficRow]:
        rows = self._all(
            "SELECT round, client_id, bytes_in, bytes_out FROM traffic WHERE run_id = ?", (run_id,)
        )
        return [
            TrafficRow(int(r["round"]), r["client_id"], int(r["bytes_in"]), int(r["bytes_out"])) for r in rows
        ]

    # ----- gauges (the read-only connection: never waits for the engine) -----
    def gauges(self) -> tuple[dict[str, int], int]:
        """(runs by state, enrolled clients over all runs), as last committed."""
        with self._reader_lock:
            runs = {
                r["state"]: int(r["n"])
                for r in self._reader.execute("SELECT state, COUNT(*) AS n FROM runs GROUP BY state")
            }
            clients = self._reader.execute("SELECT COUNT(*) AS n FROM clients").fetchone()
        return runs, int(clients["n"])
