"""``RunConfig``: every hyperparameter of one federated run, stored with the run.

Every field has a default, so ``POST /v1/runs`` with ``{}`` creates a run with the defaults of
ALGORITHM.md (the reference job). Where paper and reference differ, the reference is the default
and the paper's variant is an option. Three defaults were changed by measurement (docs/results.md,
docs/design.md), each with the reference one value away: ``projection.init`` ("placeholder": BBT's
placeholders), ``val_share`` (0: no validation, the final state is handed out) and
``server_weights`` (rank).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from protos.covariance import CovarianceForm
from protos.scoring import ProjectionSpec, Strict


class RunConfig(Strict):
    name: str = Field(default="", max_length=200)

    # Federation and rounds.
    rounds: int = Field(default=200, ge=1, le=100_000)
    frac: float = Field(default=1.0, gt=0, le=1, description="share of enrolled clients sampled per round")
    min_clients: int = Field(default=1, ge=1, description="answers needed to close a round at its deadline")
    round_timeout_s: float = Field(default=1800.0, gt=0, le=7 * 24 * 3600)
    max_round_attempts: int = Field(
        default=5,
        ge=1,
        description="a round re-issued this many times without min_clients answers fails the run",
    )
    seed: int = Field(default=1234, ge=0, le=2**32 - 1)

    # Prompt parameterisation and task.
    projection: ProjectionSpec = Field(default_factory=ProjectionSpec)
    task: str = Field(default="sst2", description="task preset: sst2 | yelp_polarity | ag_news")
    template: str | None = Field(default=None, description="overrides the preset's template")
    labels: list[str] | None = Field(default=None, description="overrides the preset's label words/anchors")
    max_input_tokens: int = Field(default=256, ge=1, le=8192, description="inputs are truncated to this")

    # Local (client) CMA-ES.
    local_popsize: int = Field(default=5, ge=2, le=1000)
    local_iters: int = Field(default=8, ge=1, le=10_000)
    client_seeds: Literal["shared", "per_client"] = Field(
        default="shared", description="shared: the reference's one seed for all clients and rounds"
    )
    loss: Literal["ce", "hinge"] = "ce"
    perturb: bool = True
    perturb_rate: float = Field(default=0.5, ge=0, le=1)
    perturb_scope: Literal["input", "all"] = Field(
        default="input", description="input: only input-text tokens; all: every position (the reference)"
    )

    # Server aggregation.
    aggregator: Literal["cmaes", "fedavg", "shared_es"] = Field(
        default="cmaes",
        description="cmaes: FedBPT's server CMA-ES over the sites' local searches (the reference); "
        "fedavg: FedAvg-BBT; shared_es: one server CMA-ES whose candidates every site scores "
        "(a round is one generation: rounds counts generations, local_iters and perturb are unused)",
    )
    server_sigma: Literal["reference", "paper"] = Field(
        default="reference",
        description="reference: sqrt(sum sigma^2/(M*mu)); paper: Eq. 6 over the best half",
    )
    sigma_floor: float | None = Field(default=None, gt=0, description="lower bound of the clients' sigma")
    sigma_ceiling: float | None = Field(default=None, gt=0, description="upper bound of the clients' sigma")
    server_weights: Literal["rank", "samples", "equal"] = Field(
        default="samples",
        description="how the server ES weighs the M local means: samples (in proportion to n_samples; "
        "measured stabler under label skew, docs/results.md), rank (pycma's rank weights over the "
        "clients' fitnesses: the reference), equal (1/M each)",
    )
    covariance: CovarianceForm = Field(
        default="full",
        description="what the task carries of the server's C: full (d x d), diagonal (d), lowrank "
        "(covariance_rank eigen-directions + the mean of the rest) or identity (nothing); "
        "protos/covariance.py, docs/design.md",
    )
    covariance_rank: int = Field(default=8, ge=1, description="k of covariance: lowrank (k < d)")
    covariance_dtype: Literal["float32", "float64"] = "float32"
    mean_dtype: Literal["float64", "float32"] = Field(
        default="float64",
        description="the global mean's (and shared_es's candidates') dtype in a task: float64 (exact; the server's own) or float32 "
        "(half the bytes: 2.7 KB instead of 5.3 KB at d = 500; the clients search around a mean "
        "rounded by ~1e-7 of its size)",
    )
    fedavg_sigma: float | None = Field(default=None, gt=0, description="fixed sigma of fedavg (None: sigma0)")
    robust: Literal["off", "clip", "reject"] = Field(
        default="off", description="guard against updates moving more than robust_multiple*sigma*sqrt(d)"
    )
    robust_multiple: float = Field(default=3.0, gt=0)

    # Evaluation of the global prompt on the clients' test splits.
    eval_every: int = Field(default=1, ge=0, description="0: only the final prompt is evaluated")

    # Federated validation and prompt selection (docs/coordinator.md, "Selection").
    val_share: float = Field(
        default=0.25,
        ge=0,
        lt=1,
        description="share of each site's examples held out to validate every global state (0: none); "
        "the run hands out the state with the lowest validation loss",
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.labels is not None and (len(self.labels) < 1 or any(not x.strip() for x in self.labels)):
            raise ValueError("labels, when given, must be a non-empty list of non-empty strings")
        if self.template is not None and self.template.count("{input}") != 1:
            raise ValueError("template, when given, must contain {input} exactly once")
        if self.aggregator == "shared_es" and self.local_popsize < 3:
            raise ValueError(
                "aggregator shared_es needs local_popsize >= 3 (the candidates per generation; "
                "pycma updates from at least 3)"
            )
        if self.covariance == "lowrank" and self.covariance_rank >= self.dim:
            raise ValueError(
                f"covariance_rank {self.covariance_rank} must be below intrinsic_dim {self.dim} "
                "(or use covariance: full)"
            )
        return self

    @property
    def dim(self) -> int:
        return self.projection.intrinsic_dim

    @property
    def searches_locally(self) -> bool:
        """Whether a client runs a local CMA-ES each round (False: it scores the server's
        candidates, ``shared_es``; no local generations, no perturbed copy)."""
        return self.aggregator != "shared_es"
