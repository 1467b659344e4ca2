"""Bounded load on the real services over loopback (a fixed number of requests and a time cap):
figures for docs/reliability.md and the checks of tests/reliability/test_load.py."""

from __future__ import annotations

import functools
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil

from protos import ScoreResponse, Task
from tests.coordinator.conftest import synthetic_update

TIME_CAP_S = 600.0


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)
    errors: int = 0

    def add(self, started: float, ok: bool) -> None:
        self.seconds.append(time.perf_counter() - started)
        self.errors += not ok

    def summary(self) -> dict[str, float]:
        s = sorted(self.seconds) or [0.0]
        return {
            "count": len(self.seconds),
            "errors": self.errors,
            "p50_ms": 1000 * statistics.median(s),
            "p99_ms": 1000 * s[min(len(s) - 1, int(0.99 * len(s)))],
        }


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def coordinator_load(
    url: str, admin_token: str, pid: int, clients: int, rounds: int, workers: int = 64
) -> dict[str, object]:
    """``clients`` simulated sites of one run, each polling its task and uploading once a round."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    config = {
        "rounds": rounds, "min_clients": clients, "round_timeout_s": TIME_CAP_S,
        "projection": {"intrinsic_dim": 100}, "local_iters": 2, "covariance": "diagonal", "eval_every": 0,
    }  # fmt: skip
    deadline = time.monotonic() + TIME_CAP_S
    with httpx.Client(base_url=url, headers=admin, timeout=60) as http:
        run_id = http.post("/v1/runs", json=config).json()["run_id"]
        enrol, tokens = Latencies(), []
        for k in range(clients):
            start = time.perf_counter()
            r = http.post(f"/v1/runs/{run_id}/clients", json={"name": f"site-{k}"})
            enrol.add(start, r.status_code == 201)
            tokens.append(r.json()["token"])
        assert http.post(f"/v1/runs/{run_id}/start").status_code == 200
        before = rss_mb(pid)
        task_lat, update_lat = Latencies(), Latencies()
        round_walls = []

        def site_round(token: str, round_: int) -> None:
            bearer = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, headers=bearer, timeout=60) as site:
                while time.monotonic() < deadline:
                    start = time.perf_counter()
                    r = site.get(f"/v1/runs/{run_id}/task", params={"wait": 0})
                    task_lat.add(start, r.status_code == 200)
                    task = Task.model_validate_json(r.content)
                    if task.kind == "train" and task.round == round_:
                        break
                    time.sleep(0.05)
                body = synthetic_update(task, seed=round_ * 100_000 + hash(token) % 100_000).model_dump_json()
                start = time.perf_counter()
                r = site.post(f"/v1/runs/{run_id}/rounds/{round_}/updates", content=body,
                              headers={"Content-Type": "application/json"})  # fmt: skip
                update_lat.add(start, r.status_code == 200)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for round_ in range(rounds):
                started = time.perf_counter()
                list(pool.map(functools.partial(site_round, round_=round_), tokens))
                while (
                    http.get(f"/v1/runs/{run_id}").json()["round"] <= round_ and time.monotonic() < deadline
                ):
                    time.sleep(0.05)
                round_walls.append(time.perf_counter() - started)
        info = http.get(f"/v1/runs/{run_id}").json()
        records = http.get(f"/v1/runs/{run_id}/rounds").json()
    return {
        "clients": clients,
        "rounds": rounds,
        "state": info["state"],
        "participants": [len(r["participants"]) for r in records],
        "enrol": enrol.summary(),
        "task": task_lat.summary(),
        "update": update_lat.summary(),
        "round_wall_s": round_walls,
        "aggregation_ms": [1000 * (r["aggregation_seconds"] or 0) for r in records],
        "rss_mb_before": before,
        "rss_mb_after": rss_mb(pid),
    }


def score_load(
    url: str, pid: int, bodies: list[bytes], rows: int, levels: tuple[int, ...] = (1, 4, 16)
) -> dict[str, object]:
    """The same requests sent by 1, 4 and 16 concurrent clients in turn. Each level also reports
    how far its logits are from the first level's for the same request (``max_logit_diff``): the
    service batches concurrent requests together, which may move the last bits, never more."""
    results: dict[str, object] = {"rows_per_request": rows, "requests_per_level": len(bodies)}
    deadline = time.monotonic() + TIME_CAP_S
    first: dict[int, np.ndarray] = {}
    for clients in levels:
        lat = Latencies()
        before = rss_mb(pid)
        answers: dict[int, np.ndarray] = {}

        def client(k: int, clients: int, lat: Latencies, answers: dict[int, np.ndarray]) -> None:
            with httpx.Client(
                base_url=url, timeout=300, headers={"content-type": "application/json"}
            ) as http:
                for i in range(k, len(bodies), clients):
                    if time.monotonic() > deadline:
                        return
                    start = time.perf_counter()
                    response = http.post("/v1/score", content=bodies[i])
                    lat.add(start, response.status_code == 200)
                    if response.status_code == 200:
                        answers[i] = ScoreResponse.model_validate_json(response.content).logits.numpy()

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            work = functools.partial(client, clients=clients, lat=lat, answers=answers)
            list(pool.map(work, range(clients)))
        wall = time.perf_counter() - started
        first = first or answers
        diffs = [float(np.max(np.abs(answers[i] - first[i]))) for i in answers if i in first]
        results[f"{clients}_clients"] = {
            **lat.summary(),
            "rows_per_s": lat.summary()["count"] * rows / wall,
            "rss_mb_before": before,
            "rss_mb_after": rss_mb(pid),
            "compared": len(diffs),
            "max_logit_diff": max(diffs) if diffs else None,
            "logit_scale": max(float(np.max(np.abs(a))) for a in answers.values()) if answers else None,
        }
    return results


def save(figures: dict[str, object], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2))
