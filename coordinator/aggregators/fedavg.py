"""``fedavg``: the paper's FedAvg-BBT baseline. The next mean is the n_samples-weighted mean of the
local means; sigma is fixed (``fedavg_sigma``, else ``projection.sigma0``) and C = I, so there is
no ES state and clients receive no covariance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from coordinator.aggregators.base import Contribution, Step
from coordinator.es_state import ServerState
from protos import Array, GlobalState, RunConfig


class FedAvg:
    name: ClassVar[str] = "fedavg"
    scores_candidates: ClassVar[bool] = False

    def __init__(self, *, dim: int, sigma: float) -> None:
        self.dim = dim
        self.sigma = sigma

    @classmethod
    def from_config(cls, config: RunConfig, *, eigenmethod: Callable[..., Any] | None = None) -> FedAvg:
        """The run's FedAvg (``eigenmethod`` is ignored: there is no covariance to decompose)."""
        sigma = config.fedavg_sigma if config.fedavg_sigma is not None else config.projection.sigma0
        return cls(dim=config.dim, sigma=sigma)

    def initial_state(self) -> ServerState:
        return ServerState(mean=np.zeros(self.dim), sigma=self.sigma, es=None)

    def aggregate(self, state: ServerState, contributions: Sequence[Contribution]) -> Step:
        weights = np.array([c.n_samples for c in contributions], dtype=np.float64)
        means = np.stack([c.mean for c in contributions])
        mean = (weights / weights.sum()) @ means
        return Step(ServerState(mean=mean, sigma=self.sigma, es=None))

    def payload(self, state: ServerState) -> GlobalState:
        return GlobalState(mean=Array.from_numpy(state.mean, dtype="float64"), sigma=state.sigma, cov=None)

    def pending_decomposition(self, state: ServerState, expected_clients: int) -> np.ndarray | None:
        return None
