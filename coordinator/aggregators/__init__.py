"""Server aggregators: one protocol (:class:`Aggregator`), one implementation per file, chosen by
``RunConfig.aggregator`` from :data:`AGGREGATORS`. Adding a server optimiser is one file here plus
one line in the registry (and the name in ``RunConfig.aggregator``'s choices).

:func:`server_step` is what the coordinator runs to close a round: the ``robust`` screen, the
aggregator's step, and the check of its output. It never returns an unusable state: a step that
raises or yields one is retried without the contribution that causes it (leave-one-out, then each
contribution on its own), and only if that fails too does it raise :class:`AggregationError`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from coordinator.aggregators.base import (
    AggregationError,
    Aggregator,
    Contribution,
    Outcome,
    Step,
    check_state,
    screen,
)
from coordinator.aggregators.cmaes import ServerCMAES
from coordinator.aggregators.fedavg import FedAvg
from coordinator.aggregators.shared_es import SharedPopulationES
from coordinator.es_state import ServerState
from protos import RunConfig

__all__ = [
    "AGGREGATORS",
    "AggregationError",
    "Aggregator",
    "Contribution",
    "Outcome",
    "Step",
    "aggregate",
    "make_aggregator",
    "server_step",
]


class Factory(Protocol):
    def __call__(self, config: RunConfig, *, eigenmethod: Callable[..., Any] | None = None) -> Aggregator: ...


# name -> factory. The one place an aggregator is chosen by its name.
AGGREGATORS: dict[str, Factory] = {
    ServerCMAES.name: ServerCMAES.from_config,
    FedAvg.name: FedAvg.from_config,
    SharedPopulationES.name: SharedPopulationES.from_config,
}


def make_aggregator(config: RunConfig, eigenmethod: Callable[..., Any] | None = None) -> Aggregator:
    factory = AGGREGATORS.get(config.aggregator)
    if factory is None:
        raise ValueError(f"no aggregator named {config.aggregator!r}; known: {sorted(AGGREGATORS)}")
    return factory(config, eigenmethod=eigenmethod)


def server_step(
    aggregator: Aggregator, config: RunConfig, state: ServerState, contributions: Sequence[Contribution]
) -> Outcome:
    """The state after one round (module docstring). Contributions left out because the step
    failed with them are listed in ``rejected``, like those the robust screen refused."""
    started = time.perf_counter()
    usable, clipped, rejected = screen(config, state, contributions)
    step, offenders = _checked_step(aggregator, state, usable)
    outcome = Outcome(state=step.state, server_sigma=step.server_sigma)
    outcome.used = [c.client_id for c in usable if c.client_id not in offenders]
    outcome.clipped = clipped
    outcome.rejected = rejected + offenders
    outcome.seconds = time.perf_counter() - started
    return outcome


def aggregate(
    config: RunConfig,
    state: ServerState,
    contributions: Sequence[Contribution],
    eigenmethod: Callable[..., Any] | None = None,
) -> Outcome:
    """:func:`server_step` with the run's own aggregator (for callers holding only a config)."""
    return server_step(make_aggregator(config, eigenmethod), config, state, contributions)


def _checked_step(
    aggregator: Aggregator, state: ServerState, usable: list[Contribution]
) -> tuple[Step, list[str]]:
    """(a usable step, the ids left out to get it)."""
    first = _try(aggregator, state, usable)
    if isinstance(first, Step):
        return first, []
    for i, c in enumerate(usable):  # one offender: the step without it is usable
        step = _try(aggregator, state, usable[:i] + usable[i + 1 :])
        if isinstance(step, Step):
            return step, [c.client_id]
    # Several: keep the contributions that give a usable step on their own, if together they do.
    # If none does, the step itself is broken, not a site: refuse rather than carry the state over.
    alone_ok = [c for c in usable if isinstance(_try(aggregator, state, [c]), Step)]
    step = _try(aggregator, state, alone_ok) if alone_ok else first
    if isinstance(step, Step):
        return step, [c.client_id for c in usable if c not in alone_ok]
    raise AggregationError(f"the server step failed ({first}) and no contribution explains it")


def _try(aggregator: Aggregator, state: ServerState, usable: list[Contribution]) -> Step | str:
    """The checked step, or why it failed. No contribution: the state carries over unchanged."""
    if not usable:
        return Step(_copy(state))
    try:
        with np.errstate(all="ignore"):  # overflow is judged by the check below, not by warnings
            step = aggregator.aggregate(state, usable)
        check_state(step.state, state.dim)
    except Exception as exc:  # anything the step raises is a failed step, never a wedged round
        return f"{type(exc).__name__}: {exc}"
    return step


def _copy(state: ServerState) -> ServerState:
    return ServerState(mean=state.mean.copy(), sigma=state.sigma, es=copy.deepcopy(state.es))
