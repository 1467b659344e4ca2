"""A site client's own cost: peak RSS and CPU time per round of a real ``fedbpt client`` process
(the model's work is the service's, measured elsewhere). One client, the demo's settings
(100 SST-2 training sentences, d=100, L=5, 5 candidates x 3 generations), against a real service and
coordinator on loopback. Target: peak RSS <= 120 MB. Prints figures; asserts nothing on time.

The client runs from a client-only environment (``.venv-client``: ``pip install -e ".[client]"``,
built here on first use), as a site installs it: no torch, no matplotlib, no scipy. (In the
development environment pycma would import matplotlib and scipy, which it uses when present.)

Usage: .venv/bin/python benchmarks/bench_client.py [--rounds 3] [--examples 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedbpt_cli.services import LocalFederation  # noqa: E402
from protos import ProjectionSpec, RunConfig  # noqa: E402

DATA = Path(os.environ.get("FEDBPT_SHARED_DATA", REPO.parent / "shared" / "data"))


def client_python() -> str:
    venv = REPO / ".venv-client"
    python = venv / "bin" / "python"
    if not python.exists():
        print("building .venv-client (pip install -e '.[client]') ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", f"{REPO}[client]"], check=True)
    found = subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode == 0
    print(f"client environment {venv}: torch {'present (!)' if found else 'absent'}")
    return str(python)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=100)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    train = work / "train.jsonl"
    with (DATA / "sst2" / "train.jsonl").open() as f, train.open("w") as out:
        for _, line in zip(range(args.examples), f, strict=False):
            out.write(line)
    config = RunConfig(
        rounds=args.rounds,
        projection=ProjectionSpec(seed=1234, intrinsic_dim=100, prompt_length=5),
        local_popsize=5,
        local_iters=3,
        perturb=False,
        max_input_tokens=48,
        eval_every=0,
    )
    federation = LocalFederation(work, client_python=client_python())
    try:
        federation.start_services()
        run_id, (token,) = federation.create_run(config, 1)
        federation.start_client(0, token, train, None, poll_wait=2.0)
        client = psutil.Process(federation.clients[0].pid)
        peak, cpu = 0.0, 0.0
        done = threading.Event()

        def sample() -> None:
            nonlocal peak, cpu
            while not done.is_set():
                try:
                    peak = max(peak, client.memory_info().rss)
                    times = client.cpu_times()
                    cpu = times.user + times.system
                except psutil.NoSuchProcess:
                    return
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        federation.start_run(run_id)
        with httpx.Client(base_url=federation.coordinator_url, headers=federation.admin_headers) as http:
            while http.get(f"/v1/runs/{run_id}").json()["state"] not in ("finished", "failed"):
                time.sleep(0.5)
            wall = time.monotonic() - started
            rounds = http.get(f"/v1/runs/{run_id}/rounds").json()
        done.set()
        sampler.join()
        service_seconds = sum(p["metrics"]["seconds"] for r in rounds for p in r["participants"])
        rows = sum(p["metrics"]["service_rows"] for r in rounds for p in r["participants"])
        print(
            f"one client, {args.examples} examples, {args.rounds} rounds, {rows} rows scored, wall {wall:.1f} s"
        )
        print(f"client peak RSS: {peak / 2**20:.1f} MB (target <= 120 MB)")
        print(f"client CPU time: {cpu / args.rounds:.2f} s per round ({cpu:.1f} s in all, start-up included)")
        print(
            f"client's round time (local training incl. waiting for the service): {service_seconds / args.rounds:.1f} s per round"
        )
        print(json.dumps({"peak_rss_mb": peak / 2**20, "cpu_s_per_round": cpu / args.rounds}))
    finally:
        federation.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
