"""``FedBPTStrategy``: FedBPT's server side as a Flower Strategy (Flower's message API).

Every decision is the coordinator's own code, so a Flower run and a coordinator run with the same
run config, data and site names reach the same global states (tests/flower):
- the pool is the connected sites in name order, as the coordinator's enrolled clients are; the
  round's sample is ``coordinator.sampling.sample_clients`` (attempt 1) and each site's seed
  ``client_seed`` keyed on its site name (a SuperNode's stable ``site-name``, never Flower's random
  node id), and the task says whether to evaluate (``evaluates``);
- an update is admitted by ``coordinator.admission.admit_update``; the admitted contributions go to
  the server step in site-name order (the coordinator's ``Store.round_updates`` order) through
  ``coordinator.aggregators.server_step``: the ``robust`` screen, the aggregator chosen by
  ``RunConfig.aggregator``, the check of its output and the leave-one-out of a breaking update;
- the prompt handed out is ``coordinator.store.select_state`` over the sites' validations (lowest
  validation loss, the final state where no site validated), written as a ``PromptResponse``.

Round r (fedbpt's numbering, from 0) starts from state r and produces state r+1, whatever Flower's
``server_round`` counter says: a restarted ServerApp starts Flower's counter at 1 again but goes on
from the checkpointed state. After the last round the ``evaluate`` step sends every site the
``done`` task: the sites score the final state on their test and validation splits (the final
state is a selection candidate too, as with the coordinator). Earlier evaluate steps send nothing:
each train task already asks the site to validate (and, every ``eval_every`` rounds, to test) the
state it receives.

What the coordinator has and this strategy has not (docs/flower.md): no deadline re-issue (a round
closes when Flower's ``send_and_receive`` returns; fewer than ``min_clients`` answers stops the run,
which a restart resumes from the checkpoint), no enrolment tokens (Flower's node authentication
admits SuperNodes), no dashboard.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array as FlowerArray
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from coordinator.admission import admit_update
from coordinator.aggregators import Contribution, Outcome, make_aggregator, server_step
from coordinator.errors import BadRequest
from coordinator.records import weighted
from coordinator.sampling import client_seed, evaluates, sample_clients, sample_size
from coordinator.store import Validation, select_state
from flower_app import checkpoint
from flower_app.checkpoint import Progress, RoundSummary, SiteValidation
from flower_app.messages import MessageError, read_eval, read_site, read_update, site_query, task_message
from flower_app.tracking import TAGS, EventWriter, scalars
from protos import Array, ClientUpdate, PromptChoice, PromptResponse, RunConfig, Task

log = logging.getLogger("flower_app.strategy")

PROMPT_FILE = "prompt.json"
FINAL_PROMPT_FILE = "prompt_final.json"
QUERY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Admitted:
    """One site's admitted update: as received, its mean as admission returned it, its size."""

    update: ClientUpdate
    mean: np.ndarray
    size: int

    def contribution(self, site: str) -> Contribution:
        u = self.update
        losses = None if u.losses is None else tuple(u.losses)
        return Contribution(site, self.mean, u.fitness, tuple(u.sigmas), u.mu, u.n_samples, losses)


class RoundFailed(RuntimeError):
    """A round that cannot be closed; the run stops and a restart resumes from the checkpoint."""


