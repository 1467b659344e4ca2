"""The coordinator's facade: identity, runs, enrolment, tasks, evaluations and the prompt, over the
store (all SQL), the run cache and the round lifecycle (coordinator/rounds.py).

Every method is synchronous and runs under one lock (the app calls them from worker threads), and
every state change is one SQLite transaction committed before the method returns, so an HTTP answer
is only ever sent for what is on disk:
- accepting an update is one transaction (the update, its byte counts, its validation);
- closing a round is another: aggregation, the new global state, the round's record and the next
  round's opening (or the run's end) commit together or not at all.
A crash between the two leaves a round with all its answers in and still open; the deadline checker
(also run at startup) closes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from coordinator import auth, records
from coordinator.aggregators import make_aggregator
from coordinator.cache import RunCache
from coordinator.errors import BadRequest, Conflict, NotFound
from coordinator.rounds import CloseResult, Rounds, UpdateResult
from coordinator.sampling import client_seed, evaluates
from coordinator.settings import CoordinatorSettings
from coordinator.store import RunRow, Store, select_state
from protos import (
    Array,
    ClientSummary,
    ClientUpdate,
    EnrolResponse,
    EvalReport,
    PromptChoice,
    PromptResponse,
    RoundRecord,
    RunConfig,
    RunInfo,
    Task,
    UpdateAck,
)

__all__ = ["CloseResult", "Engine", "EngineHooks", "TaskAnswer", "UpdateResult"]


@dataclass
class TaskAnswer:
    """A task as the client will receive it: the JSON body (counted for the round's bytes)."""

    kind: str
    body: bytes


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
        self.runs = RunCache(store)
        self.rounds_ = Rounds(store=store, runs=self.runs, clock=clock, hooks=self.hooks)

    def wait_background(self) -> None:
        """Block until the background decompositions submitted so far are done (tests, benchmarks)."""
        self.rounds_.wait_background()

    def close(self) -> None:
        """Stop background work and close the database once no call is using it (a worker thread
        may still be finishing a call whose request was cancelled)."""
        self.rounds_.shutdown()
        with self.lock:
            self.store.close()

    # ----- identity -----
    def principal(self, token: str) -> auth.Principal | None:
        if auth.is_admin_token(token, self._admin_token()):
            return auth.Principal(kind="admin")
        # Looked up by its SHA-256 digest: what the lookup's timing could leak is about the digest,
        # which says nothing about other tokens.
        with self.lock:
            row = self.store.client_by_token(auth.token_digest(token))
        if row is None:
            return None
        return auth.Principal(kind="client", client_id=row.client_id, run_id=row.run_id, name=row.name)

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
        state = make_aggregator(config).initial_state()
        with self.lock:
            with self.store.transaction():
                self.store.add_run(run_id, config.model_dump_json(), now)
                self.store.save_state(run_id, 0, state, now)
            self.runs.add(run_id, config, state)
        return run_id

    def config(self, run_id: str) -> RunConfig:
        with self.lock:
            return self.runs.config(run_id)

    def _run(self, run_id: str) -> RunRow:
        row = self.store.run(run_id)
        if row is None:
            raise NotFound(f"unknown run {run_id}")
        return row

    def run_ids(self) -> list[str]:
        with self.lock:
            return self.store.run_ids()

    def run_info(self, run_id: str) -> RunInfo:
        with self.lock:
            return records.run_info(self.store, self._run(run_id), self.runs.config(run_id))

    def rounds(self, run_id: str) -> list[RoundRecord]:
        with self.lock:
            finished = self._run(run_id).state == "finished"
            return records.round_records(self.store, run_id, self.runs.config(run_id), finished)

    def clients(self, run_id: str) -> list[ClientSummary]:
        with self.lock:
            self._run(run_id)
            return records.client_summaries(self.store, run_id)

    def enrol(self, run_id: str, name: str) -> EnrolResponse:
        token = auth.new_token()
        client_id = auth.new_id("client")
        with self.lock, self.store.transaction():
            run = self._run(run_id)
            if run.state in ("finished", "failed"):
                raise Conflict(f"run {run_id} is {run.state}; it takes no new clients")
            if self.store.has_client(run_id, name):
                raise Conflict(f"a client named {name!r} is already enrolled in run {run_id}")
            self.store.add_client(client_id, run_id, name, auth.token_digest(token), self.clock())
        return EnrolResponse(client_id=client_id, token=token)

    def start(self, run_id: str) -> RunInfo:
        with self.lock:
            with self.store.transaction():
                run = self._run(run_id)
                if run.state != "created":
                    raise Conflict(f"run {run_id} was already started (it is {run.state})")
                if not self.store.enrolled(run_id):
                    raise Conflict(
                        f"run {run_id} has no enrolled clients; enrol at least one before starting"
                    )
                now = self.clock()
                _, state = self.runs.state(run_id)
                self.store.mark_running(run_id, now)
                self.rounds_.open(run_id, 0, 1, [], now, state.sigma)
            self.rounds_.prepare_next(run_id)
            return self.run_info(run_id)

    # ----- rounds -----
    def close_round(self, run_id: str, round_: int, at_deadline: bool) -> CloseResult:
        """Close round ``round_`` if it may close now (or re-issue it / fail the run at its deadline)."""
        with self.lock:
            return self.rounds_.close(run_id, round_, at_deadline)

    def check_rounds(self) -> list[str]:
        """Close, re-issue or fail every open round that is due; return the runs that changed.
        Runs periodically and at startup (which also closes rounds a crash left complete but open)."""
        with self.lock:
            return self.rounds_.check_due()

    def resume(self) -> list[str]:
        """At startup: settle open rounds and start the background decompositions."""
        changed = self.check_rounds()
        with self.lock:
            for run_id in self.store.run_ids():
                self.rounds_.prepare_next(run_id)
        return changed

    def accept_update(
        self, principal: auth.Principal, run_id: str, round_: int, update: ClientUpdate, bytes_in: int
    ) -> UpdateResult:
        auth.require_client(principal, run_id)
        assert principal.client_id is not None
        with self.lock:
            return self.rounds_.accept(principal.client_id, run_id, round_, update, bytes_in)

    # ----- tasks -----
    def task(self, principal: auth.Principal, run_id: str) -> TaskAnswer:
        auth.require_client(principal, run_id)
        assert principal.client_id is not None
        with self.lock:
            run = self._run(run_id)
            config = self.runs.config(run_id)
            retry = self.settings.retry_after_s
            if run.state == "failed":
                raise Conflict(f"run {run_id} failed: {run.error}")
            if run.state == "created":
                return self._answer(Task(kind="wait", retry_after_s=retry))
            if run.state == "finished":
                idx, _ = self.runs.state(run_id)
                payload = self.runs.payload(run_id)
                done = Task(
                    kind="done", round=idx, state=payload, config=config, evaluate=True, retry_after_s=retry
                )
                return self._answer(done)
            return self._train_task(principal, run, config)

    def _train_task(self, principal: auth.Principal, run: RunRow, config: RunConfig) -> TaskAnswer:
        client_id = principal.client_id or ""
        round_ = run.round
        retry = self.settings.retry_after_s
        rnd = self.store.round(run.run_id, round_)
        if (
            rnd is None
            or client_id not in rnd.sampled
            or self.store.has_update(run.run_id, round_, client_id)
        ):
            return self._answer(Task(kind="wait", round=round_, retry_after_s=retry))
        task = Task(
            kind="train",
            round=round_,
            state=self.runs.payload(run.run_id),
            config=config,
            # Keyed on the client's name, not its random id, so a rerun draws the same seeds.
            client_seed=client_seed(config.client_seeds, config.seed, round_, principal.name or client_id),
            evaluate=evaluates(config.eval_every, round_),
            deadline=rnd.deadline,
            retry_after_s=retry,
        )
        answer = self._answer(task)
        with self.store.transaction():
            self.store.add_traffic(run.run_id, round_, client_id, 0, len(answer.body))
        return answer

    def _answer(self, task: Task) -> TaskAnswer:
        body = task.model_dump_json().encode()
        self.hooks.task_served(task.kind, len(body))
        return TaskAnswer(kind=task.kind, body=body)

    # ----- evaluations of the final state -----
    def record_eval(
        self, principal: auth.Principal, run_id: str, round_: int, report: EvalReport
    ) -> UpdateAck:
        auth.require_client(principal, run_id)
        client_id = principal.client_id or ""
        with self.lock, self.store.transaction():
            run = self._run(run_id)
            last = self.runs.config(run_id).rounds - 1
            if round_ < 0 or round_ > last or (run.state != "finished" and round_ > run.round):
                raise NotFound(f"run {run_id} has no round {round_}")
            if run.state != "finished":
                raise Conflict(
                    f"run {run_id} is {run.state}: evaluations are of the final state, posted after the done task"
                )
            if round_ != last:
                raise Conflict(
                    f"round {round_} is not the last round ({last}); the final state is evaluated as round {last}"
                )
            if self.store.has_final_report(run_id, round_, client_id):
                return UpdateAck(accepted=True, duplicate=True, round=round_, round_closed=True)
            now = self.clock()
            if report.test_accuracy is not None:
                self.store.add_eval(
                    run_id, round_, client_id, report.test_accuracy, report.n_test, report.test_loss, now
                )
            if report.val_loss is not None:  # the final state (round_ + 1) is a selection candidate too
                self.store.add_validation(
                    run_id, round_ + 1, client_id, report.val_loss, report.val_accuracy, report.n_val
                )
            return UpdateAck(accepted=True, duplicate=False, round=round_, round_closed=True)

    # ----- the prompt -----
    def prompt(self, run_id: str, which: str = "selected") -> PromptResponse:
        """The prompt of state ``which``: "selected" (lowest validation loss; the final state where
        no site validated any), "final" (the latest state) or a state index."""
        with self.lock:
            self._run(run_id)
            config = self.runs.config(run_id)
            final_idx, state = self.runs.state(run_id)
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
                mean = stored
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


def _state_index(which: str) -> int:
    if not (which.isascii() and which.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise BadRequest(f"state must be 'selected', 'final' or a state index (0, 1, ...), got {which!r}")
    return int(which)
