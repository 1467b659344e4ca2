"""The round lifecycle: open, accept an update, close (aggregate), re-issue or fail, deadline checks.

Round r starts from global state r and produces state r+1 (docs/design.md). A round closes when all
sampled clients answered, or at its deadline with at least ``min_clients`` answers; otherwise it is
re-issued (new deadline, answers kept, the sample topped up) until ``max_round_attempts`` is spent
and the run fails.

A round can never wedge: an update is admitted only within the magnitudes an honest client can
produce (coordinator/admission.py); the server step's output is checked before it is saved, and a
contribution that breaks it is left out (listed in the round's ``rejected``); a step that fails
even so fails the run with the reason in its ``error``. Any other error while closing is retried by
the deadline checker at most ``MAX_CLOSE_FAILURES`` times, then the run fails with that reason.

The caller holds the engine's lock; every state change is one store transaction, and the in-memory
cache moves on only after it committed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from coordinator.admission import admit_update
from coordinator.aggregators import AggregationError, Outcome, server_step
from coordinator.cache import RunCache
from coordinator.errors import Conflict, NotFound
from coordinator.es_state import EIGEN_CACHE
from coordinator.sampling import sample_clients, sample_size
from coordinator.store import ClosedRound, NewUpdate, RoundRow, Store
from protos import ClientUpdate, RunConfig, UpdateAck

log = logging.getLogger(__name__)

CloseResult = Literal["closed", "reissued", "failed", "open"]
MAX_CLOSE_FAILURES = 3


class RoundHooks(Protocol):
    def update_accepted(self, duplicate: bool, bytes_in: int) -> None: ...

    def round_closed(self, result: CloseResult, seconds: float | None) -> None: ...


@dataclass
class UpdateResult:
    body: bytes  # the UpdateAck as sent
    completes: bool


class Rounds:
    def __init__(
        self, *, store: Store, runs: RunCache, clock: Callable[[], float], hooks: RoundHooks
    ) -> None:
        self.store = store
        self.runs = runs
        self.clock = clock
        self.hooks = hooks
        self._failures: dict[tuple[str, int], int] = {}
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-eigh")

    def shutdown(self) -> None:
        self._background.shutdown(wait=True, cancel_futures=True)

    def wait_background(self) -> None:
        self._background.submit(lambda: None).result()

    # ----- opening -----
    def open(
        self, run_id: str, round_: int, attempt: int, keep: list[str], now: float, sigma: float
    ) -> list[str]:
        """Attempt ``attempt`` of round ``round_`` (inside the caller's transaction): draw the
        sample (keeping ``keep``, who already answered) and set the deadline."""
        config = self.runs.config(run_id)
        pool = self.store.enrolled(run_id)
        size = sample_size(config.frac, len(pool))
        sampled = sample_clients(pool, size, config.seed, round_, attempt, keep)
        deadline = now + config.round_timeout_s
        if attempt == 1:
            self.store.open_round(run_id, round_, sampled, now, deadline, sigma)
        else:
            self.store.reissue_round(run_id, round_, attempt, sampled, deadline)
        return sampled

    def prepare_next(self, run_id: str) -> None:
        """Start the decomposition the next aggregation will need in the background, if any."""
        run = self.store.run(run_id)
        if run is None or run.state != "running":
            return
        idx, state = self.runs.state(run_id)
        rnd = self.store.round(run_id, idx)
        expected = len(rnd.sampled) if rnd is not None else 2
        matrix = self.runs.aggregator(run_id).pending_decomposition(state, expected)
        if matrix is not None:
            self._background.submit(EIGEN_CACHE.precompute, run_id, matrix)

    # ----- updates -----
    def accept(
        self, client_id: str, run_id: str, round_: int, update: ClientUpdate, bytes_in: int
    ) -> UpdateResult:
        with self.store.transaction():
            run = self.store.run(run_id)
            if run is None:
                raise NotFound(f"unknown run {run_id}")
            if run.state == "created" or round_ < 0 or round_ > run.round:
                raise NotFound(f"run {run_id} has no round {round_} (the current round is {run.round})")
            rnd = self.store.round(run_id, round_)
            if rnd is None:
                raise NotFound(f"run {run_id} has no round {round_}")
            closed = rnd.state == "closed" or run.state != "running"
            if self.store.has_update(run_id, round_, client_id):
                ack = UpdateAck(accepted=True, duplicate=True, round=round_, round_closed=closed)
                self.hooks.update_accepted(True, bytes_in)
                return UpdateResult(ack.model_dump_json().encode(), completes=False)
            if run.state == "failed":
                raise Conflict(f"run {run_id} failed: {run.error}")
            if closed:
                raise Conflict(f"round {round_} of run {run_id} is closed; late updates are not applied")
            if client_id not in rnd.sampled:
                raise Conflict(
                    f"client {client_id} was not sampled for round {round_} of run {run_id}; "
                    "ask GET /task for what to do"
                )
            result = self._store_update(client_id, run_id, rnd, update, bytes_in)
        self.hooks.update_accepted(False, bytes_in)
        return result

    def _store_update(
        self, client_id: str, run_id: str, rnd: RoundRow, update: ClientUpdate, bytes_in: int
    ) -> UpdateResult:
        _, state = self.runs.state(run_id)
        aggregator = self.runs.aggregator(run_id)
        mean = admit_update(self.runs.config(run_id), state, update, aggregator.scores_candidates)
        completes = set(rnd.sampled) <= self.store.answered(run_id, rnd.round) | {client_id}
        ack = UpdateAck(accepted=True, duplicate=False, round=rnd.round, round_closed=completes)
        body = ack.model_dump_json().encode()
        stored = NewUpdate(
            mean=mean,
            fitness=update.fitness,
            sigmas=list(update.sigmas),
            mu=update.mu,
            n_samples=update.n_samples,
            losses=update.losses,
            metrics=update.metrics,
            bytes_in=bytes_in,
            ack_bytes=len(body),
        )
        self.store.add_update(run_id, rnd.round, client_id, stored, self.clock())
        self.store.add_traffic(run_id, rnd.round, client_id, bytes_in, len(body))
        m = update.metrics
        if m.val_loss is not None:  # the site's validation of state round_ (what it received)
            self.store.add_validation(run_id, rnd.round, client_id, m.val_loss, m.val_accuracy, m.n_val)
        return UpdateResult(body, completes)

    # ----- closing -----
    def close(self, run_id: str, round_: int, at_deadline: bool) -> CloseResult:
        """Close round ``round_`` if it may close now (or re-issue it / fail the run at its deadline)."""
        result, seconds = self._close(run_id, round_, at_deadline)
        if result in ("closed", "reissued"):
            self.prepare_next(run_id)
        if result != "open":
            self._failures.pop((run_id, round_), None)
            self.hooks.round_closed(result, seconds)
        return result

    def _close(self, run_id: str, round_: int, at_deadline: bool) -> tuple[CloseResult, float | None]:
        with self.store.transaction():
            run = self.store.run(run_id)
            rnd = self.store.round(run_id, round_)
            if (
                run is None
                or run.state != "running"
                or run.round != round_
                or rnd is None
                or rnd.state != "open"
            ):
                return "open", None
            config = self.runs.config(run_id)
            now = self.clock()
            updates = self.store.round_updates(run_id, round_)
            answered = [u.client_id for u in updates]
            if not set(rnd.sampled) <= set(answered):
                if not at_deadline or now < rnd.deadline:
                    return "open", None
                if len(answered) < config.min_clients:
                    return self._reissue_or_fail(run_id, config, rnd, answered, now), None
            idx, state = self.runs.state(run_id)
            if idx != round_:
                raise RuntimeError(f"run {run_id}: stored state {idx} does not start round {round_}")
            try:
                outcome = server_step(self.runs.aggregator(run_id), config, state, updates)
            except AggregationError as exc:
                return self._fail(run_id, f"round {round_} could not be aggregated: {exc}", now), None
            self._commit(run_id, config, round_, outcome, now)
        self.runs.advance(run_id, round_ + 1, outcome.state)  # committed: the cache moves on
        EIGEN_CACHE.forget(run_id)
        if outcome.rejected:
            log.warning("run %s: round %d left out %s", run_id, round_, outcome.rejected)
        log.info(
            "run %s: round %d closed with %d update(s) (%d used) in %.1f ms of aggregation",
            run_id, round_, len(updates), len(outcome.used), outcome.seconds * 1e3,
        )  # fmt: skip
        return "closed", outcome.seconds

    def _commit(self, run_id: str, config: RunConfig, round_: int, outcome: Outcome, now: float) -> None:
        new = outcome.state
        self.store.save_state(run_id, round_ + 1, new, now)
        closed = ClosedRound(
            closed_at=now,
            sigma_after=new.sigma,
            server_sigma=outcome.server_sigma,
            mean_norm=float(np.linalg.norm(new.mean)),
            aggregation_seconds=outcome.seconds,
            used=outcome.used,
            clipped=outcome.clipped,
            rejected=outcome.rejected,
        )
        self.store.close_round(run_id, round_, closed)
        if round_ + 1 >= config.rounds:
            self.store.finish_run(run_id, round_ + 1, now)
        else:
            self.open(run_id, round_ + 1, 1, [], now, new.sigma)

    def _reissue_or_fail(
        self, run_id: str, config: RunConfig, rnd: RoundRow, answered: list[str], now: float
    ) -> CloseResult:
        if rnd.attempt >= config.max_round_attempts:
            return self._fail(
                run_id,
                f"round {rnd.round} failed: {len(answered)} answer(s) by its deadline, min_clients is "
                f"{config.min_clients}, after {rnd.attempt} attempt(s) (max_round_attempts)",
                now,
            )
        sampled = self.open(run_id, rnd.round, rnd.attempt + 1, answered, now, rnd.sigma_before)
        log.info(
            "run %s: round %d re-issued (attempt %d, %d answer(s) kept, sample %s)",
            run_id, rnd.round, rnd.attempt + 1, len(answered), sampled,
        )  # fmt: skip
        return "reissued"

    def _fail(self, run_id: str, error: str, now: float) -> CloseResult:
        self.store.fail_run(run_id, error, now)
        log.warning("run %s: %s", run_id, error)
        return "failed"

    # ----- deadlines -----
    def check_due(self) -> list[str]:
        """Close, re-issue or fail every open round that is due; return the runs that changed.
        A round whose closing keeps raising fails its run after MAX_CLOSE_FAILURES tries."""
        changed: list[str] = []
        for run_id, round_ in self.store.due_rounds():
            try:
                result = self.close(run_id, round_, at_deadline=True)
            except Exception as exc:
                log.exception("run %s: closing round %d failed", run_id, round_)
                result = self._count_failure(run_id, round_, exc)
            if result != "open":
                changed.append(run_id)
        return changed

    def _count_failure(self, run_id: str, round_: int, exc: Exception) -> CloseResult:
        tries = self._failures[(run_id, round_)] = self._failures.get((run_id, round_), 0) + 1
        if tries < MAX_CLOSE_FAILURES:
            return "open"
        self._failures.pop((run_id, round_), None)
        error = f"closing round {round_} failed {tries} times: {type(exc).__name__}: {exc}"
        try:
            with self.store.transaction():
                self._fail(run_id, error, self.clock())
        except Exception:
            log.exception("run %s: could not record the failure of round %d", run_id, round_)
            return "open"
        self.hooks.round_closed("failed", None)
        return "failed"
