"""The site loop: ask the coordinator for a task, train or wait or finish, upload.

- ``wait``: sleep ``retry_after_s``, ask again (the GET itself long-polls).
- ``train``: (evaluate the received global mean on the test split when asked, before training, as
  the reference does), score it on the site's validation split (held out of its examples,
  ``RunConfig.val_share``; every round: the coordinator selects the prompt by it), make the
  round's perturbed copy, run the local CMA-ES on the rest, upload the update.
- ``done``: evaluate the final global prompt on the test split and the validation split (where the
  site has them), report both to ``/v1/runs/{run}/rounds/{last_round}/eval``, return.

A restarted client simply asks for its task again and picks the round up. A 409 for a late update
is logged and the loop goes on. An update already sent is re-sent (not retrained) if the same round
and state come back, e.g. when the acknowledgement was lost: the coordinator answers a repeat as
accepted and changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fed_clients.coordinator_api import CoordinatorService
from fed_clients.data import LabeledTexts
from fed_clients.evaluate import EvalResult, evaluate_prompt
from fed_clients.inputs import EncodedSplit, encode_split, hold_out, input_budget
from fed_clients.model_api import ModelService
from fed_clients.perturb import PerturbedCopy, Perturber
from fed_clients.presets import ResolvedTask, resolve_config
from fed_clients.training import LocalResult, make_score_fn, score_candidates, train_locally
from fed_clients.transport import Conflict, FatalServiceError
from protos import (
    Array,
    ClientMetrics,
    ClientUpdate,
    EvalReport,
    GlobalState,
    ProjectionSpec,
    RunConfig,
    Task,
)

log = logging.getLogger(__name__)


class ClientError(Exception):
    """A problem the client cannot work around (configuration, identity); exits non-zero."""


@dataclass(frozen=True)
class Prepared:
    """The local data encoded for one task resolution (cached across rounds)."""

    task: ResolvedTask
    train: EncodedSplit
    test: EncodedSplit | None
    val: EncodedSplit | None = None  # held out of the site's examples (RunConfig.val_share)


def eval_report(test: EvalResult | None, val: EvalResult | None) -> EvalReport | None:
    """The final state's scores as a site reports them (None: it scored nothing)."""
    if test is None and val is None:
        return None
    return EvalReport(
        test_accuracy=test.accuracy if test else None,
        n_test=test.n if test else 0,
        test_loss=test.loss if test else None,
        val_loss=val.loss if val else None,
        val_accuracy=val.accuracy if val else None,
        n_val=val.n if val else 0,
    )


def state_digest(state: GlobalState) -> str:
    h = hashlib.sha256()
    h.update(state.mean.data.encode())
    h.update(repr(state.sigma).encode())
    if state.cov is not None:
        h.update(state.cov.data.encode())
    if state.cov_lowrank is not None:
        h.update(state.cov_lowrank.model_dump_json().encode())
    if state.candidates is not None:
        h.update(state.candidates.data.encode())
    return h.hexdigest()


