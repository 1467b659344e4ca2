"""Fixtures of the dashboard tests: a real coordinator process with a small finished run, and
Debian's Chromium driven headless by Playwright (no browser download: the machines have no internet)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from protos import ClientMetrics, EvalReport, Task
from tests.coordinator.conftest import synthetic_update

ADMIN = "dashboard-admin-token"
ROUNDS = 3
# Validation loss of states 0..ROUNDS as every site reports it: state 1 is selected.
VAL_LOSS = [0.70, 0.50, 0.60, 0.65]
SELECTED = 1
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags as root in a container with a closed network: no sandbox, no GPU, no background calls home.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@dataclass(frozen=True)
class FinishedRun:
    url: str
    run_id: str
    names: list[str]
    final_accuracy: dict[str, float]


def _drive(url: str) -> FinishedRun:
    """Create, enrol two sites, start, answer every round with synthetic updates, report the final
    evaluation: all over HTTP, as real clients would."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=url, timeout=30) as http:
        config = {
            "name": "dashboard-test",
            "rounds": ROUNDS,
            "projection": {"intrinsic_dim": 16},
            "local_iters": 3,
        }
        run_id = http.post("/v1/runs", json=config, headers=admin).json()["run_id"]
        tokens = {}
        for name in ("site-a", "site-b"):
            tokens[name] = http.post(f"/v1/runs/{run_id}/clients", json={"name": name}, headers=admin).json()[
                "token"
            ]
        assert http.post(f"/v1/runs/{run_id}/start", headers=admin).status_code == 200
        for round_ in range(ROUNDS):
            for k, token in enumerate(tokens.values()):
                bearer = {"Authorization": f"Bearer {token}"}
                task = Task.model_validate_json(
                    http.get(f"/v1/runs/{run_id}/task", params={"wait": 10}, headers=bearer).content
                )
                assert task.kind == "train" and task.round == round_, task
                metrics = ClientMetrics(
                    train_loss=0.7 - 0.1 * round_,
                    test_accuracy=0.6 + 0.05 * round_ + 0.01 * k,
                    n_test=50,
                    val_loss=VAL_LOSS[round_],
                    val_accuracy=0.7,
                    n_val=2,
                )
                update = synthetic_update(task, seed=10 * round_ + k, metrics=metrics)
                r = http.post(f"/v1/runs/{run_id}/rounds/{round_}/updates", content=update.model_dump_json(),
                              headers={**bearer, "Content-Type": "application/json"})  # fmt: skip
                assert r.status_code == 200, r.text
        final = {"site-a": 0.8, "site-b": 0.84}
        for name, token in tokens.items():
            report = EvalReport(
                test_accuracy=final[name], n_test=50, val_loss=VAL_LOSS[ROUNDS], val_accuracy=0.7, n_val=2
            )
            r = http.post(f"/v1/runs/{run_id}/rounds/{ROUNDS - 1}/eval", content=report.model_dump_json(),
                          headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == 200, r.text
        assert http.get(f"/v1/runs/{run_id}", headers=admin).json()["state"] == "finished"
    return FinishedRun(url, run_id, list(tokens), final)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedRun]:
    root = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    argv = fedbpt_command("serve-coordinator", "--db", str(root / "runs.sqlite"), "--port", str(port))
    proc = ManagedProcess(
        "serve-coordinator", argv, root / "coordinator.log", env={"FEDBPT_ADMIN_TOKEN": ADMIN}
    )
    url = f"http://127.0.0.1:{port}"
    with running(proc, ready_url=f"{url}/healthz", timeout=120):
        yield _drive(url)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium is missing at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
