"""schemathesis against both services' OpenAPI schemas, as real processes: no 5xx, and no stored
change after a 4xx. Bounded: a few cases per operation in the default suite (CI), 500 in the slow one."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
def test_inference_service_never_5xx(model_url: str, cases: int, test_output: Path) -> None:
    seen = fuzz(model_url, {}, cases)
    save(
        {"cases_per_operation": cases, "statuses": seen},
        test_output / "reliability" / f"fuzz_service_{cases}.json",
    )
    assert {"POST /v1/score", "POST /v1/tokenize", "GET /v1/model"} <= set(seen), seen
    assert httpx.get(f"{model_url}/readyz", timeout=30).status_code == 200  # still serving
