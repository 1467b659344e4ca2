"""Server aggregation of one round (ALGORITHM.md, "Server: aggregation"), on pycma's own objects.

``cmaes`` (the reference, default):
1. sigma' from the clients' local sigmas: ``sqrt(sum_k sum_j sigma_kj^2 / mu_k / M)`` (the
   reference's ``sqrt(sum sigma^2 / (M * mu))`` when every client reports the same mu), or with
   ``server_sigma: paper`` Eq. 6: ``2 * sqrt(sum over the best ceil(M/2) clients of sum_j
   sigma_kj^2 / (M * lambda))``.
2. A pycma ES for the M clients that answered (popsize = CMA_mu = M) carrying the stored state;
   its sigma set to sigma', one ``ask`` (its sample discarded; pycma requires the call and may
   re-decompose C there), one ``tell`` of the M local means with their fitnesses: pycma ranks
   them, clips over-long moves, updates the paths, sigma (CSA) and C.
   ``server_weights`` says how the M means are weighed: ``rank`` (the reference) by pycma's rank
   weights over the clients' fitnesses; ``samples`` in proportion to the clients' n_samples;
   ``equal`` 1/M each. Losses on different sites' data are not comparable: under label skew the
   rank weights go to the sites whose own data is easiest to fit — the smallest, one-class ones
   (measured: a 1-example site ranked first in all 20 rounds) — and pull the mean their way.
3. The clients' next sigma = previous client sigma * (sigma after tell / sigma'), raised to
   ``sigma_floor`` / lowered to ``sigma_ceiling`` when set (the reference's 0.5 floor never acts;
   both are off by default).

``fedavg`` (the paper's FedAvg-BBT baseline): the n_samples-weighted mean of the local means, a fixed
sigma (``fedavg_sigma``, else ``projection.sigma0``) and C = I.

``robust: clip | reject`` screens the updates first: a local mean farther than
``robust_multiple * sigma * sqrt(d)`` from the global mean (sigma: the clients' sigma of the round)
is pulled back to that radius or left out.

With one answer pycma cannot update (it refuses fewer than 3 solutions counting mirrors), so the ES
is built for two and told that one mean twice: the mean moves to the (clipped) client mean.
With no usable answer the state is carried over unchanged.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.es_state import ServerState, capture, restore
from protos import RunConfig


@dataclass(frozen=True)
class Contribution:
    """One accepted client update, as the aggregation needs it."""

    client_id: str
    mean: np.ndarray
    fitness: float
    sigmas: tuple[float, ...]
    mu: int
    n_samples: int


@dataclass
class Outcome:
    state: ServerState
    server_sigma: float | None
    used: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    seconds: float = 0.0


def reference_server_sigma(contributions: Sequence[Contribution]) -> float:
    """The reference's expression, operation for operation (so that it rounds the same way):
    per client the sum of its squared sigmas, summed, divided by M, then by mu."""
    m = len(contributions)
    per_client = np.array([np.sum(np.array(c.sigmas) ** 2) for c in contributions])
    mus = {c.mu for c in contributions}
    if len(mus) == 1:
        return float(np.sqrt(np.sum(per_client) / m / mus.pop()))
    # Clients with different local populations: each sum divided by its own mu.
    return float(np.sqrt(np.sum(per_client / np.array([c.mu for c in contributions])) / m))


def paper_server_sigma(contributions: Sequence[Contribution], local_popsize: int) -> float:
    m = len(contributions)
    best = sorted(range(m), key=lambda i: contributions[i].fitness)[: max(1, math.ceil(m / 2))]
    total = sum(sum(s * s for s in contributions[i].sigmas) for i in best)
    return 2.0 * math.sqrt(total / (m * local_popsize))


def screen(
    config: RunConfig, state: ServerState, contributions: Sequence[Contribution]
) -> tuple[list[Contribution], list[str], list[str]]:
    """Apply the robust option: (usable contributions, clipped ids, rejected ids)."""
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
            usable.append(Contribution(c.client_id, pulled, c.fitness, c.sigmas, c.mu, c.n_samples))
    return usable, clipped, rejected


def aggregate(
    config: RunConfig,
    state: ServerState,
    contributions: Sequence[Contribution],
    eigenmethod: Callable[..., Any] | None = None,
) -> Outcome:
    """The state after one round, from the state before it and the round's accepted updates
    (in a deterministic order: ties in fitness keep it)."""
    started = time.perf_counter()
    usable, clipped, rejected = screen(config, state, contributions)
    if not usable:
        outcome = Outcome(state=_copy(state), server_sigma=None)
    elif config.aggregator == "fedavg":
        outcome = Outcome(state=_fedavg(config, state, usable), server_sigma=None)
    else:
        outcome = _cmaes(config, state, usable, eigenmethod)
    outcome.used = [c.client_id for c in usable]
    outcome.clipped = clipped
    outcome.rejected = rejected
    outcome.seconds = time.perf_counter() - started
    return outcome


def fedavg_sigma(config: RunConfig) -> float:
    return config.fedavg_sigma if config.fedavg_sigma is not None else config.projection.sigma0


def _fedavg(config: RunConfig, state: ServerState, usable: Sequence[Contribution]) -> ServerState:
    weights = np.array([c.n_samples for c in usable], dtype=np.float64)
    means = np.stack([c.mean for c in usable])
    mean = (weights / weights.sum()) @ means
    return ServerState(mean=mean, sigma=fedavg_sigma(config), es=None)


def _cmaes(
    config: RunConfig,
    state: ServerState,
    usable: Sequence[Contribution],
    eigenmethod: Callable[..., Any] | None,
) -> Outcome:
    if config.server_sigma == "paper":
        sigma_prime = paper_server_sigma(usable, config.local_popsize)
    else:
        sigma_prime = reference_server_sigma(usable)
    solutions = [np.array(c.mean, dtype=np.float64) for c in usable]
    fitnesses = [float(c.fitness) for c in usable]
    if len(solutions) == 1:
        solutions, fitnesses = solutions * 2, fitnesses * 2
    weights, fitnesses = recombination(config, usable, fitnesses)
    es = restore(state, len(solutions), config.rounds, config.projection.sigma0, eigenmethod, weights)
    es.sigma = sigma_prime
    # The reference asks for M samples and throws them away; pycma's ask matters only for what it
    # does before sampling (its lazy eigen-decomposition of C), which one sample triggers the same
    # way. The state after tell is identical (tested bit for bit against the reference loop).
    es.ask(1)
    es.tell(solutions, fitnesses)
    # The reference's order of operations: (sigma after / sigma before) * previous client sigma.
    client_sigma = float(es.sigma / sigma_prime * state.sigma)
    if config.sigma_floor is not None:
        client_sigma = max(client_sigma, config.sigma_floor)
    if config.sigma_ceiling is not None:
        client_sigma = min(client_sigma, config.sigma_ceiling)
    es.sigma = client_sigma
    return Outcome(state=capture(es), server_sigma=sigma_prime)


def recombination(
    config: RunConfig, usable: Sequence[Contribution], fitnesses: list[float]
) -> tuple[list[float] | None, list[float]]:
    """(recombination weights by rank or None for pycma's own, the values pycma ranks by).

    rank: pycma's weights over the clients' fitnesses (the reference). equal: 1/M each. samples:
    proportional to each client's n_samples; pycma weighs by rank, so the clients are ranked by
    n_samples (most first, name order on ties) and the weights are the sorted n_samples."""
    m = len(fitnesses)
    if config.server_weights == "rank":
        return None, fitnesses
    if config.server_weights == "equal" or len(usable) == 1:
        return [1.0] * m, fitnesses
    order = sorted(range(m), key=lambda i: -usable[i].n_samples)  # stable: name order on ties
    rank_of = {i: r for r, i in enumerate(order)}
    return [float(usable[i].n_samples) for i in order], [float(rank_of[i]) for i in range(m)]


def _copy(state: ServerState) -> ServerState:
    es = None
    if state.es is not None:
        es = copy.deepcopy(state.es)
    return ServerState(mean=state.mean.copy(), sigma=state.sigma, es=es)
