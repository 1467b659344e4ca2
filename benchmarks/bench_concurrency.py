"""Load on one inference service from 1, 4 and 16 concurrent clients (loopback only, a fixed number
of requests, a time cap), with cross-request batching on and off. Prints throughput (rows/s),
latency p50/p99, errors and the service's memory before and after; asserts nothing on time.

Each request is what a demo client sends per generation: P=5 candidates x B=16 SST-2 sentences,
d=100, L=5 (small calls, where merging requests pays). Usage:
.venv/bin/python benchmarks/bench_concurrency.py [--requests 48] [--model PATH] [--device cuda]
    [--clients 1,16,64] [--p 20 --b 32 --d 500 --l 50] [--batching off,on]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running  # noqa: E402
from protos import Array, ProjectionSpec, ScoreRequest, TaskSpec  # noqa: E402

DATA = Path(os.environ.get("FEDBPT_SHARED_DATA", REPO.parent / "shared" / "data"))
TASK = TaskSpec(template="{input}", labels=["It was terrible.", "It was great."])
TIME_CAP_S = 300.0


# The task per head (the model's own /v1/model says which): an embedding model scores anchors,
# a masked or causal LM label words.
TASKS = {
    "embedding": TASK,
    "mlm": TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]),
    "causal": TaskSpec(template="{input} . The sentiment is", labels=["negative", "positive"]),
}


def bodies(n: int, p: int, b: int, head: str = "embedding", d: int = 100, length: int = 5) -> list[bytes]:
    with (DATA / "sst2" / "test.jsonl").open() as f:
        texts = [json.loads(line)["text"] for line in f]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        request = ScoreRequest(
            projection=ProjectionSpec(seed=1234, intrinsic_dim=d, prompt_length=length),
            z=Array.from_numpy(rng.normal(size=(p, d)).astype(np.float32)),
            task=TASKS[head],
            texts=texts[(i * b) % 800 : (i * b) % 800 + b],
        )
        out.append(request.model_dump_json().encode())
    return out


def load(url: str, payloads: list[bytes], clients: int, rows_per_request: int) -> dict[str, float]:
    """``clients`` threads share the payloads; each sends its share one after another."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + TIME_CAP_S

    def client(k: int) -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=120, headers={"content-type": "application/json"}) as http:
            for body in payloads[k::clients]:
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                r = http.post("/v1/score", content=body)
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "requests": len(latencies),
        "rows_per_s": len(latencies) * rows_per_request / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * q[98],
        "errors": errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--p", type=int, default=5)
    parser.add_argument("--b", type=int, default=16)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--l", type=int, default=5, help="prompt length L")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: the service's)")
    parser.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 (default: the service's)")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument("--batching", default="off,on", help="cross-request batching settings to run")
    args = parser.parse_args()
    rows = args.p * args.b
    levels = [int(c) for c in args.clients.split(",")]
    print(
        f"requests of P={args.p} x B={args.b} = {rows} rows (d={args.d}, L={args.l}), {args.requests} per level, loopback"
    )
    print(
        f"{'batching':>9} {'clients':>7} {'rows/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'RSS MB before -> after':>24}"
    )
    results: dict[tuple[bool, int], float] = {}
    for merge in (setting == "on" for setting in args.batching.split(",")):
        port = free_port()
        argv = fedbpt_command("serve-model", "--port", str(port), "--log-level", "warning")
        for flag, value in (("--model", args.model), ("--device", args.device), ("--dtype", args.dtype)):
            if value:
                argv += [flag, value]
        env = {"FEDBPT_CROSS_REQUEST_BATCHING": str(merge).lower()}
        log = Path(tempfile.mkdtemp()) / "serve.log"
        url = f"http://127.0.0.1:{port}"
        with running(
            ManagedProcess("serve-model", argv, log, env=env), ready_url=f"{url}/readyz", timeout=300
        ) as proc:
            head = httpx.get(f"{url}/v1/model", timeout=30).json()["head"]
            payloads = bodies(args.requests, args.p, args.b, head, args.d, args.l)
            load(url, payloads[:4], 1, rows)  # warm-up: projection, task cache, allocator
            for clients in levels:
                before = psutil.Process(proc.pid).memory_info().rss / 2**20
                r = load(url, payloads, clients, rows)
                after = psutil.Process(proc.pid).memory_info().rss / 2**20
                results[(merge, clients)] = r["rows_per_s"]
                print(
                    f"{'on' if merge else 'off':>9} {clients:>7} {r['rows_per_s']:>8.1f} {r['p50_ms']:>8.0f} "
                    f"{r['p99_ms']:>8.0f} {int(r['errors']):>6} {before:>11.0f} -> {after:.0f}"
                )
    for clients in levels[1:] if len(results) == 2 * len(levels) else []:
        print(
            f"{clients} clients: batching on / off = {results[(True, clients)] / results[(False, clients)]:.2f}; "
            f"vs {levels[0]} client(s) (on): {results[(True, clients)] / results[(True, levels[0])]:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
