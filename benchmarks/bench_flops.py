"""How close the scoring forward comes to the machine: achieved FLOP/s of a ``/v1/score`` population
call in process (2 x non-embedding parameters x real tokens per second; attention's own products
are left out, so this slightly understates the work) vs the machine's measured float32 matmul rate
(torch.mm of 2048 x 2048 on CPU, 8192 on a GPU, in the model's dtype, best of 5). Prints the
fraction; asserts nothing on time.

Usage: .venv/bin/python benchmarks/bench_flops.py [--model PATH] [--p 20] [--b 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """The machine's measured matmul rate in ``dtype`` (n x n times n x n, best of ``repeats``)."""
    if device.type == "cuda":
        n = 8192  # a GPU needs a bigger product to reach its rate
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn: object, device: torch.device) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def non_embedding_params(backend: object) -> int:
    model = getattr(backend, "encoder", None) or getattr(backend, "base", None)
    assert model is not None, "a transformers backend"
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    other = getattr(model, "embeddings", None)  # BERT-style: position and type embeddings too
    if other is not None:
        embeddings |= {id(p) for p in other.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--p", type=int, default=20)
    parser.add_argument("--b", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="auto", help="auto: float32 on CPU, bfloat16 on GPU")
    args = parser.parse_args()
    settings = ServiceSettings(
        **({"model": args.model} if args.model else {}), device=args.device, dtype=args.dtype
    )
    backend = load_backend(settings)
    scorer = Scorer(backend, settings)
    with (DATA / "sst2" / "test.jsonl").open() as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.b), f, strict=False)]
    z = np.random.default_rng(0).normal(size=(args.p, 500)).astype(np.float32)
    request = ScoreRequest(
        projection=ProjectionSpec(seed=1, intrinsic_dim=500, prompt_length=50),
        z=Array.from_numpy(z),
        task=TASKS[backend.head],
        texts=texts,
    )
    scorer.score(request)  # warm-up
    runs = [s for s in (scorer.score(request).stats for _ in range(3)) if s is not None]
    stats = min(runs, key=lambda s: s.seconds)
    params = non_embedding_params(backend)
    achieved = 2 * params * stats.real_tokens / stats.seconds
    dtype = next(p for p in (getattr(backend, "encoder", None) or backend.base).parameters()).dtype  # type: ignore[attr-defined]
    peak = matmul_rate(backend.device, dtype)
    print(
        f"model {backend.description.model_id}: {params / 1e6:.1f} M non-embedding parameters, {torch.get_num_threads()} threads"
    )
    print(
        f"call: P={args.p} x B={args.b}, L=50: {stats.real_tokens} real tokens ({stats.padded_tokens} padded) in {stats.seconds:.2f} s"
    )
    print(f"scoring forward: {achieved / 1e9:.1f} GFLOP/s (2 x params x real tokens / s)")
    print(f"machine {str(dtype).removeprefix('torch.')} matmul on {backend.device}: {peak / 1e9:.1f} GFLOP/s")
    print(f"fraction of the matmul rate: {achieved / peak:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
