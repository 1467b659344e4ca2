"""Model loading stays offline unless asked. ``fedbpt serve-model`` with a Hub id that is not in the
local cache, or with a folder that does not exist, exits 2 at once with what to do, and no request
reaches the hub; ``--allow-download`` lets the request go. The "hub" here is a local HTTP server
(``HF_ENDPOINT``) that answers 404 to everything and counts the requests.

Break seen to fail: without ``check_model_source`` (and with the hub client left online) the
offline call reaches the hub; without the folder check a mistyped path gets the hub's repo-id error.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from fedbpt_cli.procs import fedbpt_command, free_port


class _Hub(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def _answer(self) -> None:
        _Hub.requests.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[list[str]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    _Hub.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    os.environ["_TEST_HUB"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield _Hub.requests
    finally:
        server.shutdown()
        del os.environ["_TEST_HUB"]


def _serve(model: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "FEDBPT_"))}
    env |= {"HF_ENDPOINT": os.environ["_TEST_HUB"], "HF_HOME": str(tmp_path / "hf-home")}
    argv = fedbpt_command(
        "serve-model",
        "--model",
        model,
        "--head",
        "mlm",
        "--port",
        str(free_port()),
        "--device",
        "cpu",
        *extra,
    )
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)


def test_a_hub_id_not_in_the_cache_fails_at_once_without_the_network(hub: list[str], tmp_path: Path) -> None:
    done = _serve("roberta-large", tmp_path)
    assert done.returncode == 2, done.stderr
    assert "not in the Hugging Face cache" in done.stderr and "--allow-download" in done.stderr
    assert hub == []


def test_a_missing_folder_says_so(hub: list[str], tmp_path: Path) -> None:
    done = _serve("./models/robrta-large", tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no such model folder" in done.stderr and str(tmp_path / "models" / "robrta-large") in done.stderr
    assert hub == []


def test_allow_download_asks_the_hub(hub: list[str], tmp_path: Path) -> None:
    done = _serve("roberta-large", tmp_path, "--allow-download")
    assert done.returncode == 2, done.stderr  # this "hub" has no such model
    assert any("roberta-large" in path for path in hub)


def test_the_vllm_backend_refuses_a_head_it_does_not_serve(hub: list[str], tmp_path: Path) -> None:
    from inference_service.settings import default_model_path

    done = _serve(str(default_model_path()), tmp_path, "--backend", "vllm")  # _serve asks for mlm
    assert done.returncode == 2, done.stderr
    assert "the vLLM backend serves the causal head only, not 'mlm'" in done.stderr
    assert hub == []


def test_the_vllm_backend_says_when_it_is_not_installed(hub: list[str], tmp_path: Path) -> None:
    # The main environment never holds vLLM (it lives in .venv-vllm, `make setup-vllm`).
    from inference_service.settings import default_model_path

    done = _serve(str(default_model_path()), tmp_path, "--backend", "vllm", "--head", "causal")
    assert done.returncode == 2, done.stderr
    assert "the vLLM backend is not available here: vllm is not installed" in done.stderr
    assert "make setup-vllm" in done.stderr and "Traceback" not in done.stderr
    assert hub == []
