"""Benchmark of ``POST /v1/score``: prints figures, asserts nothing on time.

1. rows/s of one population call (P=20 candidates x B=32 SST-2 test sentences, d=500, L=50) over
   HTTP to a real ``fedbpt serve-model`` process vs the same call on the backend in this process
   (the scorer object, no HTTP); the two are interleaved after a warm-up; the ratio (target >= 0.95).
2. request size in bytes: z [P, d] + projection spec vs dense prompt_embeds [P, L, hidden]
   (float32 and float16) for the same prompts.
3. padding waste (padded / real tokens) with and without length bucketing.

Usage: .venv/bin/python benchmarks/bench_score.py [--repeats 3] [--model PATH] [--p 20] [--b 32]
(default model: the embedded MiniLM, on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running  # noqa: E402
from inference_service.backends import load_backend  # noqa: E402
from inference_service.scoring import Scorer  # noqa: E402
from inference_service.settings import ServiceSettings  # noqa: E402
from protos import Array, ProjectionSpec, ScoreRequest, TaskSpec  # noqa: E402

DATA = Path(os.environ.get("FEDBPT_SHARED_DATA", REPO.parent / "shared" / "data"))
TASKS = {
    "embedding": TaskSpec(template="{input}", labels=["It was terrible.", "It was great."]),
    "mlm": TaskSpec(template="{input} . It was {mask} .", labels=["bad", "great"]),
    "causal": TaskSpec(template="{input} . The sentiment is", labels=["negative", "positive"]),
}


def sst2_sentences(n: int) -> list[str]:
    path = DATA / "sst2" / "test.jsonl"
    with path.open() as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f, strict=False)]


def padding(scorer: Scorer, request: ScoreRequest, budget: int, bucketing: bool) -> tuple[int, int, int]:
    scorer.max_batch_tokens, scorer.bucketing = budget, bucketing
    prepared = scorer.prepare(request)
    lengths = prepared.seqs.lengths
    b = prepared.num_inputs
    padded = sum(len(c) * max(lengths[r % b] for r in c) for c in prepared.chunks)
    return sum(lengths) * prepared.num_prompts, padded, len(prepared.chunks)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model path or id (default: the embedded MiniLM)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--p", type=int, default=20)
    parser.add_argument("--b", type=int, default=32)
    parser.add_argument("--d", type=int, default=500)
    parser.add_argument("--l", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    overrides = {"device": args.device}
    if args.model:
        overrides["model"] = args.model
    settings = ServiceSettings(**overrides)
    backend = load_backend(settings)
    scorer = Scorer(backend, settings)
    info = scorer.model_info()
    texts = sst2_sentences(args.b)
    z = (np.random.default_rng(0).normal(size=(args.p, args.d)) * 0.5).astype(np.float32)
    spec = ProjectionSpec(seed=1234, intrinsic_dim=args.d, prompt_length=args.l)
    request = ScoreRequest(projection=spec, z=Array.from_numpy(z), task=TASKS[info.head], texts=texts)
    body = request.model_dump_json().encode()
    rows = args.p * args.b
    print(f"model {info.model_id} ({info.head}, hidden {info.hidden_size}) on {args.device}, {info.dtype}")
    print(f"call: P={args.p} x B={args.b} = {rows} rows, d={args.d}, L={args.l}, SST-2 test sentences")

    port = free_port()
    argv = fedbpt_command(
        "serve-model", "--port", str(port), "--device", args.device, "--log-level", "warning"
    )
    if args.model:
        argv += ["--model", args.model]
    log = Path(tempfile.mkdtemp(prefix="bench-score-")) / "serve-model.log"
    url = f"http://127.0.0.1:{port}"
    in_process: list[float] = []
    over_http: list[float] = []
    server = ManagedProcess("serve-model", argv, log)
    headers = {"content-type": "application/json"}
    with (
        running(server, ready_url=f"{url}/readyz", timeout=300),
        httpx.Client(base_url=url, timeout=600, headers=headers) as client,
    ):

        def http_call() -> np.ndarray:
            r = client.post("/v1/score", content=body)
            r.raise_for_status()
            return Array.model_validate(r.json()["logits"]).numpy()

        local = scorer.score(request).logits.numpy()  # warm-up both sides
        remote = http_call()
        print(f"max |HTTP - in-process| logits: {np.abs(local - remote).max():.2e}")
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both
            t = time.perf_counter()
            scorer.score(request)
            in_process.append(time.perf_counter() - t)
            t = time.perf_counter()
            http_call()
            over_http.append(time.perf_counter() - t)

    def rate(times: list[float]) -> float:
        return rows / statistics.median(times)

    r_local, r_http = rate(in_process), rate(over_http)
    print(
        f"in-process: {r_local:8.1f} rows/s (median of {args.repeats}; calls {', '.join(f'{t:.2f}' for t in in_process)} s)"
    )
    print(
        f"over HTTP : {r_http:8.1f} rows/s (median of {args.repeats}; calls {', '.join(f'{t:.2f}' for t in over_http)} s)"
    )
    print(f"ratio HTTP / in-process: {r_http / r_local:.3f} (target >= 0.95)")

    # Request sizes for the same prompts.
    prepared = scorer.prepare(request)
    codec = backend.codec
    assert request.projection is not None
    ids = codec.prompt_ids(args.l, request.projection.p0_text)
    p0 = backend.placeholder_embeddings(ids, prepared.seqs.prompt_start)
    assert prepared.prompts is not None
    embeds = (p0[None] + prepared.prompts).cpu().numpy()
    sizes = {"z + projection": len(body)}
    for dtype in ("float32", "float16"):
        dense = ScoreRequest(prompt_embeds=Array.from_numpy(embeds, dtype), task=request.task, texts=texts)  # type: ignore[arg-type]
        sizes[f"prompt_embeds {dtype}"] = len(dense.model_dump_json().encode())
    print("request body sizes:")
    for name, size in sizes.items():
        print(f"  {name:24s} {size:>12,d} bytes  ({size / sizes['z + projection']:.1f}x)")

    print("padding waste (padded / real tokens):")
    for budget in (scorer.max_batch_tokens, 4096):
        for bucketing in (True, False):
            real, padded, passes = padding(scorer, request, budget, bucketing)
            label = "bucketed" if bucketing else "in order"
            print(
                f"  budget {budget:6d} tokens, {label:8s}: {padded / real:.3f} ({passes} forward passes, {real} real tokens)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