class SiteClient:
    def __init__(
        self,
        coordinator: CoordinatorService,
        model: ModelService,
        train: LabeledTexts,
        test: LabeledTexts | None = None,
        run_id: str | None = None,
        poll_wait_s: float = 30.0,
        label_names: Sequence[str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.coordinator = coordinator
        self.model = model
        self.train_data = train
        self.test_data = test
        self.run_id = run_id
        self.client_key = ""
        self.poll_wait_s = poll_wait_s
        self.label_names = list(label_names) if label_names is not None else None
        self.sleep = sleep
        self._prepared: dict[tuple[object, ...], Prepared] = {}
        self._sent: dict[tuple[int, str], ClientUpdate] = {}
        self.rounds_trained: list[int] = []
        self.final_eval: EvalResult | None = None

    # ----- identity -----
    def identify(self) -> str:
        """The run to work on: from ``GET /v1/whoami``, or ``--run-id`` where the coordinator has
        no such route. Also fixes the client key (its name) that seeds the perturbation."""
        try:
            identity = self.coordinator.whoami()
        except FatalServiceError as exc:
            if exc.status not in (404, 405):
                raise
            if self.run_id is None:
                raise ClientError(
                    "the coordinator has no GET /v1/whoami; pass the run id (--run-id or FEDBPT_RUN_ID)"
                ) from None
            # No client id to be had: a one-way digest of the token stands in for it as the
            # perturbation seed's client part (it never leaves this process).
            token = self.coordinator.http.token or ""
            self.client_key = "token:" + hashlib.sha256(token.encode()).hexdigest()
            log.info("coordinator has no /v1/whoami; using run %s", self.run_id)
            return self.run_id
        if self.run_id is not None and self.run_id != identity.run_id:
            raise ClientError(f"this token belongs to run {identity.run_id!r}, not {self.run_id!r}")
        self.run_id = identity.run_id
        # The name (unique in a run), not the random client id: a rerun of the same run with the
        # same site names then perturbs the same tokens (reproducible results).
        self.client_key = identity.name
        log.info("client %s (%s) of run %s", identity.name, identity.client_id, identity.run_id)
        return identity.run_id

    # ----- the loop -----
    def run(self) -> EvalResult | None:
        """Work until the run is done; return the final evaluation (None without test data)."""
        run_id = self.identify()
        info = self.model.info()
        log.info(
            "model %s (%s head, hidden %d, max_rows %d)",
            info.model_id,
            info.head,
            info.hidden_size,
            info.max_rows,
        )
        while True:
            task = self.coordinator.task(run_id, self.poll_wait_s)
            if task.kind == "wait":
                self.sleep(max(0.0, task.retry_after_s))
            elif task.kind == "train":
                self.handle_train(run_id, task)
            else:
                return self.handle_done(run_id, task)

    # ----- train -----
    def handle_train(self, run_id: str, task: Task) -> None:
        if task.round is None or task.state is None or task.config is None:
            raise FatalServiceError("coordinator", f"a train task without round, state or config: {task}")
        key = (task.round, state_digest(task.state))
        if key in self._sent:
            # The same round and state again: the acknowledgement was lost, or the coordinator
            # re-issued the round (a new attempt). The result would be the same (same seeds), so
            # re-send it instead of retraining; a repeat of an accepted update changes nothing.
            log.info("round %d: the same task again; re-sending the update already computed", task.round)
            self._post_update(run_id, task.round, self._sent[key], key)
            self.sleep(max(0.0, task.retry_after_s))
            return
        update = self.train_round(task)
        self._post_update(run_id, task.round, update, key)
        self.rounds_trained.append(task.round)

    def _post_update(self, run_id: str, round_: int, update: ClientUpdate, key: tuple[int, str]) -> None:
        self._sent[key] = update
        try:
            ack = self.coordinator.post_update(run_id, round_, update)
        except Conflict as exc:
            log.warning("round %d: update not accepted (%s); going on to the next task", round_, exc.detail)
            return
        log.info(
            "round %d: update %s%s",
            round_,
            "accepted" if ack.accepted else "not accepted",
            " (duplicate)" if ack.duplicate else "",
        )

    def train_round(self, task: Task) -> ClientUpdate:
        """One round: validate (and evaluate) the received state, then search locally, or score
        the task's candidates (``shared_es``); the update carries the round's metrics."""
        assert task.round is not None and task.state is not None and task.config is not None
        started = time.monotonic()
        before = self.model.traffic.copy()
        prepared = self.prepare(task.config)
        scores = self._score_global_state(task, prepared)
        if task.state.candidates is not None:
            update = self._score_candidates(task, prepared)
        else:
            update = self._search_locally(task, prepared)
        traffic = self.model.traffic.since(before)
        seconds = time.monotonic() - started
        log.info(
            "round %d: fitness %.5g, train loss %.4f, train accuracy %.4f, %d calls, %.1fs",
            task.round,
            update.fitness,
            update.metrics.train_loss,
            update.metrics.train_accuracy,
            traffic.calls,
            seconds,
        )
        metrics = update.metrics.model_copy(
            update={
                **scores,
                "service_calls": traffic.calls,
                "service_rows": traffic.rows,
                "service_bytes_sent": traffic.bytes_sent,
                "service_bytes_received": traffic.bytes_received,
                "seconds": seconds,
            }
        )
        return update.model_copy(update={"metrics": metrics})

    def _search_locally(self, task: Task, prepared: Prepared) -> ClientUpdate:
        """FedBPT's site step: the local CMA-ES from the received state (metrics: train only)."""
        assert task.round is not None and task.state is not None and task.config is not None
        config = task.config
        seed = task.client_seed if task.client_seed is not None else config.seed
        result: LocalResult = train_locally(
            make_score_fn(self.model, prepared.task.spec, config.projection),
            task.state,
            prepared.train.input_ids,
            prepared.train.labels,
            popsize=config.local_popsize,
            iters=config.local_iters,
            seed=seed,
            loss=config.loss,
            perturbed=self._perturbed_inputs(config, prepared, task.round),
        )
        return ClientUpdate(
            mean=Array.from_numpy(result.mean, dtype="float64"),
            fitness=result.fitness,
            sigmas=result.sigmas,
            mu=result.mu,
            n_samples=len(prepared.train),
            metrics=ClientMetrics(train_loss=result.train_loss, train_accuracy=result.train_accuracy),
        )

    def _score_candidates(self, task: Task, prepared: Prepared) -> ClientUpdate:
        """A ``shared_es`` round: the task's candidates scored on the training set, no search. The
        update carries the received mean and sigma unchanged (this site moved nothing)."""
        assert task.state is not None and task.state.candidates is not None and task.config is not None
        scores = score_candidates(
            make_score_fn(self.model, prepared.task.spec, task.config.projection),
            task.state.candidates.numpy(),
            prepared.train.input_ids,
            prepared.train.labels,
            loss=task.config.loss,
        )
        return ClientUpdate(
            mean=Array.from_numpy(task.state.mean.numpy(), dtype="float64"),
            fitness=scores.train_loss,
            sigmas=[task.state.sigma],
            mu=1,
            n_samples=len(prepared.train),
            losses=scores.losses,
            metrics=ClientMetrics(train_loss=scores.train_loss, train_accuracy=scores.train_accuracy),
        )

    def _score_global_state(self, task: Task, prepared: Prepared) -> dict[str, Any]:
        """The received global state on the test split (when the task asks) and on the validation
        split (every round: what selection reads; no training on it), as ``ClientMetrics`` fields."""
        assert task.state is not None and task.config is not None
        mean, projection = task.state.mean.numpy(), task.config.projection
        metrics: dict[str, Any] = {}
        if task.evaluate and prepared.test is not None:
            result = self._evaluate(prepared, mean, projection)
            metrics.update(test_accuracy=result.accuracy, test_loss=result.loss, n_test=result.n)
            log.info("round %d: global mean test accuracy %.4f (n=%d)", task.round, result.accuracy, result.n)
        if prepared.val is not None:
            val = self._evaluate(prepared, mean, projection, prepared.val)
            metrics.update(val_loss=val.loss, val_accuracy=val.accuracy, n_val=val.n)
            log.info("round %d: global mean validation loss %.4f (n=%d)", task.round, val.loss, val.n)
        return metrics

    def _perturbed_inputs(self, config: RunConfig, prepared: Prepared, round_: int) -> PerturbedCopy | None:
        """This round's perturbed copy of the training inputs (None without perturbation), keyed on
        the run seed, the round and the site's key; replacements never draw the model's special or
        mask tokens."""
        if not config.perturb:
            return None
        info = self.model.info()
        specials = set(info.special_token_ids)
        if info.mask_token_id is not None:
            specials.add(info.mask_token_id)
        perturber = Perturber(
            info.vocab_size, tuple(sorted(specials)), config.perturb_rate, config.perturb_scope
        )
        return perturber.copy(prepared.train.input_ids, config.seed, round_, self.client_key)

    # ----- done -----
    def handle_done(self, run_id: str, task: Task) -> EvalResult | None:
        """Score the final state on the test split (if any) and on the validation split (if any:
        the final state is a selection candidate too), report both, return the test result."""
        if self.test_data is None and (task.config is None or task.config.val_share == 0):
            log.info("run %s is done; no test or validation data to evaluate the final prompt on", run_id)
            return None
        z, projection, config, last_round = self._final_prompt(run_id, task)
        prepared = self.prepare(config)
        result = self._evaluate(prepared, z, projection) if prepared.test is not None else None
        val = self._evaluate(prepared, z, projection, prepared.val) if prepared.val is not None else None
        self.final_eval = result
        if result is not None:
            log.info(
                "run %s is done: final prompt test accuracy %.4f (n=%d)", run_id, result.accuracy, result.n
            )
        if last_round < 0:
            log.warning("run %s finished without a round; nothing to report the evaluation to", run_id)
            return result
        report = eval_report(result, val)
        if report is None:
            return None
        try:
            self.coordinator.post_eval(run_id, last_round, report)
        except Conflict as exc:
            log.warning("final evaluation not recorded (%s)", exc.detail)
        return result

    def _final_prompt(self, run_id: str, task: Task) -> tuple[np.ndarray, ProjectionSpec, RunConfig, int]:
        """The final global mean and the last round's number. ``GET /prompt`` is authoritative (its
        ``round`` counts the aggregated rounds, so the last round is round - 1); a done task's own
        state is the fallback where the prompt is not open to clients."""
        try:
            prompt = self.coordinator.prompt(run_id, state="final")
        except FatalServiceError as exc:
            if task.state is None or task.config is None or task.round is None:
                raise
            log.info("GET prompt refused (%s); using the done task's state", exc.status)
            return task.state.mean.numpy(), task.config.projection, task.config, task.round - 1
        config = task.config or RunConfig(
            task=prompt.task, template=prompt.template, labels=prompt.labels, projection=prompt.projection
        )
        return prompt.z.numpy(), prompt.projection, config, prompt.round - 1

    # ----- data -----
    def prepare(self, config: RunConfig) -> Prepared:
        """Resolve the task for the model's head and encode the local splits (once per task)."""
        key = (
            config.task,
            config.template,
            tuple(config.labels or ()),
            config.max_input_tokens,
            config.projection.prompt_length,
            config.val_share,
            config.seed,
        )
        if key not in self._prepared:
            resolved = resolve_config(config, self.model.info().head)
            budget = input_budget(
                self.model, resolved, config.projection.prompt_length, config.max_input_tokens
            )
            examples = encode_split(self.model, self.train_data, resolved, budget, self.label_names)
            train, val = hold_out(examples, config.val_share, config.seed, self.client_key)
            test = (
                None
                if self.test_data is None
                else encode_split(self.model, self.test_data, resolved, budget, self.label_names)
            )
            log.info(
                "task %s: %d train / %d validation / %s test inputs, template %r, labels %s "
                "(inputs cut to %d tokens: %d cut)",
                resolved.name,
                len(train),
                len(val) if val is not None else 0,
                len(test) if test is not None else 0,
                resolved.spec.template,
                resolved.spec.labels,
                budget,
                train.truncated,
            )
            self._prepared[key] = Prepared(resolved, train, test, val)
        return self._prepared[key]

    def _evaluate(
        self, prepared: Prepared, z: np.ndarray, projection: ProjectionSpec, split: EncodedSplit | None = None
    ) -> EvalResult:
        """Score ``z`` on ``split`` (default: the test split)."""
        split = split if split is not None else prepared.test
        assert split is not None
        return evaluate_prompt(self.model, prepared.task.spec, split, z=z, projection=projection)
