"""Wire schemas of the coordinator: runs, enrolment, tasks, updates, round records, the prompt."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from protos.arrays import Array
from protos.covariance import LowRankCovariance
from protos.run_config import RunConfig
from protos.scoring import ProjectionSpec, Strict

RunState = Literal["created", "running", "finished", "failed"]
TaskKind = Literal["wait", "train", "done"]


class RunCreated(Strict):
    run_id: str


class EnrolRequest(Strict):
    name: str = Field(min_length=1, max_length=200)


class EnrolResponse(Strict):
    client_id: str
    token: str


class ClientIdentity(Strict):
    """``GET /v1/whoami`` (client bearer): the run and client a token belongs to, so a client
    needs only its token and the coordinator's URL."""

    client_id: str
    run_id: str
    name: str


class RunInfo(Strict):
    run_id: str
    state: RunState
    round: int = Field(description="the round now open (or the number of rounds done when finished)")
    config: RunConfig
    created_at: float
    clients: int = 0
    rounds_completed: int = 0
    best_accuracy: float | None = Field(
        default=None, description="best test accuracy seen (test data picks it)"
    )
    final_accuracy: float | None = None
    selected_state: int | None = Field(
        default=None, description="the state GET /prompt hands out: lowest validation loss (None: none yet)"
    )
    selected_val_loss: float | None = None
    error: str | None = None


class GlobalState(Strict):
    """The global search distribution handed to clients: N(mean, sigma^2 C).

    ``cov`` is the d x d matrix, or its diagonal [d] (``covariance: diagonal``), or null; with
    ``covariance: lowrank`` it is null and ``cov_lowrank`` carries C (protos/covariance.py). Both
    null: C = I.

    ``candidates`` ([lambda, d]; ``aggregator: shared_es`` only): the points to score instead of
    searching; the client answers one loss per candidate (``ClientUpdate.losses``).
    """

    mean: Array
    sigma: float = Field(gt=0)
    cov: Array | None = None
    cov_lowrank: LowRankCovariance | None = None
    candidates: Array | None = None

    @model_validator(mode="after")
    def _one_covariance(self) -> GlobalState:
        if self.cov is not None and self.cov_lowrank is not None:
            raise ValueError("a global state carries cov or cov_lowrank, not both")
        return self


class Task(Strict):
    """``GET /v1/runs/{id}/task``: what a client should do now."""

    kind: TaskKind
    round: int | None = None
    state: GlobalState | None = None
    config: RunConfig | None = None
    client_seed: int | None = None
    evaluate: bool = Field(default=False, description="score the received global mean on the test split")
    deadline: float | None = Field(default=None, description="unix time the round closes")
    retry_after_s: float = 1.0


class ClientMetrics(Strict):
    """What a client reports for monitoring; none of it enters the aggregation."""

    train_loss: float | None = None
    train_accuracy: float | None = None
    test_accuracy: float | None = None
    test_loss: float | None = None
    n_test: int = 0
    val_loss: float | None = Field(
        default=None, description="the received global state's loss on the site's validation split"
    )
    val_accuracy: float | None = None
    n_val: int = Field(default=0, description="validation examples behind val_loss (0: none held out)")
    service_calls: int = 0
    service_rows: int = 0
    service_bytes_sent: int = 0
    service_bytes_received: int = 0
    seconds: float = 0.0


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class ClientUpdate(Strict):
    """``POST /v1/runs/{id}/rounds/{r}/updates``: one client's result of round r (ALGORITHM.md)."""

    mean: Array = Field(description="final local mean [d]")
    fitness: float = Field(description="local objective at the final mean")
    sigmas: list[float] = Field(min_length=1, max_length=100_000, description="local sigma per generation")
    mu: int = Field(ge=1, description="the local ES's parent number floor(lambda/2)")
    n_samples: int = Field(ge=1)
    metrics: ClientMetrics = Field(default_factory=ClientMetrics)
    losses: list[float] | None = Field(
        default=None,
        max_length=10_000,
        description="shared_es: the mean training loss of each candidate of the task, in order "
        "(mean: the received global mean; sigmas: [its sigma]; mu: 1); null otherwise",
    )

    @field_validator("losses")
    @classmethod
    def _losses_finite(cls, v: list[float] | None) -> list[float] | None:
        for x in v or ():
            _finite(x, "losses")
        return v

    @field_validator("fitness")
    @classmethod
    def _fitness_finite(cls, v: float) -> float:
        return _finite(v, "fitness")

    @field_validator("sigmas")
    @classmethod
    def _sigmas_positive(cls, v: list[float]) -> list[float]:
        for s in v:
            if not math.isfinite(s) or s <= 0:
                raise ValueError(f"sigmas must be finite and positive, got {s}")
        return v


