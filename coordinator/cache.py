"""What the coordinator keeps in memory per run, each a copy of what is committed in the store:
the parsed config, its aggregator, the latest global state and that state as clients receive it.
Filled lazily from the store (so a restarted coordinator rebuilds it) and moved on only after the
transaction that changed the store has committed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from coordinator.aggregators import Aggregator, make_aggregator
from coordinator.errors import NotFound
from coordinator.es_state import ServerState
from coordinator.store import Store
from protos import GlobalState, RunConfig


class RunCache:
    def __init__(self, store: Store, eigenmethod: Callable[..., Any] | None = None) -> None:
        self.store = store
        self.eigenmethod = eigenmethod
        self._configs: dict[str, RunConfig] = {}
        self._aggregators: dict[str, Aggregator] = {}
        self._states: dict[str, tuple[int, ServerState]] = {}
        self._payloads: dict[str, tuple[int, GlobalState]] = {}

    def add(self, run_id: str, config: RunConfig, state: ServerState) -> None:
        self._configs[run_id] = config
        self._states[run_id] = (0, state)

    def config(self, run_id: str) -> RunConfig:
        cached = self._configs.get(run_id)
        if cached is None:
            row = self.store.run(run_id)
            if row is None:
                raise NotFound(f"unknown run {run_id}")
            cached = self._configs[run_id] = RunConfig.model_validate_json(row.config)
        return cached

    def aggregator(self, run_id: str) -> Aggregator:
        cached = self._aggregators.get(run_id)
        if cached is None:
            cached = self._aggregators[run_id] = make_aggregator(self.config(run_id), self.eigenmethod)
        return cached

    def state(self, run_id: str) -> tuple[int, ServerState]:
        """(index, state) of the run's latest global state."""
        cached = self._states.get(run_id)
        if cached is None:
            cached = self._states[run_id] = self.store.load_state(run_id)
        return cached

    def advance(self, run_id: str, idx: int, state: ServerState) -> None:
        """State ``idx`` was committed."""
        self._states[run_id] = (idx, state)
        self._payloads.pop(run_id, None)

    def payload(self, run_id: str) -> GlobalState:
        """The latest global state as clients receive it (encoded once per state)."""
        idx, state = self.state(run_id)
        cached = self._payloads.get(run_id)
        if cached is None or cached[0] != idx:
            cached = self._payloads[run_id] = (idx, self.aggregator(run_id).payload(state))
        return cached[1]
