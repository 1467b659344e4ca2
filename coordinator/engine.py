"""The coordinator's rules: runs, enrolment, the round lifecycle and aggregation, on top of the store.

Every method is synchronous and runs under one lock (the app calls them from worker threads), and
every state change is one SQLite transaction committed before the method returns, so an HTTP answer
is only ever sent for what is on disk:
- accepting an update is one transaction (the update, its byte counts);
- closing a round is another: aggregation, the new global state, the round's record and the next
  round's opening (or the run's end) commit together or not at all.
A crash between the two leaves a round with all its answers in and still open; the deadline checker
(also run at startup) closes it.

Round r starts from global state r and produces state r+1 (docs/design.md). A round closes when all
sampled clients answered, or at its deadline with at least ``min_clients`` answers; otherwise it is
re-issued (new deadline, answers kept, the sample topped up) until ``max_round_attempts`` is spent
and the run fails.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from coordinator import auth, records
from coordinator.aggregation import Contribution, aggregate, fedavg_sigma
from coordinator.errors import BadRequest, Conflict, NotFound
from coordinator.es_state import EIGEN_CACHE, ServerState, decomposition_due, initial_es
from coordinator.sampling import client_seed, evaluates, sample_clients, sample_size
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store, decode_vector, encode_vector, select_state
from protos import (
    Array,
    ClientMetrics,
    ClientSummary,
    ClientUpdate,
    EnrolResponse,
    EvalReport,
    GlobalState,
    PromptChoice,
    PromptResponse,
    RoundRecord,
    RunConfig,
    RunInfo,
    Task,
    UpdateAck,
)

log = logging.getLogger(__name__)

CloseResult = Literal["closed", "reissued", "failed", "open"]

_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})


@dataclass
class TaskAnswer:
    """A task as the client will receive it: the JSON body (counted for the round's bytes)."""

    kind: str
    body: bytes


@dataclass
class UpdateResult:
    ack: UpdateAck
    body: bytes
    completes: bool


class EngineHooks:
    """What the app wants to hear about (metrics); the default hears nothing."""

    def update_accepted(self, duplicate: bool, bytes_in: int) -> None: ...

    def round_closed(self, result: CloseResult, seconds: float | None) -> None: ...

    def task_served(self, kind: str, bytes_out: int) -> None: ...


class Engine:
    def __init__(
        self,
        store: Store,
        settings: CoordinatorSettings,
        hooks: EngineHooks | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.hooks = hooks or EngineHooks()
        self.clock = clock
        self.lock = threading.RLock()
        self._configs: dict[str, RunConfig] = {}
        self._states: dict[str, tuple[int, ServerState]] = {}
        self._payloads: dict[str, tuple[int, GlobalState]] = {}
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-eigh")

    def wait_background(self) -> None:
        """Block until the background decompositions submitted so far are done (tests, benchmarks)."""
        self._background.submit(lambda: None).result()

    def close(self) -> None:
        """Stop background work and close the database once no call is using it (a worker thread
        may still be finishing a call whose request was cancelled)."""
        self._background.shutdown(wait=True, cancel_futures=True)
        with self.lock:
            self.store.close()

    # ----- identity -----
    def principal(self, token: str) -> auth.Principal | None:
        if auth.is_admin_token(token, self._admin_token()):
            return auth.Principal(kind="admin")
        # Looked up by its SHA-256 digest: what the lookup's timing could leak is about the digest,
        # which says nothing about other tokens.
        with self.lock:
            row = self.store.one(
                "SELECT client_id, run_id, name FROM clients WHERE token_hash = ?",
                (auth.token_digest(token),),
            )
        if row is None:
            return None
        return auth.Principal(
            kind="client", client_id=row["client_id"], run_id=row["run_id"], name=row["name"]
        )

    def _admin_token(self) -> str | None:
        token = self.settings.admin_token
        return token.get_secret_value() if token is not None else None

    @property
    def admin_configured(self) -> bool:
        return self._admin_token() is not None

    # ----- runs -----
    def create_run(self, config: RunConfig) -> str:
        if config.dim > self.settings.max_intrinsic_dim:
            raise BadRequest(
                f"intrinsic_dim {config.dim} is over this coordinator's limit of {self.settings.max_intrinsic_dim} "
                "(the server keeps a d x d covariance per run; raise FEDBPT_COORDINATOR_MAX_INTRINSIC_DIM to allow it)"
            )
        run_id = auth.new_id("run")
        now = self.clock()
        if config.aggregator == "fedavg":
            state = ServerState(mean=np.zeros(config.dim), sigma=fedavg_sigma(config), es=None)
        else:
            state = initial_es(config.dim, config.projection.sigma0, 2, config.rounds)
        with self.lock, self.store.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM runs").fetchone()["s"]
            db.execute(
                "INSERT INTO runs (run_id, seq, config, state, round, created_at) VALUES (?, ?, ?, 'created', 0, ?)",
                (run_id, seq, config.model_dump_json(), now),
            )
            self.store.save_state(run_id, 0, state, now)
        self._configs[run_id] = config
        self._states[run_id] = (0, state)
        return run_id

    def config(self, run_id: str) -> RunConfig:
        cached = self._configs.get(run_id)
        if cached is not None:
            return cached
        row = self.store.one("SELECT config FROM runs WHERE run_id = ?", (run_id,))
        if row is None:
            raise NotFound(f"unknown run {run_id}")
        config = RunConfig.model_validate_json(row["config"])
        self._configs[run_id] = config
        return config

    def _run_row(self, run_id: str) -> Any:
        row = self.store.one("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if row is None:
            raise NotFound(f"unknown run {run_id}")
        return row

    def run_ids(self) -> list[str]:
        with self.lock:
            return [r["run_id"] for r in self.store.all("SELECT run_id FROM runs ORDER BY seq")]

    def run_info(self, run_id: str) -> RunInfo:
        with self.lock:
            row = self._run_row(run_id)
            return records.run_info(self.store, row, self.config(run_id))

    def rounds(self, run_id: str) -> list[RoundRecord]:
        with self.lock:
            row = self._run_row(run_id)
            return records.round_records(self.store, run_id, self.config(run_id), row["state"] == "finished")

    def clients(self, run_id: str) -> list[ClientSummary]:
        with self.lock:
            self._run_row(run_id)
            return records.client_summaries(self.store, run_id)

    def enrol(self, run_id: str, name: str) -> EnrolResponse:
        token = auth.new_token()
        client_id = auth.new_id("client")
        with self.lock, self.store.transaction() as db:
            run = self._run_row(run_id)
            if run["state"] in ("finished", "failed"):
                raise Conflict(f"run {run_id} is {run['state']}; it takes no new clients")
            if db.execute("SELECT 1 FROM clients WHERE run_id = ? AND name = ?", (run_id, name)).fetchone():
                raise Conflict(f"a client named {name!r} is already enrolled in run {run_id}")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS s FROM clients").fetchone()["s"]
            db.execute(
                "INSERT INTO clients (client_id, run_id, seq, name, token_hash, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (client_id, run_id, seq, name, auth.token_digest(token), self.clock()),
            )
        return EnrolResponse(client_id=client_id, token=token)

    def start(self, run_id: str) -> RunInfo:
        with self.lock:
            with self.store.transaction():
                run = self._run_row(run_id)
                if run["state"] != "created":
                    raise Conflict(f"run {run_id} was already started (it is {run['state']})")
                config = self.config(run_id)
                if not self._enrolled(run_id):
                    raise Conflict(
                        f"run {run_id} has no enrolled clients; enrol at least one before starting"
                    )
                now = self.clock()
                _, state = self._state(run_id)
                self.store.execute(
                    "UPDATE runs SET state = 'running', started_at = ? WHERE run_id = ?", (now, run_id)
                )
                self._open_round(run_id, config, 0, 1, [], now, state.sigma)
            self._prepare_next(run_id)
            return self.run_info(run_id)

    # ----- rounds -----
    def _enrolled(self, run_id: str) -> list[str]:
        # In name order, not enrolment order: sites enrol concurrently, so only the names (unique
        # in a run) make the sampling of a rerun with the same seed and names the same.
        return [
            r["client_id"]
            for r in self.store.all("SELECT client_id FROM clients WHERE run_id = ? ORDER BY name", (run_id,))
        ]

    def _open_round(
        self,
        run_id: str,
        config: RunConfig,
        round_: int,
        attempt: int,
        keep: list[str],
        now: float,
        sigma_before: float,
    ) -> list[str]:
        pool = self._enrolled(run_id)
        sampled = sample_clients(
            pool, sample_size(config.frac, len(pool)), config.seed, round_, attempt, keep
        )
        deadline = now + config.round_timeout_s
        if attempt == 1:
            self.store.execute(
                "INSERT INTO rounds (run_id, round, state, attempt, sampled, opened_at, deadline, sigma_before) "
                "VALUES (?, ?, 'open', 1, ?, ?, ?, ?)",
                (run_id, round_, json.dumps(sampled), now, deadline, sigma_before),
            )
            self.store.execute("UPDATE runs SET round = ? WHERE run_id = ?", (round_, run_id))
        else:
            self.store.execute(
                "UPDATE rounds SET attempt = ?, sampled = ?, deadline = ? WHERE run_id = ? AND round = ?",
                (attempt, json.dumps(sampled), deadline, run_id, round_),
            )
        return sampled

    def _state(self, run_id: str) -> tuple[int, ServerState]:
        cached = self._states.get(run_id)
        if cached is None:
            cached = self.store.load_state(run_id)
            self._states[run_id] = cached
        return cached

    def _prepare_next(self, run_id: str) -> None:
        """Start pycma's next eigen-decomposition in the background, if its next ask will make one."""
        row = self.store.one("SELECT state, round FROM runs WHERE run_id = ?", (run_id,))
        if row is None or row["state"] != "running":
            return
        config = self.config(run_id)
        if config.aggregator != "cmaes":
            return
        idx, state = self._state(run_id)
        rnd = self.store.one("SELECT sampled FROM rounds WHERE run_id = ? AND round = ?", (run_id, idx))
        expected = len(json.loads(rnd["sampled"])) if rnd is not None else 2
        if state.es is not None and decomposition_due(state, max(expected, 2), config.rounds):
            covariance = state.es.C
            self._background.submit(EIGEN_CACHE.precompute, run_id, covariance)

    def close_round(self, run_id: str, round_: int, at_deadline: bool) -> CloseResult:
        """Close round ``round_`` if it may close now (or re-issue it / fail the run at its deadline)."""
        with self.lock:
            result, seconds = self._close_round(run_id, round_, at_deadline)
            if result in ("closed", "reissued"):
                self._prepare_next(run_id)
        if result != "open":
            self.hooks.round_closed(result, seconds)
        return result

    def _close_round(self, run_id: str, round_: int, at_deadline: bool) -> tuple[CloseResult, float | None]:
        with self.store.transaction() as db:
            run = self._run_row(run_id)
            rnd = db.execute(
                "SELECT * FROM rounds WHERE run_id = ? AND round = ?", (run_id, round_)
            ).fetchone()
            if (
                run["state"] != "running"
                or int(run["round"]) != round_
                or rnd is None
                or rnd["state"] != "open"
            ):
                return "open", None
            config = self.config(run_id)
            now = self.clock()
            sampled = json.loads(rnd["sampled"])
            rows = db.execute(
                "SELECT u.* FROM updates u JOIN clients c ON c.client_id = u.client_id "
                "WHERE u.run_id = ? AND u.round = ? ORDER BY c.name",  # not by who enrolled first
                (run_id, round_),
            ).fetchall()
            answered = [r["client_id"] for r in rows]
            if not set(sampled) <= set(answered):
                if not at_deadline or now < float(rnd["deadline"]):
                    return "open", None
                if len(answered) < config.min_clients:
                    return self._reissue_or_fail(run_id, config, rnd, answered, now), None
            idx, state = self._state(run_id)
            if idx != round_:
                raise RuntimeError(f"run {run_id}: stored state {idx} does not start round {round_}")
            contributions = [
                Contribution(
                    client_id=r["client_id"],
                    mean=decode_vector(r["mean"]),
                    fitness=float(r["fitness"]),
                    sigmas=tuple(float(s) for s in json.loads(r["sigmas"])),
                    mu=int(r["mu"]),
                    n_samples=int(r["n_samples"]),
                )
                for r in rows
            ]
            outcome = aggregate(config, state, contributions)
            new = outcome.state
            self.store.save_state(run_id, round_ + 1, new, now)
            db.execute(
                "UPDATE rounds SET state = 'closed', closed_at = ?, sigma_after = ?, server_sigma = ?, "
                "mean_norm = ?, aggregation_seconds = ?, used = ?, clipped = ?, rejected = ? "
                "WHERE run_id = ? AND round = ?",
                (
                    now,
                    new.sigma,
                    outcome.server_sigma,
                    float(np.linalg.norm(new.mean)),
                    outcome.seconds,
                    json.dumps(outcome.used),
                    json.dumps(outcome.clipped),
                    json.dumps(outcome.rejected),
                    run_id,
                    round_,
                ),
            )
            if round_ + 1 >= config.rounds:
                db.execute(
                    "UPDATE runs SET state = 'finished', round = ?, finished_at = ? WHERE run_id = ?",
                    (round_ + 1, now, run_id),
                )
            else:
                self._open_round(run_id, config, round_ + 1, 1, [], now, new.sigma)
        # Committed: only now does the in-memory view move on.
        self._states[run_id] = (round_ + 1, new)
        self._payloads.pop(run_id, None)
        EIGEN_CACHE.forget(run_id)
        log.info(
            "run %s: round %d closed with %d update(s) (%d used) in %.1f ms of aggregation",
            run_id,
            round_,
            len(rows),
            len(outcome.used),
            outcome.seconds * 1e3,
        )
        return "closed", outcome.seconds

    def _reissue_or_fail(
        self, run_id: str, config: RunConfig, rnd: Any, answered: list[str], now: float
    ) -> CloseResult:
        round_ = int(rnd["round"])
        attempt = int(rnd["attempt"])
        if attempt >= config.max_round_attempts:
            error = (
                f"round {round_} failed: {len(answered)} answer(s) by its deadline, min_clients is "
                f"{config.min_clients}, after {attempt} attempt(s) (max_round_attempts)"
            )
            self.store.execute(
                "UPDATE runs SET state = 'failed', error = ?, finished_at = ? WHERE run_id = ?",
                (error, now, run_id),
            )
            log.warning("run %s: %s", run_id, error)
            return "failed"
        sampled = self._open_round(
            run_id, config, round_, attempt + 1, answered, now, float(rnd["sigma_before"])
        )
        log.info(
            "run %s: round %d re-issued (attempt %d, %d answer(s) kept, sample %s)",
            run_id,
            round_,
            attempt + 1,
            len(answered),
            sampled,
        )
        return "reissued"

    def check_rounds(self) -> list[str]:
        """Close, re-issue or fail every open round that is due; return the runs that changed.
        Runs periodically and at startup (which also closes rounds a crash left complete but open)."""
        changed: list[str] = []
        with self.lock:
            due = self.store.all(
                "SELECT r.run_id, r.round FROM rounds r JOIN runs u ON u.run_id = r.run_id AND u.round = r.round "
                "WHERE u.state = 'running' AND r.state = 'open'"
            )
        for row in due:
            try:
                result = self.close_round(row["run_id"], int(row["round"]), at_deadline=True)
            except Exception:
                log.exception("run %s: closing round %d failed", row["run_id"], row["round"])
                continue
            if result != "open":
                changed.append(row["run_id"])
        return changed

    def resume(self) -> list[str]:
        """At startup: settle open rounds and start the background decompositions."""
        changed = self.check_rounds()
        for run_id in self.run_ids():
            with self.lock:
                self._prepare_next(run_id)
        return changed

    # ----- tasks -----
    def task(self, principal: auth.Principal, run_id: str) -> TaskAnswer:
        auth.require_client(principal, run_id)
        assert principal.client_id is not None
        client_id = principal.client_id
        with self.lock:
            run = self._run_row(run_id)
            config = self.config(run_id)
            state = run["state"]
            retry = self.settings.retry_after_s
            if state == "failed":
                raise Conflict(f"run {run_id} failed: {run['error']}")
            if state == "created":
                return self._answer(Task(kind="wait", retry_after_s=retry))
            idx, _ = self._state(run_id)
            if state == "finished":
                task = Task(
                    kind="done",
                    round=idx,
                    state=self._payload(run_id, config),
                    config=config,
                    evaluate=True,
                    retry_after_s=retry,
                )
                return self._answer(task)
            round_ = int(run["round"])
            rnd = self.store.one("SELECT * FROM rounds WHERE run_id = ? AND round = ?", (run_id, round_))
            answered = self.store.one(
                "SELECT 1 FROM updates WHERE run_id = ? AND round = ? AND client_id = ?",
                (run_id, round_, client_id),
            )
            if rnd is None or client_id not in json.loads(rnd["sampled"]) or answered is not None:
                return self._answer(Task(kind="wait", round=round_, retry_after_s=retry))
            task = Task(
                kind="train",
                round=round_,
                state=self._payload(run_id, config),
                config=config,
                # Keyed on the client's name, not its random id, so a rerun draws the same seeds.
                client_seed=client_seed(
                    config.client_seeds, config.seed, round_, principal.name or client_id
                ),
                evaluate=evaluates(config.eval_every, round_),
                deadline=float(rnd["deadline"]),
                retry_after_s=retry,
            )
            answer = self._answer(task)
            with self.store.transaction():
                self.store.add_traffic(run_id, round_, client_id, 0, len(answer.body))
            return answer

    def _answer(self, task: Task) -> TaskAnswer:
        body = task.model_dump_json().encode()
        self.hooks.task_served(task.kind, len(body))
        return TaskAnswer(kind=task.kind, body=body)

    def _payload(self, run_id: str, config: RunConfig) -> GlobalState:
        """The current global state as clients receive it (encoded once per state)."""
        idx, state = self._state(run_id)
        cached = self._payloads.get(run_id)
        if cached is not None and cached[0] == idx:
            return cached[1]
        cov: Array | None = None
        matrix = state.covariance()
        if matrix is not None:
            shaped = np.diag(matrix) if config.covariance == "diagonal" else matrix
            cov = Array.from_numpy(shaped, dtype=config.covariance_dtype)
        payload = GlobalState(mean=Array.from_numpy(state.mean, dtype="float64"), sigma=state.sigma, cov=cov)
        self._payloads[run_id] = (idx, payload)
        return payload

    # ----- updates -----
    def accept_update(
        self, principal: auth.Principal, run_id: str, round_: int, update: ClientUpdate, bytes_in: int
    ) -> UpdateResult:
        auth.require_client(principal, run_id)
        assert principal.client_id is not None
        client_id = principal.client_id
        with self.lock:
            with self.store.transaction() as db:
                run = self._run_row(run_id)
                config = self.config(run_id)
                current = int(run["round"])
                if run["state"] == "created" or round_ < 0 or round_ > current:
                    raise NotFound(f"run {run_id} has no round {round_} (the current round is {current})")
                previous = db.execute(
                    "SELECT 1 FROM updates WHERE run_id = ? AND round = ? AND client_id = ?",
                    (run_id, round_, client_id),
                ).fetchone()
                rnd = db.execute(
                    "SELECT state, sampled FROM rounds WHERE run_id = ? AND round = ?", (run_id, round_)
                ).fetchone()
                if rnd is None:
                    raise NotFound(f"run {run_id} has no round {round_}")
                closed = rnd["state"] == "closed" or run["state"] != "running"
                if previous is not None:
                    ack = UpdateAck(accepted=True, duplicate=True, round=round_, round_closed=closed)
                    result = UpdateResult(ack, ack.model_dump_json().encode(), completes=False)
                    self.hooks.update_accepted(True, bytes_in)
                    return result
                if run["state"] == "failed":
                    raise Conflict(f"run {run_id} failed: {run['error']}")
                if closed:
                    raise Conflict(f"round {round_} of run {run_id} is closed; late updates are not applied")
                sampled = json.loads(rnd["sampled"])
                if client_id not in sampled:
                    raise Conflict(
                        f"client {client_id} was not sampled for round {round_} of run {run_id}; "
                        "ask GET /task for what to do"
                    )
                mean = self._validate(config, update)
                answered = {
                    r["client_id"]
                    for r in db.execute(
                        "SELECT client_id FROM updates WHERE run_id = ? AND round = ?", (run_id, round_)
                    )
                }
                completes = set(sampled) <= answered | {client_id}
                ack = UpdateAck(accepted=True, duplicate=False, round=round_, round_closed=completes)
                body = ack.model_dump_json().encode()
                db.execute(
                    "INSERT INTO updates (run_id, round, client_id, mean, fitness, sigmas, mu, n_samples, metrics, "
                    "bytes_in, ack_bytes, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        round_,
                        client_id,
                        encode_vector(mean),
                        float(update.fitness),
                        json.dumps([float(s) for s in update.sigmas]),
                        update.mu,
                        update.n_samples,
                        update.metrics.model_dump_json(),
                        bytes_in,
                        len(body),
                        self.clock(),
                    ),
                )
                self.store.add_traffic(run_id, round_, client_id, bytes_in, len(body))
                m = update.metrics
                if m.val_loss is not None:  # the site's validation of state round_ (what it received)
                    self.store.add_validation(run_id, round_, client_id, m.val_loss, m.val_accuracy, m.n_val)
            self.hooks.update_accepted(False, bytes_in)
            return UpdateResult(ack, body, completes)

    @staticmethod
    def _validate(config: RunConfig, update: ClientUpdate) -> np.ndarray:
        """What the schema cannot know: this run's dimension, local iterations and population."""
        if update.mean.dtype not in _FLOAT_DTYPES:
            raise BadRequest(f"mean must be a float array, got dtype {update.mean.dtype}")
        if update.mean.shape != [config.dim]:
            raise BadRequest(
                f"mean has shape {update.mean.shape}; this run's intrinsic dimension is {config.dim} "
                f"(expected shape [{config.dim}])"
            )
        if len(update.sigmas) != config.local_iters:
            raise BadRequest(
                f"{len(update.sigmas)} sigmas given; this run has local_iters = {config.local_iters} "
                "(one sigma per local generation)"
            )
        if not 1 <= update.mu <= config.local_popsize:
            raise BadRequest(f"mu = {update.mu} is out of range [1, local_popsize = {config.local_popsize}]")
        _check_metrics(update.metrics)
        return np.asarray(update.mean.numpy(), dtype=np.float64)

    # ----- evaluations of the final state -----
    def record_eval(
        self, principal: auth.Principal, run_id: str, round_: int, report: EvalReport
    ) -> UpdateAck:
        auth.require_client(principal, run_id)
        assert principal.client_id is not None
        with self.lock, self.store.transaction() as db:
            run = self._run_row(run_id)
            config = self.config(run_id)
            last = config.rounds - 1
            if round_ < 0 or round_ > last or (run["state"] != "finished" and round_ > int(run["round"])):
                raise NotFound(f"run {run_id} has no round {round_}")
            if run["state"] != "finished":
                raise Conflict(
                    f"run {run_id} is {run['state']}: evaluations are of the final state, posted after the done task"
                )
            if round_ != last:
                raise Conflict(
                    f"round {round_} is not the last round ({last}); the final state is evaluated as round {last}"
                )
            if self.store.has_final_report(run_id, round_, principal.client_id):
                return UpdateAck(accepted=True, duplicate=True, round=round_, round_closed=True)
            if report.test_accuracy is not None:
                db.execute(
                    "INSERT INTO evals (run_id, round, client_id, test_accuracy, n_test, test_loss, received_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id,
                        round_,
                        principal.client_id,
                        report.test_accuracy,
                        report.n_test,
                        report.test_loss,
                        self.clock(),
                    ),
                )
            if report.val_loss is not None:  # the final state (round_ + 1) is a selection candidate too
                self.store.add_validation(
                    run_id,
                    round_ + 1,
                    principal.client_id,
                    report.val_loss,
                    report.val_accuracy,
                    report.n_val,
                )
            return UpdateAck(accepted=True, duplicate=False, round=round_, round_closed=True)

    # ----- the prompt -----
    def prompt(self, run_id: str, which: str = "selected") -> PromptResponse:
        """The prompt of state ``which``: "selected" (lowest validation loss; the final state where
        no site validated any), "final" (the latest state) or a state index."""
        with self.lock:
            self._run_row(run_id)
            config = self.config(run_id)
            final_idx, state = self._state(run_id)
            validations = self.store.validation_by_state(run_id)
            chosen: PromptChoice = "final"
            idx, mean = final_idx, state.mean
            if which == "selected":
                selected = select_state(validations)
                if selected is not None:
                    chosen, idx = "selected", selected
            elif which != "final":
                chosen, idx = "state", _state_index(which)
            if idx != final_idx:
                stored = self.store.state_mean(run_id, idx)
                if stored is None:
                    raise NotFound(f"run {run_id} has no state {idx} (states 0..{final_idx} exist)")
                mean = stored[0]
        found = validations.get(idx)
        return PromptResponse(
            z=Array.from_numpy(mean, dtype="float64"),
            projection=config.projection,
            round=idx,
            chosen=chosen,
            val_loss=found.loss if found is not None else None,
            task=config.task,
            template=config.template,
            labels=config.labels,
        )

    def round_state(self, run_id: str) -> tuple[str, int]:
        """(run state, round) for long-poll bookkeeping."""
        with self.lock:
            row = self._run_row(run_id)
            return row["state"], int(row["round"])


def _state_index(which: str) -> int:
    if not which.isdigit():
        raise BadRequest(f"state must be 'selected', 'final' or a state index (0, 1, ...), got {which!r}")
    return int(which)


def _check_metrics(metrics: ClientMetrics) -> None:
    if (metrics.val_loss is None) != (metrics.n_val == 0):
        raise BadRequest("metrics.val_loss and metrics.n_val >= 1 go together (n_val = 0: no validation)")
    for name in (
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "test_loss",
        "val_loss",
        "val_accuracy",
        "seconds",
    ):
        value = getattr(metrics, name)
        if value is not None and not math.isfinite(value):
            raise BadRequest(f"metrics.{name} must be finite, got {value}")
    for name in ("train_accuracy", "test_accuracy", "val_accuracy"):
        value = getattr(metrics, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise BadRequest(f"metrics.{name} must lie in [0, 1], got {value}")
    for name in (
        "n_test",
        "n_val",
        "service_calls",
        "service_rows",
        "service_bytes_sent",
        "service_bytes_received",
        "seconds",
    ):
        if getattr(metrics, name) < 0:
            raise BadRequest(f"metrics.{name} must not be negative")
