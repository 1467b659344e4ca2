"""Bounded load on real service processes (loopback only, fixed request counts, a time cap): no
errors, every update stored once, memory stable. Small in the default suite; the slow suite runs
1,000 simulated coordinator clients and MiniLM scoring. Figures go to test-output/reliability/."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from protos import Array, ProjectionSpec, ScoreRequest, TaskSpec
from tests.conftest import SHARED_DATA
from tests.reliability.load import coordinator_load, save, score_load

ADMIN = "load-admin-token"


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    db, port = tmp_path / "c.sqlite", free_port()
    argv = fedbpt_command("serve-coordinator", "--db", str(db), "--port", str(port), "--log-level", "warning")
    proc = ManagedProcess("serve-coordinator", argv, tmp_path / "c.log", env={"FEDBPT_ADMIN_TOKEN": ADMIN})
    url = f"http://127.0.0.1:{port}"
    with running(proc, ready_url=f"{url}/healthz", timeout=120):
        yield url, proc.pid, db


@pytest.mark.parametrize("clients", [50, pytest.param(1000, marks=pytest.mark.slow)])
def test_coordinator_under_many_polling_clients(
    coordinator: tuple[str, int, Path], clients: int, test_output: Path
) -> None:
    url, pid, db = coordinator
    rounds = 2
    figures = coordinator_load(url, ADMIN, pid, clients, rounds)
    save(figures, test_output / "reliability" / f"load_coordinator_{clients}.json")
    assert figures["state"] == "finished", figures
    assert figures["participants"] == [clients] * rounds
    for part in ("enrol", "task", "update"):
        assert figures[part]["errors"] == 0, (part, figures[part])  # type: ignore[index]
    with sqlite3.connect(db) as conn:
        stored = conn.execute("SELECT COUNT(*), COUNT(DISTINCT round || client_id) FROM updates").fetchone()
    assert stored == (clients * rounds, clients * rounds)  # each update stored exactly once
    assert float(figures["rss_mb_after"]) - float(figures["rss_mb_before"]) < 200  # type: ignore[arg-type]


def _bodies(count: int, p: int, b: int, template: str, labels: list[str]) -> list[bytes]:
    texts = [
        json.loads(line)["text"] for line in (SHARED_DATA / "sst2" / "test.jsonl").read_text().splitlines()
    ]
    rng = np.random.default_rng(0)
    return [
        ScoreRequest(
            projection=ProjectionSpec(seed=1234, intrinsic_dim=100, prompt_length=5),
            z=Array.from_numpy(rng.normal(size=(p, 100)).astype(np.float32)),
            task=TaskSpec(template=template, labels=labels),
            texts=texts[i * b : (i + 1) * b],
        )
        .model_dump_json()
        .encode()
        for i in range(count)
    ]


@pytest.mark.parametrize("merging", ["auto", "merged"])
@pytest.mark.parametrize("model", ["tiny-bert", pytest.param("minilm", marks=pytest.mark.slow)])
def test_score_under_1_4_16_concurrent_clients(
    model: str, merging: str, tiny_bert: Path, tmp_path: Path, test_output: Path
) -> None:
    """No errors, bounded memory, and every answer the logits of its own request. ``merged``:
    cross-request batching forced on (CPU's default is off), so concurrent requests share forward
    passes and the scheduler hands each caller its part. Breaks caught (merged): the scheduler
    handing out the outcomes of a merged group in another order."""
    if model == "minilm":
        args, count, task = [], 48, ("{input}", ["It was terrible.", "It was great."])
    else:
        args, count, task = ["--model", str(tiny_bert)], 32, ("{input} . It was {mask} .", ["bad", "great"])
    port = free_port()
    argv = fedbpt_command("serve-model", "--port", str(port), "--log-level", "warning", *args)
    url = f"http://127.0.0.1:{port}"
    env = {"FEDBPT_CROSS_REQUEST_BATCHING": "true"} if merging == "merged" else {}
    with running(
        ManagedProcess("serve-model", argv, tmp_path / "m.log", env=env),
        ready_url=f"{url}/readyz",
        timeout=300,
    ) as proc:
        bodies = _bodies(count, 5, 16, *task)
        score_load(url, proc.pid, bodies[:2], 80, levels=(1,))  # warm-up
        figures = score_load(url, proc.pid, bodies, 80)
    save(figures, test_output / "reliability" / f"load_score_{model}_{merging}.json")
    for clients in (1, 4, 16):
        level = figures[f"{clients}_clients"]
        assert level["errors"] == 0 and level["count"] == count, level  # type: ignore[index]
        assert level["rss_mb_after"] - level["rss_mb_before"] < 300, level  # type: ignore[index]
        # Every answer is the logits of its own request: the same as sent alone, up to the last
        # bits that batching with other requests may move (float32, logits of order 10).
        assert level["compared"] == count, level  # type: ignore[index]
        assert level["max_logit_diff"] <= 1e-4 * max(1.0, level["logit_scale"]), level  # type: ignore[index,operator]