class FedBPTStrategy(Strategy):
    """FedBPT's server side on Flower's message API (module docstring). ``run(grid)`` drives a
    whole run (Flower's ``Strategy.start`` for the rounds still to do, then the final evaluation);
    ``sleep`` and ``clock`` only pace the wait for the sites to connect."""

    def __init__(
        self,
        *,
        config: RunConfig,
        sites: int,
        checkpoint_dir: Path,
        join_timeout_s: float = 600.0,
        tracker: EventWriter | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.sites = sites
        self.checkpoint_dir = checkpoint_dir
        self.join_timeout_s = join_timeout_s
        self.tracker = tracker
        self.sleep = sleep
        self.clock = clock
        self.aggregator = make_aggregator(config)
        loaded = checkpoint.load(checkpoint_dir, config)
        self.resumed = loaded is not None
        self.progress = loaded or Progress.start(config, self.aggregator.initial_state())
        self.names: dict[int, str] = {}  # Flower node id -> site name (asked once per node)
        self._sampled: list[str] = []
        self._bytes_out: dict[str, int] = {}

    # ----- driving a whole run -----
    @property
    def remaining_rounds(self) -> int:
        return self.config.rounds - self.progress.round

    def run(self, grid: Grid) -> None:
        """The rounds still to do (all of them on a fresh start), then the final evaluation."""
        if self.remaining_rounds > 0:
            self.start(
                grid=grid,
                initial_arrays=self.global_arrays(),
                num_rounds=self.remaining_rounds,
                timeout=self.config.round_timeout_s,
            )
        elif not self.progress.final_evaluated:  # restarted after the last round, before its evaluation
            messages = self.configure_evaluate(0, self.global_arrays(), ConfigRecord(), grid)
            self.aggregate_evaluate(0, grid.send_and_receive(messages, timeout=self.config.round_timeout_s))
        log.info("run done: %d rounds; prompt in %s", self.progress.round, self.checkpoint_dir / PROMPT_FILE)

    def summary(self) -> None:
        c = self.config
        log.info(
            "FedBPT on Flower: %d sites, rounds %d (%d done%s), aggregator %s, d=%d, checkpoint %s",
            self.sites, c.rounds, self.progress.round, ", resumed" if self.resumed else "",
            c.aggregator, c.dim, self.checkpoint_dir,
        )  # fmt: skip

    def global_arrays(self) -> ArrayRecord:
        """The latest global mean, for Flower's own bookkeeping (its ``Result``)."""
        return ArrayRecord({"mean": FlowerArray(np.asarray(self.progress.state.mean, dtype=np.float64))})

    # ----- train -----
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        c = self.config
        r = self.progress.round
        sites = self.discover(grid)
        pool = sorted(sites)  # name order, as the coordinator's enrolled clients
        self._sampled = sample_clients(pool, sample_size(c.frac, len(pool)), c.seed, r, 1)
        payload = self.aggregator.payload(self.progress.state)
        messages = []
        self._bytes_out = {}
        for name in self._sampled:
            task = Task(
                kind="train",
                round=r,
                state=payload,
                config=c,
                client_seed=client_seed(c.client_seeds, c.seed, r, name),
                evaluate=evaluates(c.eval_every, r),
            )
            content = task_message(task)
            self._bytes_out[name] = len(task.model_dump_json().encode())
            messages.append(Message(content, dst_node_id=sites[name], message_type=MessageType.TRAIN))
        log.info(
            "round %d (Flower round %d): %d of %d sites sampled", r, server_round, len(messages), len(pool)
        )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        c = self.config
        r = self.progress.round
        state = self.progress.state
        admitted: dict[str, Admitted] = {}
        refused: list[str] = []
        for reply in replies:
            site = self._site_of(reply)
            if site is None or site not in self._sampled:
                continue
            try:
                update, size = read_update(reply.content)
                mean = admit_update(c, state, update, self.aggregator.scores_candidates)
                admitted[site] = Admitted(update, mean, size)
            except (MessageError, BadRequest) as exc:
                log.warning("round %d: the update of %s is refused: %s", r, site, exc)
                refused.append(site)
        if len(admitted) < c.min_clients:
            raise RoundFailed(
                f"round {r}: {len(admitted)} usable update(s) of {len(self._sampled)} sampled, min_clients is "
                f"{c.min_clients}; restart the ServerApp (same checkpoint-dir) to run round {r} again"
            )
        # Site-name order: the order in which the coordinator's store hands a round's updates over.
        contributions = [admitted[site].contribution(site) for site in sorted(admitted)]
        outcome = server_step(self.aggregator, c, state, contributions)
        self._record_validations(r, {site: a.update for site, a in admitted.items()})
        summary = self._summary(r, admitted, outcome, refused)
        self.progress.advance(outcome.state, summary)
        self._save()
        if self.tracker is not None:
            self.tracker.add(r, scalars(summary))
        log.info("round %d closed: %d update(s) used, sigma %.4g", r, len(outcome.used), outcome.state.sigma)
        return self.global_arrays(), MetricRecord(_metrics(summary))

    def _summary(
        self, r: int, admitted: Mapping[str, Admitted], outcome: Outcome, refused: list[str]
    ) -> RoundSummary:
        updates = [a.update for a in admitted.values()]
        return RoundSummary(
            round=r,
            sampled=list(self._sampled),
            used=outcome.used,
            clipped=outcome.clipped,
            rejected=refused + outcome.rejected,
            sigma_before=self.progress.state.sigma,
            sigma_after=outcome.state.sigma,
            server_sigma=outcome.server_sigma,
            mean_norm=float(np.linalg.norm(outcome.state.mean)),
            train_loss=weighted((u.metrics.train_loss, u.n_samples) for u in updates),
            test_accuracy=weighted((u.metrics.test_accuracy, u.metrics.n_test) for u in updates),
            val_loss=weighted((u.metrics.val_loss, u.metrics.n_val) for u in updates),
            bytes_in=sum(a.size for a in admitted.values()),
            bytes_out=sum(self._bytes_out.values()),
            aggregation_seconds=outcome.seconds,
        )

    # ----- evaluate: the final state, after the last round -----
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.progress.round < self.config.rounds:
            return []  # the train tasks validate (and test) the state each site receives
        sites = self.discover(grid)
        task = Task(
            kind="done",
            round=self.progress.round,
            state=self.aggregator.payload(self.progress.state),
            config=self.config,
            evaluate=True,
        )
        return [
            Message(task_message(task), dst_node_id=sites[name], message_type=MessageType.EVALUATE)
            for name in sorted(sites)
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.progress.round < self.config.rounds:
            return None
        final = self.progress.round
        for reply in replies:
            site = self._site_of(reply)
            if site is None:
                continue
            try:
                report = read_eval(reply.content)
            except MessageError as exc:
                log.warning("the final evaluation of %s is refused: %s", site, exc)
                continue
            if report is None:
                continue
            self.progress.final_reports[site] = report
            if report.val_loss is not None:  # the final state is a selection candidate too
                found = SiteValidation(loss=report.val_loss, accuracy=report.val_accuracy, n=report.n_val)
                self.progress.validations.setdefault(final, {})[site] = found
        self.progress.final_evaluated = True
        self._save()
        reports = list(self.progress.final_reports.values())
        metrics: dict[str, MetricRecordValues] = {"sites": len(reports)}
        accuracy = weighted((x.test_accuracy, x.n_test) for x in reports)
        if accuracy is not None:
            metrics["final-test-accuracy"] = accuracy
            if self.tracker is not None:  # at the last round's step, as the coordinator's RoundRecord has it
                self.tracker.add(final - 1, {TAGS["final_test_accuracy"]: accuracy})
        prompt = self.prompt("selected")
        metrics["selected-state"] = prompt.round
        log.info(
            "final state %d evaluated by %d site(s); selected state %d", final, len(reports), prompt.round
        )
        return MetricRecord(metrics)

    # ----- sites -----
    def discover(self, grid: Grid) -> dict[str, int]:
        """{site name: node id} of the connected SuperNodes, once at least ``sites`` are known.
        New nodes are asked their name (a ``query`` message); a restarted SuperNode comes back
        with a new node id and the same name."""
        deadline = self.clock() + self.join_timeout_s
        while True:
            connected = sorted(grid.get_node_ids())
            unknown = [n for n in connected if n not in self.names]
            if unknown:
                self._ask_names(grid, unknown)
            current: dict[str, int] = {}
            for node in connected:
                name = self.names.get(node)
                if name is None:
                    continue
                if name in current:
                    raise RoundFailed(
                        f"two SuperNodes call themselves {name!r} (node ids {current[name]} and {node}); "
                        "give each site its own site-name in --node-config"
                    )
                current[name] = node
            if len(current) >= self.sites:
                return current
            if self.clock() > deadline:
                raise RoundFailed(
                    f"{len(current)} of {self.sites} sites connected after {self.join_timeout_s:g}s "
                    f"({sorted(current)}); start the missing SuperNodes or lower the run config's 'sites'"
                )
            log.info("waiting for sites: %d of %d connected", len(current), self.sites)
            self.sleep(1.0)

    def _ask_names(self, grid: Grid, nodes: list[int]) -> None:
        queries = [Message(site_query(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT_S):
            if reply.has_error():
                log.warning("node %d did not say its site name: %s", reply.metadata.src_node_id, reply.error)
                continue
            self.names[reply.metadata.src_node_id] = read_site(reply.content)

    def _site_of(self, reply: Message) -> str | None:
        site = self.names.get(reply.metadata.src_node_id)
        if reply.has_error():
            log.warning("site %s (node %d) failed: %s", site, reply.metadata.src_node_id, reply.error)
            return None
        return site

    # ----- validation, selection, the prompt -----
    def _record_validations(self, r: int, updates: Mapping[str, ClientUpdate]) -> None:
        for site, update in updates.items():
            m = update.metrics
            if m.val_loss is not None:  # the site's validation of state r (what it received)
                found = SiteValidation(loss=m.val_loss, accuracy=m.val_accuracy, n=m.n_val)
                self.progress.validations.setdefault(r, {})[site] = found

    def validation_by_state(self) -> dict[int, Validation]:
        """Per state: the sites' validation loss and accuracy weighted by their counts (as the
        coordinator's ``Store.validation_by_state``)."""
        out: dict[int, Validation] = {}
        for idx, by_site in sorted(self.progress.validations.items()):
            n = sum(v.n for v in by_site.values())
            loss = sum(v.loss * v.n for v in by_site.values()) / n
            accs = [(v.accuracy, v.n) for v in by_site.values() if v.accuracy is not None]
            accuracy = sum(a * k for a, k in accs) / n if accs else None
            out[idx] = Validation(loss, accuracy, n)
        return out

    def prompt(self, which: str = "selected") -> PromptResponse:
        """The prompt of the selected state (lowest validation loss; the final state where no site
        validated any) or of the final state, as the coordinator's ``GET /prompt`` answers."""
        validations = self.validation_by_state()
        chosen: PromptChoice = "final"
        idx = self.progress.round
        selected = select_state(validations) if which == "selected" else None
        if selected is not None:
            chosen, idx = "selected", selected
        found = validations.get(idx)
        return PromptResponse(
            z=Array.from_numpy(self.progress.means[idx], dtype="float64"),
            projection=self.config.projection,
            round=idx,
            chosen=chosen,
            val_loss=found.loss if found is not None else None,
            task=self.config.task,
            template=self.config.template,
            labels=self.config.labels,
        )

    def _save(self) -> None:
        checkpoint.save(self.checkpoint_dir, self.progress)
        for name, which in ((PROMPT_FILE, "selected"), (FINAL_PROMPT_FILE, "final")):
            body = self.prompt(which).model_dump_json(indent=2).encode()
            checkpoint.write_atomically(self.checkpoint_dir / name, body)


def _metrics(summary: RoundSummary) -> dict[str, MetricRecordValues]:
    """The round's numeric record for Flower's MetricRecord (None left out)."""
    values: dict[str, MetricRecordValues] = {"sampled": len(summary.sampled), "used": len(summary.used)}
    for key, value in summary.model_dump(exclude={"sampled", "used", "clipped", "rejected"}).items():
        if value is not None:
            values[key.replace("_", "-")] = value
    values["rejected"] = len(summary.rejected)
    return values
