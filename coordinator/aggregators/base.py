"""What every server aggregator shares: the contribution it reads, the step it returns, the
``Aggregator`` protocol, the ``robust`` screen and the check of a new state before it is saved.

An aggregator is plain computation on numpy arrays: it needs no database, no HTTP and no clock, so
another orchestrator can drive it with arrays of its own (docs/design.md, "Aggregators").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np

from coordinator.es_state import ServerState
from protos import GlobalState, RunConfig


class AggregationError(Exception):
    """The server step produced no usable state (non-finite numbers, sigma <= 0, a covariance that
    is not symmetric positive-definite) or raised while computing it."""


@dataclass(frozen=True)
class Contribution:
    """One accepted client update, as the aggregation needs it."""

    client_id: str
    mean: np.ndarray
    fitness: float
    sigmas: tuple[float, ...]
    mu: int
    n_samples: int
    losses: tuple[float, ...] | None = None  # one per candidate (shared_es); None: a local search's result


@dataclass(frozen=True)
class Step:
    """What an aggregator returns: the next state and the sigma' its step used (None: no ES)."""

    state: ServerState
    server_sigma: float | None = None


@dataclass
class Outcome:
    """One round's aggregation as the coordinator records it."""

    state: ServerState
    server_sigma: float | None
    used: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Aggregator(Protocol):
    """A server optimiser, in the manner of Flower's Strategy: where a run starts, how the round's
    contributions become the next state, and what a client receives of a state.

    Implementations take keyword-only constructor arguments and are built from a ``RunConfig`` by
    the registry (``coordinator.aggregators.make_aggregator``)."""

    name: ClassVar[str]
    # True: clients score the candidates a task carries and answer their losses (shared_es);
    # False: clients run a local search and answer its mean.
    scores_candidates: ClassVar[bool]

    def initial_state(self) -> ServerState:
        """State 0 of a run."""
        ...

    def aggregate(self, state: ServerState, contributions: Sequence[Contribution]) -> Step:
        """The state after one round from the state before it and one or more contributions (in a
        deterministic order, screened already); may raise, and its output is checked by the caller."""
        ...

    def payload(self, state: ServerState) -> GlobalState:
        """The state as clients receive it."""
        ...

    def pending_decomposition(self, state: ServerState, expected_clients: int) -> np.ndarray | None:
        """A matrix the next ``aggregate`` will decompose, to be precomputed while clients train;
        None when there is nothing to prepare."""
        ...


def screen(
    config: RunConfig, state: ServerState, contributions: Sequence[Contribution]
) -> tuple[list[Contribution], list[str], list[str]]:
    """Apply the robust option: (usable contributions, clipped ids, rejected ids). A local mean
    farther than ``robust_multiple * sigma * sqrt(d)`` from the global mean is pulled back to that
    radius (clip) or left out (reject)."""
    if config.robust == "off":
        return list(contributions), [], []
    radius = config.robust_multiple * state.sigma * math.sqrt(state.dim)
    usable: list[Contribution] = []
    clipped: list[str] = []
    rejected: list[str] = []
    for c in contributions:
        step = c.mean - state.mean
        distance = float(np.linalg.norm(step))
        if distance <= radius:
            usable.append(c)
        elif config.robust == "reject":
            rejected.append(c.client_id)
        else:
            clipped.append(c.client_id)
            pulled = state.mean + step * (radius / distance)
            usable.append(Contribution(c.client_id, pulled, c.fitness, c.sigmas, c.mu, c.n_samples, c.losses))
    return usable, clipped, rejected


def check_state(state: ServerState, dim: int) -> None:
    """Raise :class:`AggregationError` unless ``state`` is one the next round can start from:
    a finite mean of dimension ``dim``, a finite sigma > 0 and, with an ES, finite bookkeeping and
    a symmetric positive-definite covariance (checked by a Cholesky factorisation)."""
    if state.mean.shape != (dim,) or not np.all(np.isfinite(state.mean)):
        raise AggregationError(f"the new mean is not a finite vector of dimension {dim}")
    if not (math.isfinite(state.sigma) and state.sigma > 0):
        raise AggregationError(f"the new sigma is {state.sigma}; it must be finite and > 0")
    if state.es is None:
        return
    for name, array in state.es.arrays().items():
        if not np.all(np.isfinite(array)):
            raise AggregationError(f"the new ES state's {name} has non-finite entries")
    c = state.es.C
    if not np.allclose(c, c.T, rtol=1e-9, atol=1e-12 * float(np.max(np.abs(np.diag(c))))):
        raise AggregationError("the new covariance is not symmetric")
    try:
        np.linalg.cholesky((c + c.T) / 2)
    except np.linalg.LinAlgError:
        raise AggregationError("the new covariance is not positive-definite") from None
