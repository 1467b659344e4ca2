"""Benchmark of the coordinator's server aggregation: prints figures, asserts nothing on time.

1. Aggregation time per round (pycma restore + ask + tell + capture) for M = 10, 100, 1000 clients
   at d = 500, in steady state (after warm-up rounds), with pycma's eigen-decomposition made inside
   ``ask`` ("cold") and taken from the background cache the coordinator fills while clients train
   ("warm"), plus where the time goes.
2. The full round close through the coordinator's engine on a real SQLite file (updates read back,
   aggregation, the new state written with fsync, the round record, the next round opened), for
   full, low-rank (k = 8) and diagonal covariance, and the cost of encoding the next round's task state once.

Target: aggregation under 50 ms at 100 clients with full covariance.

Usage: .venv/bin/python benchmarks/bench_aggregation.py [--dim 500] [--clients 10,100,1000]
       [--rounds 5] [--threads N]   (--threads sets the BLAS threads before numpy loads)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=500)
    p.add_argument("--clients", default="10,100,1000")
    p.add_argument(
        "--rounds", type=int, default=5, help="measured rounds per setting (after 3 warm-up rounds)"
    )
    p.add_argument("--engine-rounds", type=int, default=3, help="measured round closes per engine setting")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's)")
    return p.parse_args()


ARGS = parse()
if ARGS.threads is not None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

from coordinator.aggregators import Contribution, aggregate  # noqa: E402
from coordinator.aggregators.cmaes import reference_server_sigma  # noqa: E402
from coordinator.auth import Principal  # noqa: E402
from coordinator.engine import Engine  # noqa: E402
from coordinator.es_state import EigenCache, ServerState, capture, initial_es, restore  # noqa: E402
from coordinator.settings import CoordinatorSettings  # noqa: E402
from coordinator.store import Store  # noqa: E402
from protos import Array, ClientUpdate, RunConfig  # noqa: E402

warnings.filterwarnings("ignore", module=r"cma(\.|$)")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f}"


def results_for(state: ServerState, m: int, rng: np.random.Generator, iters: int = 8) -> list[Contribution]:
    d = state.dim
    steps = rng.normal(size=(m, d)) * state.sigma * rng.uniform(0.3, 2.0, size=(m, 1))
    sigmas = state.sigma * rng.uniform(0.8, 1.0, size=(m, iters))
    return [
        Contribution(
            f"c{k:04d}", state.mean + steps[k], float(rng.uniform(0.5, 1.5)), tuple(sigmas[k]), 2, 40
        )
        for k in range(m)
    ]


def bench_aggregation(dim: int, m: int, rounds: int) -> dict[str, float]:
    """Steady-state aggregate() times, cold and warm, and a breakdown of one cold round."""
    config = RunConfig.model_validate({"projection": {"intrinsic_dim": dim}, "rounds": 200})
    rng = np.random.default_rng(m)
    state = initial_es(dim, 1.0, m, config.rounds)
    for _ in range(3):  # warm-up: countiter > 0, decompositions due as in a long run
        state = aggregate(config, state, results_for(state, m, rng), eigenmethod=np.linalg.eigh).state
    cold: list[float] = []
    warm: list[float] = []
    decomposed = 0
    for _ in range(rounds):
        results = results_for(state, m, rng)
        assert state.es is not None
        before = state.es.count_eigen
        t = time.perf_counter()
        out = aggregate(config, state, results, eigenmethod=np.linalg.eigh)
        cold.append(time.perf_counter() - t)
        cache = EigenCache()
        cache.precompute("bench", state.es.C)  # what the coordinator does while clients train
        t = time.perf_counter()
        again = aggregate(config, state, results, eigenmethod=cache)
        warm.append(time.perf_counter() - t)
        assert np.array_equal(again.state.mean, out.state.mean)
        assert out.state.es is not None
        decomposed += out.state.es.count_eigen - before
        state = out.state

    # Where the time of one cold round goes.
    results = results_for(state, m, rng)
    parts: dict[str, float] = {}
    t = time.perf_counter()
    sigma_prime = reference_server_sigma(results)
    es = restore(state, m, config.rounds, 1.0, eigenmethod=np.linalg.eigh)
    parts["restore"] = time.perf_counter() - t
    es.sigma = sigma_prime
    t = time.perf_counter()
    es.ask()
    parts["ask"] = time.perf_counter() - t
    t = time.perf_counter()
    es.tell([c.mean.copy() for c in results], [c.fitness for c in results])
    parts["tell"] = time.perf_counter() - t
    t = time.perf_counter()
    capture(es)
    parts["capture"] = time.perf_counter() - t
    return {
        "cold": statistics.median(cold),
        "warm": statistics.median(warm),
        "decompositions": decomposed / rounds,
        **parts,
    }


def bench_engine(dim: int, m: int, covariance: str, rounds: int) -> dict[str, float]:
    """Round close through the engine on a real SQLite file (fsync included)."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = CoordinatorSettings(admin_token="bench", db=Path(tmp) / "bench.db")
        store = Store(settings.db)
        engine = Engine(store, settings)
        config = RunConfig.model_validate(
            {"projection": {"intrinsic_dim": dim}, "rounds": rounds + 3, "covariance": covariance}
        )
        run_id = engine.create_run(config)
        clients = [engine.enrol(run_id, f"site-{k}") for k in range(m)]
        principals = {
            c.client_id: Principal(kind="client", client_id=c.client_id, run_id=run_id, name="")
            for c in clients
        }
        engine.start(run_id)
        rng = np.random.default_rng(7)
        closes: list[float] = []
        payloads: list[float] = []
        accepts: list[float] = []
        for round_ in range(rounds + 2):
            idx, state = engine.runs.state(run_id)
            assert idx == round_
            results = results_for(state, m, rng, iters=config.local_iters)
            t = time.perf_counter()
            for c in results[:-1]:
                update = ClientUpdate(
                    mean=Array.from_numpy(c.mean),
                    fitness=c.fitness,
                    sigmas=list(c.sigmas),
                    mu=2,
                    n_samples=40,
                )
                engine.accept_update(
                    principals[clients[int(c.client_id[1:])].client_id], run_id, round_, update, 0
                )
            accept_time = (time.perf_counter() - t) / max(1, m - 1)
            engine.wait_background()  # clients train meanwhile: the decomposition is ready
            last = results[-1]
            final = ClientUpdate(
                mean=Array.from_numpy(last.mean),
                fitness=last.fitness,
                sigmas=list(last.sigmas),
                mu=2,
                n_samples=40,
            )
            result = engine.accept_update(principals[clients[-1].client_id], run_id, round_, final, 0)
            assert result.completes
            t = time.perf_counter()
            assert engine.close_round(run_id, round_, at_deadline=False) == "closed"
            close_time = time.perf_counter() - t
            t = time.perf_counter()
            with engine.lock:
                engine.runs.payload(run_id)  # encodes the new state once for the round
            payload_time = time.perf_counter() - t
            if round_ >= 2:
                closes.append(close_time)
                payloads.append(payload_time)
                accepts.append(accept_time)
        task_bytes = len(engine.task(principals[clients[1].client_id], run_id).body)
        engine.close()
        return {
            "close": statistics.median(closes),
            "payload": statistics.median(payloads),
            "accept": statistics.median(accepts),
            "task_bytes": float(task_bytes),
        }


