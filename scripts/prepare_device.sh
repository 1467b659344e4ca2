#!/usr/bin/env bash
# What a device call needs that does not travel with the checkout: the wheels the lent GPU machine lacks (its image has torch, transformers, sentence-transformers, httpx,
# rich, typer, psutil, prometheus-client, matplotlib; not pydantic, FastAPI, uvicorn or pycma), for
# its Python 3.12, into .whl/ (~4 MB), and the SST-2 test file the benchmarks read, into .devdata/
# (../shared does not travel); both git-ignored through .git/info/exclude, never committed.
# Versions: this checkout's .venv where it has them. Then: device run with carry [".whl", ".devdata"]
# and `bash benchmarks/gpu_session.sh` (docs/performance.md, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
for p in /.whl/ /.devdata/; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
mkdir -p .devdata/sst2 && cp "${FEDBPT_SHARED_DATA:-../shared/data}/sst2/test.jsonl" .devdata/sst2/
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
specs=()
for name in pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv \
            fastapi starlette uvicorn cma fastapi-offline; do
  v=$(version "$name"); specs+=("$name${v:+==$v}")
done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}" 2>&1 | grep -v "is ignored" || true
ls .whl
