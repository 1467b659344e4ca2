"""Where a score request's time goes: the service's own work vs the model's forward pass.

For each model (a tiny random sentence-transformer, whose forward is small, and the embedded
MiniLM) and each request size (the results grid's: P=5 candidates x B=16 SST-2 token id lists, d=100,
L=5; and P=20 x B=32), it measures, median over repeats:

- in process, on the service's own objects: JSON parse + validation of the body
  (``ScoreRequest.model_validate_json``), ``Scorer.prepare`` (task, rows, projection, A.z),
  ``Scorer.run`` (the forward passes and the label logits), the response's JSON encoding;
- over HTTP, one client sending the same bodies one after another to a real ``fedbpt serve-model``
  process (uvicorn, the scheduler's worker thread): the whole round trip.

The service's overhead is the round trip minus ``run``; its share of the round trip is printed.
Nothing is asserted (figures move with the machine and whatever else runs on it).

    .venv/bin/python benchmarks/bench_overhead.py [--requests 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running  # noqa: E402
from protos import Array, ProjectionSpec, ScoreRequest, TaskSpec  # noqa: E402

DATA = Path(os.environ.get("FEDBPT_SHARED_DATA", REPO.parent / "shared" / "data"))
TASK = TaskSpec(template="{input}", labels=["It was terrible.", "It was great."])
SIZES = {"grid (P=5 x B=16, d=100, L=5)": (5, 16, 100, 5), "P=20 x B=32 (d=500, L=50)": (20, 32, 500, 50)}


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def request_bodies(ids: list[list[int]], size: tuple[int, int, int, int], n: int) -> list[bytes]:
    p, b, d, length = size
    spec = ProjectionSpec(seed=1234, intrinsic_dim=d, prompt_length=length)
    rng = np.random.default_rng(0)
    return [
        ScoreRequest(
            projection=spec, z=Array.from_numpy(rng.normal(size=(p, d)).astype(np.float32)), task=TASK,
            input_ids=[row[:48] for row in ids[:b]],
        ).model_dump_json().encode()
        for _ in range(n)
    ]  # fmt: skip


def in_process(model: str, threads: int, bodies: list[bytes], device: str) -> dict[str, float]:
    import torch

    from inference_service.backends import load_backend
    from inference_service.scoring import Scorer
    from inference_service.settings import ServiceSettings

    torch.set_num_threads(threads)
    settings = ServiceSettings(model=model, device=device, dtype="float32")
    scorer = Scorer(load_backend(settings), settings)
    request = ScoreRequest.model_validate_json(bodies[0])
    scorer.score(request)  # warm-up: A, the anchors, kernels
    prepared = scorer.prepare(request)
    answer = scorer.run(prepared)
    reps = len(bodies)
    return {
        "parse": median_ms(lambda: ScoreRequest.model_validate_json(bodies[0]), reps),
        "prepare": median_ms(lambda: scorer.prepare(request), reps),
        "run": median_ms(lambda: scorer.run(prepared), reps),
        "encode": median_ms(answer.model_dump_json, reps),
    }


def over_http(model: str, threads: int, bodies: list[bytes], log: Path, device: str) -> float:
    port = free_port()
    argv = fedbpt_command(
        "serve-model", "--model", model, "--port", str(port), "--device", device, "--dtype", "float32",
        "--threads", str(threads), "--log-level", "warning",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    headers = {"content-type": "application/json"}
    with (
        running(ManagedProcess("serve-model", argv, log), ready_url=f"{url}/readyz", timeout=300),
        httpx.Client(base_url=url, timeout=300, headers=headers) as http,
    ):
        for body in bodies[:3]:
            http.post("/v1/score", content=body).raise_for_status()
        it = iter(bodies * 2)
        return median_ms(lambda: http.post("/v1/score", content=next(it)).raise_for_status(), len(bodies))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=60, help="repeats per measurement")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no oversubscription when other work runs)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda (float32 either way)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-overhead")
    parser.add_argument("--models", default="tiny,MiniLM", help="tiny and/or MiniLM (the embedded one)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from inference_service.random_models import build_random_model
    from inference_service.settings import default_model_path

    tiny = str(build_random_model("st-bert", Path(tempfile.mkdtemp(prefix="fedbpt-tiny-st-"))))
    texts = [json.loads(line)["text"] for line in (DATA / "sst2" / "test.jsonl").open()][:32]
    print(
        f"device {args.device}, torch threads {args.threads}; median of {args.requests} requests; ms per request"
    )
    print(
        f"{'model':<8} {'request':<28} {'parse':>7} {'prepare':>8} {'run':>8} {'encode':>7} {'HTTP':>8} {'overhead':>9}"
    )
    chosen = args.models.split(",")
    for name, model in ((n, m) for n, m in (("tiny", tiny), ("MiniLM", "")) if n in chosen):
        model = model or str(default_model_path())
        from inference_service.backends import load_backend
        from inference_service.settings import ServiceSettings

        codec = load_backend(ServiceSettings(model=model, device="cpu")).codec
        ids = codec.encode_inputs(texts)
        for label, size in SIZES.items():
            bodies = request_bodies(ids, size, args.requests)
            parts = in_process(model, args.threads, bodies, args.device)
            http_ms = over_http(model, args.threads, bodies, args.out / f"serve-{name}.log", args.device)
            overhead = http_ms - parts["run"]
            print(
                f"{name:<8} {label:<28} {parts['parse']:>7.2f} {parts['prepare']:>8.2f} {parts['run']:>8.2f} "
                f"{parts['encode']:>7.3f} {http_ms:>8.2f} {overhead:>6.2f} ({overhead / http_ms:.0%})",
                flush=True,
            )


if __name__ == "__main__":
    main()
