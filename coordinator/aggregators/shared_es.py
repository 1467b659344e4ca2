"""``shared_es``: one server CMA-ES whose population every site scores (federated evaluation).

FedBPT's sites each run a short local search on their own few examples and the server merges the
results; with 6-30 training sentences a site, the local searches fit their sites and the merged
step does not add up to one search on all the data (docs/results.md, "How much data a federation
needs"). Here no site searches. Each round is one generation of a single pycma ES kept by the
coordinator:

1. The task carries the generation's ``lambda = local_popsize`` candidates (``GlobalState.candidates``,
   [lambda, d]), sampled by pycma's ``ask`` from the stored state with a private generator seeded by
   (run seed, generation): the same state always yields the same candidates, so the task can be
   built again (re-issued rounds, several coordinator workers) and the step below tells exactly
   the candidates the sites scored.
2. Each site scores every candidate on its training examples (no perturbation: there is no local
   search to over-fit) and answers ``losses``, one mean loss per candidate, with its ``n_samples``.
3. The server's fitness of candidate i is ``sum_k n_k L_ki / sum_k n_k``: the mean loss over the
   union of the answering sites' training data. pycma's ``tell`` does the rest (its own parent
   number, weights, CSA and covariance update).

With every site answering, a run is the same CMA-ES, step for step, as one ES run on the pooled
data (tested against a persistent pycma ES), while examples stay on their sites: only d-vectors go
down and lambda numbers come up. It takes one round per generation, so ``rounds`` counts
generations (``local_iters`` is not used): FedBPT's budget of R rounds of G local generations is
``rounds = R * G`` here. Mirrored sampling is off (module es_state). The candidates travel in
``mean_dtype``: float64 (the default) is exact; float32 halves the task (5.4 KB -> 2.7 KB of
candidates at lambda = 5, d = 100) and the sites score points rounded by ~1e-7 of their size,
while the server tells pycma its own float64 points.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from coordinator.aggregators.base import Contribution, Step
from coordinator.es_state import ServerState, capture, initial_es, restore
from protos import Array, GlobalState, RunConfig


class SharedPopulationES:
    name: ClassVar[str] = "shared_es"
    scores_candidates: ClassVar[bool] = True

    def __init__(
        self,
        *,
        dim: int,
        sigma0: float,
        rounds: int,
        popsize: int,
        seed: int,
        mean_dtype: Literal["float64", "float32"] = "float64",
        eigenmethod: Callable[..., Any] | None = None,
    ) -> None:
        if popsize < 3:
            raise ValueError("shared_es needs at least 3 candidates per generation (local_popsize)")
        self.dim = dim
        self.sigma0 = sigma0
        self.rounds = rounds
        self.popsize = popsize
        self.seed = seed
        self.mean_dtype = mean_dtype
        self.eigenmethod = eigenmethod

    @classmethod
    def from_config(
        cls, config: RunConfig, *, eigenmethod: Callable[..., Any] | None = None
    ) -> SharedPopulationES:
        return cls(
            dim=config.dim,
            sigma0=config.projection.sigma0,
            rounds=config.rounds,
            popsize=config.local_popsize,
            seed=config.seed,
            mean_dtype=config.mean_dtype,
            eigenmethod=eigenmethod,
        )

    def initial_state(self) -> ServerState:
        return initial_es(self.dim, self.sigma0, self.popsize, self.rounds)

    def candidates(self, state: ServerState) -> tuple[np.ndarray, Any]:
        """(the generation's candidates [lambda, d], the pycma ES that sampled them)."""
        assert state.es is not None
        rng = np.random.default_rng([self.seed, state.es.countiter])

        def randn(*shape: int) -> np.ndarray:
            return rng.standard_normal(shape)

        es = restore(
            state, self.popsize, self.rounds, self.sigma0, self.eigenmethod, randn=randn, all_parents=False
        )
        return np.array(es.ask(), dtype=np.float64), es

    def aggregate(self, state: ServerState, contributions: Sequence[Contribution]) -> Step:
        points, es = self.candidates(state)
        fitnesses = pooled_losses(contributions, len(points))
        es.tell(list(points), fitnesses.tolist())
        return Step(capture(es))

    def payload(self, state: ServerState) -> GlobalState:
        points, _ = self.candidates(state)
        return GlobalState(
            mean=Array.from_numpy(state.mean, dtype=self.mean_dtype),
            sigma=state.sigma,
            candidates=Array.from_numpy(points, dtype=self.mean_dtype),
        )

    def pending_decomposition(self, state: ServerState, expected_clients: int) -> np.ndarray | None:
        return None  # the decomposition happens in payload's ask, before any site trains


def pooled_losses(contributions: Sequence[Contribution], popsize: int) -> np.ndarray:
    """Each candidate's mean loss over the union of the sites' examples: the sites' mean losses
    weighted by their n_samples."""
    weights = np.array([c.n_samples for c in contributions], dtype=np.float64)
    rows = []
    for c in contributions:
        if c.losses is None or len(c.losses) != popsize:
            got = "none" if c.losses is None else str(len(c.losses))
            raise ValueError(f"client {c.client_id} sent {got} losses for {popsize} candidates")
        rows.append(np.asarray(c.losses, dtype=np.float64))
    return np.asarray((weights / weights.sum()) @ np.stack(rows), dtype=np.float64)
