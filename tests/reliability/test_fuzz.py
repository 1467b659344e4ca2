"""schemathesis against both services' OpenAPI schemas, as real processes: no 5xx, and no stored
change after a 4xx. Bounded: a few cases per operation in the default suite (CI), 500 in the slow one."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from tests.reliability.fuzzing import fuzz
from tests.reliability.load import save

ADMIN = "fuzz-admin-token"
CASES = [8, pytest.param(500, marks=pytest.mark.slow)]


class CommitWatch:
    """Whether anything was committed to the SQLite file since the last look, from one reader
    connection: ``PRAGMA data_version`` changes when another connection commits (cheap, exact)."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db)

    def __call__(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    db, port = tmp_path / "c.sqlite", free_port()
    argv = fedbpt_command("serve-coordinator", "--db", str(db), "--port", str(port), "--log-level", "warning")
    # Generated runs stay small (d <= 64): each run keeps a d x d covariance; the limit is tested elsewhere.
    env = {"FEDBPT_ADMIN_TOKEN": ADMIN, "FEDBPT_COORDINATOR_MAX_INTRINSIC_DIM": "64"}
    proc = ManagedProcess("serve-coordinator", argv, tmp_path / "c.log", env=env)
    url = f"http://127.0.0.1:{port}"
    with running(proc, ready_url=f"{url}/healthz", timeout=120):
        admin = {"Authorization": f"Bearer {ADMIN}"}
        run_id = httpx.post(
            f"{url}/v1/runs", json={"rounds": 2, "projection": {"intrinsic_dim": 16}}, headers=admin
        ).json()["run_id"]
        httpx.post(f"{url}/v1/runs/{run_id}/clients", json={"name": "site"}, headers=admin)
        yield url, db, run_id


@pytest.fixture(scope="module")
def model_url(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = fedbpt_command(
        "serve-model",
        "--model",
        str(tiny_bert),
        "--port",
        str(port),
        "--max-rows",
        "256",
        "--log-level",
        "warning",
    )
    proc = ManagedProcess("serve-model", argv, tmp_path_factory.mktemp("fuzz-model") / "m.log")
    url = f"http://127.0.0.1:{port}"
    with running(proc, ready_url=f"{url}/readyz", timeout=180):
        yield url


@pytest.mark.parametrize("cases", CASES)
def test_coordinator_never_5xx_and_4xx_changes_nothing(
    coordinator: tuple[str, Path, str], cases: int, test_output: Path
) -> None:
    url, db, run_id = coordinator
    watch = CommitWatch(db)
    version = watch()
    httpx.post(
        f"{url}/v1/runs",
        json={"projection": {"intrinsic_dim": 8}},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert watch() != version  # the watch does see a commit of the coordinator process
    seen = fuzz(
        url,
        {"Authorization": f"Bearer {ADMIN}"},
        cases,
        state=watch,
        path_parameters={"run_id": run_id, "round_": "0"},
        query={"/v1/runs/{run_id}/task": {"wait": 0}},  # no long-poll per case
    )
    save(
        {"cases_per_operation": cases, "statuses": seen},
        test_output / "reliability" / f"fuzz_coordinator_{cases}.json",
    )
    assert len(seen) >= 14, seen  # every route of the contract was exercised


@pytest.mark.parametrize("cases", CASES)
def test_client_routes_never_5xx_and_4xx_changes_nothing(
    coordinator: tuple[str, Path, str], cases: int, test_output: Path
) -> None:
    """The same with a client's token on a started run, so the client routes' own checks (task,
    whoami, updates, eval) are reached, not only their 401/403 (the admin token stops there).
    Breaks caught: a client route answering 5xx on a bad body, or storing a refused update."""
    url, db, run_id = coordinator
    admin = {"Authorization": f"Bearer {ADMIN}"}
    site = httpx.post(f"{url}/v1/runs/{run_id}/clients", json={"name": "fuzzed-site"}, headers=admin).json()
    assert httpx.post(f"{url}/v1/runs/{run_id}/start", headers=admin).status_code == 200
    watch = CommitWatch(db)
    seen = fuzz(
        url,
        {"Authorization": f"Bearer {site['token']}"},
        cases,
        state=watch,
        path_parameters={"run_id": run_id, "round_": "0"},
        query={"/v1/runs/{run_id}/task": {"wait": 0}},
    )
    save(
        {"cases_per_operation": cases, "statuses": seen},
        test_output / "reliability" / f"fuzz_coordinator_client_{cases}.json",
    )
    client_routes = [k for k in seen if k.endswith(("/task", "/updates", "/eval", "/whoami"))]
    assert len(client_routes) == 4, seen
    # Past authentication: each client route answered something other than 401/403 at least once.
    for route in client_routes:
        assert set(seen[route]) - {401, 403}, (route, seen[route])


NEAR_VALID = [150, pytest.param(1500, marks=pytest.mark.slow)]


@pytest.mark.parametrize("cases", NEAR_VALID)
def test_near_valid_updates_and_evals_never_5xx_and_4xx_changes_nothing(
    coordinator: tuple[str, Path, str], cases: int
) -> None:
    """Schema fuzzing rarely writes a body the schema accepts (an Array's bytes must match its
    shape), so the engine's own checks are reached from a valid update and a valid evaluation with
    hypothesis changing one to three fields at a time: wrong dimension, dtype, shape, sigma count,
    out-of-range mu, extreme magnitudes, metrics out of range; and eval bodies before the run ends.
    Breaks caught: a 5xx from an engine check, or a refused update that commits anything."""
    url, db, _ = coordinator
    admin = {"Authorization": f"Bearer {ADMIN}"}
    # A run of its own with this one site: an accepted update closes the round and the next cases
    # go to the next round (in a shared round they would all be duplicates, which skip the checks).
    config = {"rounds": 100_000, "projection": {"intrinsic_dim": 16}, "local_iters": 3}
    run_id = httpx.post(f"{url}/v1/runs", json=config, headers=admin).json()["run_id"]
    site = httpx.post(f"{url}/v1/runs/{run_id}/clients", json={"name": "near-valid"}, headers=admin).json()
    assert httpx.post(f"{url}/v1/runs/{run_id}/start", headers=admin).status_code == 200
    headers = {"Authorization": f"Bearer {site['token']}", "Content-Type": "application/json"}
    current: dict[str, object] = {}

    def next_task() -> None:
        task = httpx.get(f"{url}/v1/runs/{run_id}/task", headers=headers).json()
        assert task["kind"] == "train", task
        current.update(round=task["round"], mean=task["state"]["mean"], sigmas=[task["state"]["sigma"]] * 3)

    next_task()
    valid = {"fitness": 0.5, "mu": 2, "n_samples": 8, "metrics": {"train_loss": 0.5}}
    floats = st.sampled_from([0.0, -1.0, 1e-300, 1e300, -1e300, 2.0, 1e9])
    arrays = st.builds(
        lambda n, dtype, fill: {
            "dtype": dtype,
            "shape": [n],
            "data": base64.b64encode(
                np.full(
                    n,
                    fill,
                    dtype={"float16": "<f2", "float32": "<f4", "float64": "<f8", "int32": "<i4"}[dtype],
                ).tobytes()
            ).decode(),
        },
        st.sampled_from([0, 1, 15, 16, 17]),
        st.sampled_from(["float16", "float32", "float64", "int32"]),
        st.sampled_from([0, 1, 1e4, 6e4]),
    )
    field = st.one_of(  # (field, value): each field with values of its own kind, bad ones included
        st.tuples(st.just("mean"), arrays),
        st.tuples(st.just("fitness"), floats),
        st.tuples(st.just("sigmas"), st.lists(floats.filter(lambda f: f > 0), min_size=0, max_size=6)),
        st.tuples(st.just("mu"), st.integers(-1, 100)),
        st.tuples(st.just("n_samples"), st.integers(-1, 10**12)),
        st.tuples(
            st.just("metrics"),
            st.fixed_dictionaries(
                {"train_loss": floats, "test_accuracy": st.sampled_from([None, 0.5, 1.5, -0.1])}
            ),
        ),
    )
    changes = st.lists(field, min_size=1, max_size=3).map(dict)
    seen: set[tuple[str, int]] = set()
    watch = CommitWatch(db)

    @settings(max_examples=cases, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(change=changes, eval_round=st.integers(-1, 3))
    def one(change: dict[str, object], eval_round: int) -> None:
        before = watch()
        body = {**valid, "mean": current["mean"], "sigmas": current["sigmas"], **change}
        path = f"/v1/runs/{run_id}/rounds/{current['round']}/updates"
        r = httpx.post(f"{url}{path}", content=json.dumps(body), headers=headers)
        seen.add(("update", r.status_code))
        assert r.status_code < 500 and (r.status_code < 400 or watch() == before), (change, r.text)
        if r.status_code == 200:
            assert r.json()["duplicate"] is False and r.json()["round_closed"] is True
            next_task()
            return
        e = httpx.post(
            f"{url}/v1/runs/{run_id}/rounds/{eval_round}/eval",
            json={"test_accuracy": 0.5, "n_test": 3},
            headers=headers,
        )
        seen.add(("eval", e.status_code))
        assert e.status_code in (404, 409) and watch() == before, e.text

    one()
    assert {s for kind, s in seen if kind == "update"} - {422}, seen  # past the schema: the engine's 400s
    assert ("eval", 409) in seen or ("eval", 404) in seen, seen


@pytest.mark.parametrize("cases", CASES)
def test_inference_service_never_5xx(model_url: str, cases: int, test_output: Path) -> None:
    seen = fuzz(model_url, {}, cases)
    save(
        {"cases_per_operation": cases, "statuses": seen},
        test_output / "reliability" / f"fuzz_service_{cases}.json",
    )
    assert {"POST /v1/score", "POST /v1/tokenize", "GET /v1/model"} <= set(seen), seen
    assert httpx.get(f"{model_url}/readyz", timeout=30).status_code == 200  # still serving
