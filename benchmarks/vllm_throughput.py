"""vLLM backend vs transformers backend: rows/s of one population call on the same model and machine.

Run in ``.venv-vllm`` (``make bench-vllm``): both backends load the same model in this process
(default: a tiny random Llama built from a config, head_dim 64), score P=20 candidates x B=32 SST-2
test sentences (d=500, L=50, float32), and print rows/s (median of repeats) and the largest
difference between their logits. Not part of ``make bench`` (it needs vLLM's own environment).
Prints figures; asserts nothing on time.
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from inference_service.backends import load_backend  # noqa: E402
from inference_service.random_models import build_random_model  # noqa: E402
from inference_service.scoring import Scorer  # noqa: E402
from inference_service.settings import ServiceSettings  # noqa: E402
from protos import Array, ProjectionSpec, ScoreRequest, TaskSpec  # noqa: E402

DATA = Path(os.environ.get("FEDBPT_SHARED_DATA", REPO.parent / "shared" / "data"))
TASK = TaskSpec(template="{input} . The sentiment is", labels=["negative", "positive"])


def rate(scorer: Scorer, request: ScoreRequest, repeats: int) -> tuple[float, np.ndarray]:
    logits = scorer.score(request).logits.numpy()  # warm-up (projection, caches, engine graphs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scorer.score(request)
        times.append(time.perf_counter() - start)
    rows = logits.shape[0] * logits.shape[1]
    return rows / statistics.median(times), logits


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="a causal LM folder (default: a tiny random Llama)")
    parser.add_argument("--p", type=int, default=20)
    parser.add_argument("--b", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    model = args.model or str(build_random_model("llama", Path(tempfile.mkdtemp()) / "llama"))
    with (DATA / "sst2" / "test.jsonl").open() as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(args.b), f, strict=False)]
    z = np.random.default_rng(0).normal(size=(args.p, 500)).astype(np.float32)
    request = ScoreRequest(
        projection=ProjectionSpec(seed=1, intrinsic_dim=500, prompt_length=50),
        z=Array.from_numpy(z),
        task=TASK,
        texts=texts,
    )
    common = {"model": model, "device": args.device, "dtype": args.dtype, "max_length": 256}
    vllm_settings = ServiceSettings(backend="vllm", **common)
    hf_settings = ServiceSettings(**common)
    vllm_rate, vllm_logits = rate(Scorer(load_backend(vllm_settings), vllm_settings), request, args.repeats)
    hf_rate, hf_logits = rate(Scorer(load_backend(hf_settings), hf_settings), request, args.repeats)
    print(
        f"model {model}; P={args.p} x B={args.b} = {args.p * args.b} rows, d=500, L=50, {args.dtype} on {args.device}"
    )
    print(f"vLLM backend        : {vllm_rate:9.1f} rows/s")
    print(f"transformers backend: {hf_rate:9.1f} rows/s")
    print(f"ratio vLLM / transformers: {vllm_rate / hf_rate:.2f}")
    print(f"max |vLLM - transformers| logits: {np.abs(vllm_logits - hf_logits).max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
