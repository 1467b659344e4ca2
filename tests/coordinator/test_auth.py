"""The auth matrix: every route with no token, a wrong token, another run's client token, a client
token on admin routes and the admin token on client routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.coordinator.conftest import ADMIN, ADMIN_HEADERS, JSON, Coordinator, bearer, synthetic_update

# (method, path template, role): role "admin" = admin only, "read" = admin or the run's clients,
# "client" = the run's clients only.
ROUTES: list[tuple[str, str, str]] = [
    ("POST", "/v1/runs", "admin"),
    ("POST", "/v1/runs/{run}/clients", "admin"),
    ("POST", "/v1/runs/{run}/start", "admin"),
    ("GET", "/v1/runs/{run}/clients", "admin"),
    ("GET", "/v1/runs", "read"),
    ("GET", "/v1/runs/{run}", "read"),
    ("GET", "/v1/runs/{run}/rounds", "read"),
    ("GET", "/v1/runs/{run}/prompt", "read"),
    ("GET", "/v1/runs/{run}/task", "client"),
    ("POST", "/v1/runs/{run}/rounds/0/updates", "client"),
    ("POST", "/v1/runs/{run}/rounds/0/eval", "client"),
    ("GET", "/v1/whoami", "client"),
]


class World:
    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.run_a, (self.a,) = coord.new_run(1)
        self.run_b, (self.b,) = coord.new_run(1)
        task = coord.task(self.run_a, self.a)
        self.update = synthetic_update(task, 1).model_dump_json()

    def body(self, path: str) -> dict[str, Any]:
        if path == "/v1/runs":
            return {"json": {}}
        if path.endswith("/clients"):
            return {"json": {"name": "new-site"}}
        if path.endswith("/updates"):
            return {"content": self.update, "headers": JSON}
        if path.endswith("/eval"):
            return {"json": {"test_accuracy": 0.5, "n_test": 3}}
        return {}

    def call(self, method: str, path: str, headers: dict[str, str]) -> Any:
        kwargs = self.body(path)
        merged = {**kwargs.pop("headers", {}), **headers}
        return self.coord.http.request(method, path.format(run=self.run_a), headers=merged, **kwargs)


@pytest.fixture
def world(coord: Coordinator) -> World:
    return World(coord)


@pytest.mark.parametrize(("method", "path", "role"), ROUTES)
def test_missing_or_wrong_token_is_401(world: World, method: str, path: str, role: str) -> None:
    for headers in (
        {},
        bearer("not-a-token"),
        {"Authorization": f"Basic {ADMIN}"},
        {"Authorization": "Bearer"},
    ):
        r = world.call(method, path, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer" and r.json()["detail"]


@pytest.mark.parametrize(("method", "path", "role"), ROUTES)
def test_role_and_run_boundaries(world: World, method: str, path: str, role: str) -> None:
    other_run_client = world.call(method, path, world.b.headers)
    own_client = world.call(method, path, world.a.headers)
    as_admin = world.call(method, path, ADMIN_HEADERS)
    if role == "admin":
        assert own_client.status_code == 403 and "admin token" in own_client.json()["detail"]
        assert other_run_client.status_code == 403
        assert as_admin.status_code in (200, 201, 409), as_admin.text  # 409: start of a started run
    elif role == "read":
        assert own_client.status_code == 200, own_client.text
        assert as_admin.status_code == 200, as_admin.text
        if "{run}" in path:
            assert other_run_client.status_code == 403 and "another run" in other_run_client.json()["detail"]
        else:  # the run list: a client sees only its own run
            assert [r["run_id"] for r in other_run_client.json()] == [world.run_b]
            assert [r["run_id"] for r in own_client.json()] == [world.run_a]
    else:
        assert as_admin.status_code == 403 and "admin token" in as_admin.json()["detail"]
        if "{run}" in path:
            assert other_run_client.status_code == 403 and "another run" in other_run_client.json()["detail"]
        # the run's own client passes the auth check (eval: 409, the run is not finished)
        assert own_client.status_code in (200, 409), own_client.text
        assert own_client.status_code not in (401, 403)


def test_client_of_another_run_cannot_touch_a_run_that_does_not_exist(world: World) -> None:
    r = world.coord.http.get("/v1/runs/run-unknown/task", headers=world.a.headers)
    assert r.status_code == 403
    assert world.coord.http.get("/v1/runs/run-unknown", headers=ADMIN_HEADERS).status_code == 404


def test_without_admin_token_admin_routes_are_refused(
    coordinator_factory: Callable[..., Coordinator],
) -> None:
    coord = coordinator_factory(admin_token=None)
    for method, path in (("POST", "/v1/runs"), ("POST", "/v1/runs/x/clients"), ("POST", "/v1/runs/x/start")):
        for headers in ({}, ADMIN_HEADERS, bearer("")):
            r = coord.http.request(method, path, headers=headers, json={"name": "n"})
            assert r.status_code == 403, r.text
            assert "FEDBPT_ADMIN_TOKEN" in r.json()["detail"]
    r = coord.http.get("/v1/runs", headers=ADMIN_HEADERS)
    assert r.status_code == 401  # no admin exists, so the token is simply unknown


def test_client_tokens_are_stored_only_as_digests(world: World) -> None:
    dump = "\n".join(world.coord.dump())
    for site in (world.a, world.b):
        assert site.token not in dump
        assert site.client_id in dump
    assert ADMIN not in dump