def main() -> None:
    sizes = [int(x) for x in ARGS.clients.split(",")]
    print(
        f"d = {ARGS.dim}; BLAS threads: {os.environ.get('OMP_NUM_THREADS', 'library default')}; cpus {os.cpu_count()}"
    )
    print("\n1. aggregate() per round, steady state (median ms); breakdown of one cold round")
    print(
        f"{'clients':>8} {'cold':>8} {'warm':>8} {'eigh/rnd':>8} {'restore':>8} {'ask':>8} {'tell':>8} {'capture':>8}"
    )
    for m in sizes:
        r = bench_aggregation(ARGS.dim, m, ARGS.rounds)
        print(
            f"{m:>8} {ms(r['cold'])} {ms(r['warm'])} {r['decompositions']:>8.2f} {ms(r['restore'])} "
            f"{ms(r['ask'])} {ms(r['tell'])} {ms(r['capture'])}"
        )
    print("   cold: pycma decomposes C inside ask when its lazy gap is reached;")
    print("   warm: the decomposition precomputed while clients train (what the coordinator does).")
    print("\n2. full round close through the engine on SQLite (median ms; fsync included)")
    print(f"{'clients':>8} {'cov':>9} {'close':>8} {'payload':>8} {'accept':>8} {'task bytes':>11}")
    for m in sizes:
        for covariance in ("full", "lowrank", "diagonal"):
            rounds = ARGS.engine_rounds if m < 1000 else max(2, ARGS.engine_rounds - 1)
            r = bench_engine(ARGS.dim, m, covariance, rounds)
            print(
                f"{m:>8} {covariance:>9} {ms(r['close'])} {ms(r['payload'])} {ms(r['accept'])} {int(r['task_bytes']):>11}"
            )
    print(
        "   close: read the updates, aggregate, write state r+1 (mean, C, B, ...), close, open r+1, commit."
    )
    print("   payload: encode the next round's task state once (cached for every client of the round);")
    print("   lowrank: rank 8 (an eigendecomposition of C per round, then (k + 1) d floats).")
    print("   accept: one accepted update (validation + its own fsynced transaction).")


if __name__ == "__main__":
    main()
