"""The grid file of ``fedbpt experiment`` and the cells it expands into.

A cell is one (dataset, partition, method, seed). Methods that do not depend on how the data is
split are run once per dataset and seed (``centralized_bbt``: one site holds all of it) or once
per dataset (``zero_shot``: no training, no randomness). Cells come seed-major, so a grid cut short
holds every method at the first seeds rather than every seed of the first methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

Method = Literal[
    "zero_shot",
    "centralized_bbt",
    "fedbpt",
    "fedbpt_reference",
    "fedbpt_no_perturb",
    "fedavg_bbt",
    "shared_es",
    "fedprompt",
]
METHODS: tuple[Method, ...] = get_args(Method)
LABELS: dict[str, str] = {
    "zero_shot": "zero-shot (no prompt)",
    "centralized_bbt": "centralized BBT (1 site, all data)",
    "fedbpt": "FedBPT",
    "fedbpt_reference": "FedBPT, reference settings",
    "fedbpt_no_perturb": "FedBPT without perturbation",
    "fedavg_bbt": "FedAvg-BBT",
    "shared_es": "shared-population CMA-ES",
    "fedprompt": "FedPrompt (white-box, gradients)",
}
# What each black-box method changes in the run settings.
BLACK_BOX: dict[str, dict[str, Any]] = {
    "centralized_bbt": {"aggregator": "cmaes", "perturb": False},
    "fedbpt": {"aggregator": "cmaes", "perturb": True},
    # The paper's algorithm as the reference code runs it: BBT's placeholder p0, no validation split
    # (every example trains; the run hands out its final state), pycma's rank weights, no sigma bounds.
    "fedbpt_reference": {
        "aggregator": "cmaes",
        "perturb": True,
        "projection": {"init": "placeholder"},
        "val_share": 0.0,
        "server_weights": "rank",
        "sigma_floor": None,
        "sigma_ceiling": None,
    },
    "fedbpt_no_perturb": {"aggregator": "cmaes", "perturb": False},
    "fedavg_bbt": {"aggregator": "fedavg", "perturb": False},
    # One server ES whose candidates every site scores: no local search, so nothing to perturb.
    "shared_es": {"aggregator": "shared_es", "perturb": False},
}
# Methods whose round is one generation: their rounds and eval_every are the grid's times
# local_iters, so they query the model as often as FedBPT's rounds of local_iters generations.
ONE_GENERATION_PER_ROUND = frozenset({"shared_es"})
SPLIT_FREE = ("zero_shot", "centralized_bbt")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetEntry(_Strict):
    data: str = Field(description="folder (relative to --data) with train/test files, or hf:NAME")
    run: dict[str, Any] = Field(default_factory=dict, description="RunConfig fields for this dataset")
    test_split: str = "test"
    text_column: str = Field(default="text", description="the text column (hf:glue/sst2: sentence)")
    k_shot: int | None = Field(default=None, ge=1, description="overrides the grid's k_shot for this entry")
    round_test_limit: int | None = Field(
        default=None,
        ge=1,
        description="score each round's global state on a fixed sample of this many test examples "
        "(the curve and best-by-test); the selected and final prompts are scored on the whole test set",
    )


class WhiteBox(_Strict):
    """The gradient baseline: each client runs ``local_steps`` full-batch Adam steps on the soft
    prompt (L x hidden) from the global one; the server averages the prompts (FedAvg)."""

    lr: float = Field(default=0.01, gt=0)
    local_steps: int = Field(default=8, ge=1)
    memory_check: bool = Field(default=True, description="measure one white-box client's peak RSS")


class Grid(_Strict):
    name: str = "results"
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    clients: int = Field(default=10, ge=1)
    k_shot: int = Field(default=40, ge=1, description="training examples per class, whole federation")
    partitions: list[float | Literal["iid"]] = Field(default=["iid", 1.0, 0.5], min_length=1)
    methods: list[Method] = Field(default=list(METHODS), min_length=1)
    run: dict[str, Any] = Field(default_factory=dict, description="RunConfig fields for every run")
    datasets: dict[str, DatasetEntry] = Field(min_length=1)
    whitebox: WhiteBox = Field(default_factory=WhiteBox)
    service: dict[str, str] = Field(
        default_factory=dict, description="settings of the one inference service (FEDBPT_* names)"
    )
    # Hand-written parts of the document and other studies shown in it (paths relative to the grid file).
    preface: str | None = Field(default=None, description="markdown put before the tables")
    discussion: str | None = Field(default=None, description="markdown put after the tables")
    data_size: str | None = Field(
        default=None, description="records folder of a shots study (experiments/data_size.yaml) to plot"
    )
    communication: str | None = Field(
        default=None,
        description="records folder of a covariance-forms study (experiments/communication/grid.yaml) to tabulate",
    )

    @field_validator("partitions")
    @classmethod
    def _alphas(cls, v: list[float | str]) -> list[float | str]:
        for p in v:
            if p != "iid" and (not isinstance(p, float) or p <= 0):
                raise ValueError(f"a partition is 'iid' or a Dirichlet alpha > 0, not {p!r}")
        return v


class Cell(BaseModel):
    model_config = ConfigDict(frozen=True)

    dataset: str
    partition: str  # "iid", "dir1.0", "dir0.5", or "all" (split-free methods)
    method: Method
    seed: int | None

    @property
    def key(self) -> str:
        seed = "any" if self.seed is None else str(self.seed)
        return f"{self.dataset}__{self.partition}__{self.method}__seed{seed}"

    @property
    def alpha(self) -> float | None:
        return float(self.partition[3:]) if self.partition.startswith("dir") else None


def partition_name(p: float | str) -> str:
    return "iid" if p == "iid" else f"dir{float(p)}"


def cells(grid: Grid) -> list[Cell]:
    out: list[Cell] = []
    if "zero_shot" in grid.methods:
        out += [Cell(dataset=d, partition="all", method="zero_shot", seed=None) for d in grid.datasets]
    for seed in grid.seeds:
        for dataset in grid.datasets:
            if "centralized_bbt" in grid.methods:
                out.append(Cell(dataset=dataset, partition="all", method="centralized_bbt", seed=seed))
            for p in grid.partitions:
                for method in grid.methods:
                    if method not in SPLIT_FREE:
                        out.append(
                            Cell(dataset=dataset, partition=partition_name(p), method=method, seed=seed)
                        )
    return out


def load_grid(path: Path) -> Grid:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the grid file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the grid file must be a mapping")
    return Grid.model_validate(raw)
