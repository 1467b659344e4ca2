"""The strategy's state on disk: one JSON file, rewritten atomically after every round, so a
restarted ServerApp continues where the last one stopped (as the coordinator does from SQLite).

``checkpoint.json`` holds the run config, the index of the latest global state, that state in full
(mean, sigma and pycma's bookkeeping: ``coordinator.es_state.ServerState``, arrays in their memory
layout, because matrix products in another layout round differently), the mean of every earlier
state (selection may hand out any of them), the sites' validations per state, the final
evaluations and one summary per round. Arrays are ``protos.Array`` (float64, base64); numbers are
JSON numbers (Python writes floats so that they read back bit for bit). Never pickle.

The file is written to a temporary name, flushed to disk and renamed over the old one: a crash
leaves either the previous checkpoint or the new one, never half of one. A round whose
aggregation was not checkpointed is run again after a restart, with the same seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from coordinator.es_state import ESCore, ServerState
from protos import Array, EvalReport, RunConfig
from protos.scoring import Strict

CHECKPOINT_FILE = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, or one of another run."""


class SiteValidation(Strict):
    """One site's validation of one global state."""

    loss: float
    accuracy: float | None = None
    n: int = Field(ge=1)


class RoundSummary(Strict):
    """One round as the strategy saw it (Flower logs it; the metrics of the round's MetricRecord)."""

    round: int
    sampled: list[str]
    used: list[str] = Field(default_factory=list)
    clipped: list[str] = Field(default_factory=list)
    rejected: list[str] = Field(default_factory=list)
    sigma_before: float
    sigma_after: float
    server_sigma: float | None = None
    mean_norm: float
    train_loss: float | None = None
    test_accuracy: float | None = None
    val_loss: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    aggregation_seconds: float = 0.0


class StoredArray(Strict):
    array: Array
    order: Literal["C", "F"] = "C"


class StoredState(Strict):
    mean: Array
    sigma: float
    numbers: dict[str, int | float] | None = None
    arrays: dict[str, StoredArray] | None = None


class CheckpointFile(Strict):
    format: Literal["fedbpt-flower-checkpoint/1"] = "fedbpt-flower-checkpoint/1"
    config: RunConfig
    round: int = Field(ge=0, description="index of the latest global state (rounds aggregated)")
    state: StoredState
    means: list[Array] = Field(description="the mean of every state 0..round")
    validations: dict[int, dict[str, SiteValidation]] = Field(default_factory=dict)
    final_reports: dict[str, EvalReport] = Field(default_factory=dict)
    final_evaluated: bool = False
    rounds: list[RoundSummary] = Field(default_factory=list)


@dataclass
class Progress:
    """The strategy's whole state between rounds."""

    config: RunConfig
    round: int
    state: ServerState
    means: list[np.ndarray]
    validations: dict[int, dict[str, SiteValidation]] = field(default_factory=dict)
    final_reports: dict[str, EvalReport] = field(default_factory=dict)
    final_evaluated: bool = False
    rounds: list[RoundSummary] = field(default_factory=list)

    @classmethod
    def start(cls, config: RunConfig, state: ServerState) -> Progress:
        return cls(config=config, round=0, state=state, means=[state.mean.copy()])

    def advance(self, state: ServerState, summary: RoundSummary) -> None:
        self.round += 1
        self.state = state
        self.means.append(state.mean.copy())
        self.rounds.append(summary)


def save(directory: Path, progress: Progress) -> Path:
    """Write the checkpoint atomically (module docstring); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    body = CheckpointFile(
        config=progress.config,
        round=progress.round,
        state=_store_state(progress.state),
        means=[Array.from_numpy(m, dtype="float64") for m in progress.means],
        validations=progress.validations,
        final_reports=progress.final_reports,
        final_evaluated=progress.final_evaluated,
        rounds=progress.rounds,
    )
    path = directory / CHECKPOINT_FILE
    write_atomically(path, body.model_dump_json().encode())
    return path


def load(directory: Path, config: RunConfig) -> Progress | None:
    """The checkpoint in ``directory`` (None: there is none); refuses one of another run config."""
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        stored = CheckpointFile.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise CheckpointError(
            f"{path} is not a readable fedbpt Flower checkpoint ({exc}); move it away to start the run afresh"
        ) from None
    if stored.config != config:
        raise CheckpointError(
            f"{path} belongs to a run with another configuration; give this run another checkpoint-dir, "
            "or run with the same run config to continue that one"
        )
    if len(stored.means) != stored.round + 1:
        raise CheckpointError(f"{path} has {len(stored.means)} state means for state {stored.round}")
    return Progress(
        config=stored.config,
        round=stored.round,
        state=_read_state(stored.state),
        means=[np.array(m.numpy(), dtype=np.float64) for m in stored.means],
        validations=stored.validations,
        final_reports=stored.final_reports,
        final_evaluated=stored.final_evaluated,
        rounds=stored.rounds,
    )


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _store_state(state: ServerState) -> StoredState:
    if state.es is None:
        return StoredState(mean=Array.from_numpy(state.mean, dtype="float64"), sigma=state.sigma)
    return StoredState(
        mean=Array.from_numpy(state.mean, dtype="float64"),
        sigma=state.sigma,
        numbers=state.es.numbers(),
        arrays={name: _store_array(a) for name, a in state.es.arrays().items()},
    )


def _store_array(a: np.ndarray) -> StoredArray:
    # A Fortran-ordered matrix is stored as its transpose (C-ordered, same bytes) and read back
    # as the transpose of that: the same values in the same layout.
    if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous:
        return StoredArray(array=Array.from_numpy(a.T, dtype="float64"), order="F")
    return StoredArray(array=Array.from_numpy(a, dtype="float64"), order="C")


def _read_array(stored: StoredArray) -> np.ndarray:
    a = stored.array.numpy()
    if stored.order == "F":
        return np.array(a.T, dtype=np.float64, order="F")
    return np.array(a, dtype=np.float64, order="C")


def _read_state(stored: StoredState) -> ServerState:
    mean = np.array(stored.mean.numpy(), dtype=np.float64)
    if stored.numbers is None or stored.arrays is None:
        return ServerState(mean=mean, sigma=stored.sigma, es=None)
    values: dict[str, object] = dict(stored.numbers)
    values.update({name: _read_array(a) for name, a in stored.arrays.items()})
    try:
        core = ESCore(**values)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CheckpointError(f"the checkpoint's ES state does not fit this version: {exc}") from None
    return ServerState(mean=mean, sigma=stored.sigma, es=core)
