"""Fixtures of the coordinator tests: an app on a real SQLite file (FastAPI's TestClient), helpers
to create runs and enrol clients, and synthetic client updates (no model needed)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.settings import CoordinatorSettings
from protos import Array, ClientMetrics, ClientUpdate, Task

ADMIN = "admin-secret"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
JSON = {"Content-Type": "application/json"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def small_config(**overrides: Any) -> dict[str, Any]:
    """A RunConfig body for fast tests: d = 16, 3 local iterations."""
    config: dict[str, Any] = {"rounds": 3, "projection": {"intrinsic_dim": 16}, "local_iters": 3}
    config.update(overrides)
    return config


def synthetic_update(
    task: Task,
    seed: int,
    *,
    scale: float = 0.5,
    fitness: float | None = None,
    n_samples: int = 20,
    metrics: ClientMetrics | None = None,
) -> ClientUpdate:
    """What a client would send back for ``task``: a mean near the global one, decaying sigmas."""
    assert task.state is not None and task.config is not None
    rng = np.random.default_rng(seed)
    mean = task.state.mean.numpy() + task.state.sigma * scale * rng.normal(size=task.config.dim)
    sigmas = [task.state.sigma * 0.97**j for j in range(task.config.local_iters)]
    return ClientUpdate(
        mean=Array.from_numpy(mean, dtype="float64"),
        fitness=float(rng.uniform(0.3, 1.0)) if fitness is None else fitness,
        sigmas=sigmas,
        mu=task.config.local_popsize // 2,
        n_samples=n_samples,
        metrics=metrics or ClientMetrics(train_loss=float(rng.uniform(0.4, 0.7))),
    )


@dataclass
class Site:
    """One enrolled client as the tests drive it."""

    client_id: str
    token: str
    name: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)


@dataclass
class Coordinator:
    """A coordinator app on a temporary SQLite file, driven through HTTP (TestClient)."""

    http: TestClient
    db: Path
    runs: dict[str, list[Site]] = field(default_factory=dict)
    closed: bool = False

    def close(self) -> None:
        """Shut the app down (its lifespan ends: background work stops, the database closes)."""
        if not self.closed:
            self.closed = True
            self.http.__exit__(None, None, None)

    def create_run(self, **config: Any) -> str:
        r = self.http.post("/v1/runs", json=small_config(**config), headers=ADMIN_HEADERS)
        assert r.status_code == 201, r.text
        run_id: str = r.json()["run_id"]
        self.runs[run_id] = []
        return run_id

    def enrol(self, run_id: str, count: int, names: list[str] | None = None) -> list[Site]:
        sites = []
        for k in range(count):
            name = names[k] if names is not None else f"site-{len(self.runs[run_id])}"
            r = self.http.post(f"/v1/runs/{run_id}/clients", json={"name": name}, headers=ADMIN_HEADERS)
            assert r.status_code == 201, r.text
            site = Site(r.json()["client_id"], r.json()["token"], name)
            self.runs[run_id].append(site)
            sites.append(site)
        return sites

    def start(self, run_id: str) -> None:
        r = self.http.post(f"/v1/runs/{run_id}/start", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text

    def new_run(self, clients: int, **config: Any) -> tuple[str, list[Site]]:
        run_id = self.create_run(**config)
        sites = self.enrol(run_id, clients)
        self.start(run_id)
        return run_id, sites

    def task(self, run_id: str, site: Site, wait: float = 0) -> Task:
        r = self.http.get(f"/v1/runs/{run_id}/task", params={"wait": wait}, headers=site.headers)
        assert r.status_code == 200, r.text
        return Task.model_validate_json(r.content)

    def post_update(self, run_id: str, round_: int, site: Site, update: ClientUpdate | str) -> Any:
        body = update if isinstance(update, str) else update.model_dump_json()
        return self.http.post(
            f"/v1/runs/{run_id}/rounds/{round_}/updates", content=body, headers={**site.headers, **JSON}
        )

    def train(self, run_id: str, site: Site, seed: int, **kwargs: Any) -> Any:
        """Fetch the site's task, answer it with a synthetic update; return the ack response."""
        task = self.task(run_id, site)
        assert task.kind == "train", task
        assert task.round is not None
        return self.post_update(run_id, task.round, site, synthetic_update(task, seed, **kwargs))

    def info(self, run_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/runs/{run_id}", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/runs/{run_id}/rounds", headers=ADMIN_HEADERS)
        assert r.status_code == 200, r.text
        result: list[dict[str, Any]] = r.json()
        return result

    def dump(self) -> list[str]:
        """Everything stored, as SQL text (a second connection, so it sees only committed data)."""
        conn = sqlite3.connect(str(self.db))
        try:
            return list(conn.iterdump())
        finally:
            conn.close()


def make_settings(db: Path, **overrides: Any) -> CoordinatorSettings:
    values: dict[str, Any] = {"admin_token": ADMIN, "db": db, "deadline_check_interval_s": 0.05}
    values.update(overrides)
    return CoordinatorSettings(**values)


@pytest.fixture
def coordinator_factory(tmp_path: Path) -> Iterator[Callable[..., Coordinator]]:
    """Build coordinators (same or new SQLite file); all are shut down at the end of the test."""
    made: list[Coordinator] = []

    def make(db: Path | None = None, **overrides: Any) -> Coordinator:
        path = db or tmp_path / f"coordinator-{len(made)}.db"
        http = TestClient(create_app(make_settings(path, **overrides)))
        http.__enter__()
        made.append(Coordinator(http, path))
        return made[-1]

    yield make
    for coordinator in reversed(made):
        coordinator.close()


@pytest.fixture
def coord(coordinator_factory: Callable[..., Coordinator]) -> Coordinator:
    return coordinator_factory()
