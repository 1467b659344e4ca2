"""``cmaes``: FedBPT's server-level CMA-ES (ALGORITHM.md, "Server: aggregation"), on pycma's own
objects. The reference, and the default.

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

With one answer pycma cannot update (it refuses fewer than 3 solutions counting mirrors), so the ES
is built for two and told that one mean twice: the mean moves to the client's mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from coordinator.aggregators.base import Contribution, Step
from coordinator.es_state import ServerState, capture, decomposition_due, initial_es, restore
from protos import Array, GlobalState, RunConfig
from protos.covariance import CovarianceForm, encode

Weights = Literal["rank", "samples", "equal"]


class ServerCMAES:
    name: ClassVar[str] = "cmaes"
    scores_candidates: ClassVar[bool] = False

    def __init__(
        self,
        *,
        dim: int,
        sigma0: float,
        rounds: int,
        local_popsize: int,
        server_sigma: Literal["reference", "paper"] = "reference",
        server_weights: Weights = "rank",
        sigma_floor: float | None = None,
        sigma_ceiling: float | None = None,
        covariance: CovarianceForm = "full",
        covariance_rank: int = 8,
        covariance_dtype: Literal["float32", "float64"] = "float32",
        mean_dtype: Literal["float64", "float32"] = "float64",
        eigenmethod: Callable[..., Any] | None = None,
    ) -> None:
        self.dim = dim
        self.sigma0 = sigma0
        self.rounds = rounds
        self.local_popsize = local_popsize
        self.server_sigma = server_sigma
        self.server_weights = server_weights
        self.sigma_floor = sigma_floor
        self.sigma_ceiling = sigma_ceiling
        self.covariance = covariance
        self.covariance_rank = covariance_rank
        self.covariance_dtype = covariance_dtype
        self.mean_dtype = mean_dtype
        self.eigenmethod = eigenmethod

    @classmethod
    def from_config(cls, config: RunConfig, *, eigenmethod: Callable[..., Any] | None = None) -> ServerCMAES:
        return cls(
            dim=config.dim,
            sigma0=config.projection.sigma0,
            rounds=config.rounds,
            local_popsize=config.local_popsize,
            server_sigma=config.server_sigma,
            server_weights=config.server_weights,
            sigma_floor=config.sigma_floor,
            sigma_ceiling=config.sigma_ceiling,
            covariance=config.covariance,
            covariance_rank=config.covariance_rank,
            covariance_dtype=config.covariance_dtype,
            mean_dtype=config.mean_dtype,
            eigenmethod=eigenmethod,
        )

    def initial_state(self) -> ServerState:
        return initial_es(self.dim, self.sigma0, 2, self.rounds)

    def aggregate(self, state: ServerState, contributions: Sequence[Contribution]) -> Step:
        sigma_prime = _SERVER_SIGMA[self.server_sigma](contributions, self.local_popsize)
        solutions = [np.array(c.mean, dtype=np.float64) for c in contributions]
        fitnesses = [float(c.fitness) for c in contributions]
        if len(solutions) == 1:
            solutions, fitnesses = solutions * 2, fitnesses * 2
        weights, fitnesses = _RECOMBINATION[self.server_weights](contributions, fitnesses)
        es = restore(state, len(solutions), self.rounds, self.sigma0, self.eigenmethod, weights)
        es.sigma = sigma_prime
        # The reference asks for M samples and throws them away; pycma's ask matters only for what
        # it does before sampling (its lazy eigen-decomposition of C), which one sample triggers the
        # same way. The state after tell is identical (tested bit for bit against the reference loop).
        es.ask(1)
        es.tell(solutions, fitnesses)
        # The reference's order of operations: (sigma after / sigma before) * previous client sigma.
        client_sigma = float(es.sigma / sigma_prime * state.sigma)
        if self.sigma_floor is not None:
            client_sigma = max(client_sigma, self.sigma_floor)
        if self.sigma_ceiling is not None:
            client_sigma = min(client_sigma, self.sigma_ceiling)
        es.sigma = client_sigma
        return Step(capture(es), server_sigma=sigma_prime)

    def payload(self, state: ServerState) -> GlobalState:
        matrix = state.covariance()
        carried = (
            {}
            if matrix is None
            else encode(matrix, self.covariance, rank=self.covariance_rank, dtype=self.covariance_dtype)
        )
        mean = Array.from_numpy(state.mean, dtype=self.mean_dtype)
        return GlobalState(mean=mean, sigma=state.sigma, **carried)  # type: ignore[arg-type]

    def pending_decomposition(self, state: ServerState, expected_clients: int) -> np.ndarray | None:
        """C, when pycma's next ask for ``expected_clients`` (at least 2) will re-decompose it."""
        if state.es is not None and decomposition_due(state, max(expected_clients, 2), self.rounds):
            return state.es.C
        return None


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


def rank_weights(
    usable: Sequence[Contribution], fitnesses: list[float]
) -> tuple[list[float] | None, list[float]]:
    """pycma's own weights over the clients' fitnesses (the reference)."""
    return None, fitnesses


def equal_weights(
    usable: Sequence[Contribution], fitnesses: list[float]
) -> tuple[list[float] | None, list[float]]:
    """1/M each, whatever the fitnesses."""
    return [1.0] * len(fitnesses), fitnesses


def sample_weights(
    usable: Sequence[Contribution], fitnesses: list[float]
) -> tuple[list[float] | None, list[float]]:
    """Proportional to each client's n_samples. pycma weighs by rank, so the clients are ranked by
    n_samples (most first, name order on ties) and the weights are the sorted n_samples."""
    if len(usable) == 1:  # one client, doubled by aggregate: equal halves of the same mean
        return equal_weights(usable, fitnesses)
    order = sorted(range(len(fitnesses)), key=lambda i: -usable[i].n_samples)  # stable: name order
    rank_of = {i: r for r, i in enumerate(order)}
    return [float(usable[i].n_samples) for i in order], [float(rank_of[i]) for i in range(len(fitnesses))]


# Each server_weights option: (recombination weights by rank, or None for pycma's own; the values
# pycma ranks by) from the usable contributions and their fitnesses.
Recombination = Callable[[Sequence[Contribution], list[float]], tuple[list[float] | None, list[float]]]
_RECOMBINATION: dict[Weights, Recombination] = {
    "rank": rank_weights,
    "equal": equal_weights,
    "samples": sample_weights,
}
_SERVER_SIGMA: dict[str, Callable[[Sequence[Contribution], int], float]] = {
    "reference": lambda contributions, _popsize: reference_server_sigma(contributions),
    "paper": paper_server_sigma,
}