class UpdateAck(Strict):
    accepted: bool
    duplicate: bool = False
    round: int
    round_closed: bool = False


class EvalReport(Strict):
    """Evaluation of the final (``done``) state: ``POST /v1/runs/{id}/rounds/{r}/eval``, r the last
    round. Test metrics (a site with a test split), validation metrics (a site with a validation
    split: the final state is a selection candidate too), or both."""

    test_accuracy: float | None = Field(default=None, ge=0, le=1)
    n_test: int = Field(default=0, ge=0)
    test_loss: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = Field(default=None, ge=0, le=1)
    n_val: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> EvalReport:
        if (self.test_accuracy is None) != (self.n_test == 0):
            raise ValueError("test_accuracy and n_test >= 1 go together")
        if (self.val_loss is None) != (self.n_val == 0):
            raise ValueError("val_loss and n_val >= 1 go together")
        if self.n_test == 0 and self.n_val == 0:
            raise ValueError("an evaluation reports test metrics, validation metrics or both")
        for name in ("test_loss", "val_loss"):
            value = getattr(self, name)
            if value is not None:
                _finite(value, name)
        return self


class ParticipantRecord(Strict):
    client_id: str
    name: str
    fitness: float
    n_samples: int
    metrics: ClientMetrics
    bytes_in: int = 0
    bytes_out: int = 0
    clipped: bool = False
    rejected: bool = False


class RoundRecord(Strict):
    """One round as the coordinator saw it. Round r starts from global state r and produces r+1."""

    round: int
    state: Literal["open", "closed"]
    attempt: int = 1
    sampled: list[str] = Field(default_factory=list)
    participants: list[ParticipantRecord] = Field(default_factory=list)
    sigma_before: float | None = Field(default=None, description="client sigma sent with the round's task")
    sigma_after: float | None = Field(default=None, description="client sigma of the next round")
    server_sigma: float | None = Field(default=None, description="sigma' used for the server update")
    mean_norm: float | None = Field(default=None, description="|| mean || after the round")
    train_loss: float | None = None
    test_accuracy: float | None = Field(
        default=None, description="accuracy of global state r (start of round)"
    )
    final_test_accuracy: float | None = Field(
        default=None, description="accuracy of state r+1, last round only"
    )
    val_loss: float | None = Field(
        default=None, description="validation loss of global state r (start of round), weighted by n_val"
    )
    val_accuracy: float | None = None
    n_val: int = 0
    final_val_loss: float | None = Field(
        default=None, description="validation loss of state r+1, last round only"
    )
    bytes_in: int = 0
    bytes_out: int = 0
    opened_at: float | None = None
    closed_at: float | None = None
    aggregation_seconds: float | None = None


class ClientSummary(Strict):
    """``GET /v1/runs/{id}/clients`` (admin): one enrolled site as the coordinator has seen it."""

    client_id: str
    name: str
    enrolled_at: float
    last_seen: float | None = Field(default=None, description="last update or evaluation received")
    rounds_contributed: int = 0
    last_round: int | None = None
    test_accuracy: float | None = Field(default=None, description="the latest accuracy it reported")
    train_loss: float | None = Field(default=None, description="its train loss in its latest round")


PromptChoice = Literal["selected", "final", "state"]


class PromptResponse(Strict):
    """``GET /v1/runs/{id}/prompt[?state=selected|final|N]``: all that is needed to use a tuned
    prompt with the service. ``selected`` (the default) is the state with the lowest validation
    loss the sites reported (the final state where none was reported); test data never chooses."""

    z: Array
    projection: ProjectionSpec
    round: int = Field(description="number of aggregated rounds behind z (the state's index)")
    chosen: PromptChoice = "final"
    val_loss: float | None = Field(default=None, description="the state's validation loss, if reported")
    task: str
    template: str | None = None
    labels: list[str] | None = None
