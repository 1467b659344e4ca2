"""TLS: both services serve HTTPS with a self-signed certificate (uvicorn's ssl settings), a client
that trusts it (``--ca-file``) completes a round over HTTPS, and one that does not is refused."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running
from protos import PromptResponse, RunConfig

ADMIN = "tls-admin-token"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made with Debian's openssl."""
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test certificate"
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def services(
    certificate: tuple[Path, Path], tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    cert, key = certificate
    root = tmp_path_factory.mktemp("tls-services")
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    model_port, coord_port = free_port(), free_port()
    model = ManagedProcess(
        "serve-model",
        fedbpt_command("serve-model", "--model", str(tiny_bert_dir), "--port", str(model_port), *tls),
        root / "model.log",
    )
    coordinator = ManagedProcess(
        "serve-coordinator",
        fedbpt_command("serve-coordinator", "--db", str(root / "c.sqlite"), "--port", str(coord_port), *tls),
        root / "coordinator.log",
        env={"FEDBPT_ADMIN_TOKEN": ADMIN},
    )
    model_url, coord_url = f"https://127.0.0.1:{model_port}", f"https://127.0.0.1:{coord_port}"
    with (
        running(model, ready_url=f"{model_url}/readyz", timeout=180),
        running(coordinator, ready_url=f"{coord_url}/healthz", timeout=120),
    ):
        yield model_url, coord_url


def test_https_with_the_certificate_and_refusals_without(
    services: tuple[str, str], certificate: tuple[Path, Path]
) -> None:
    cert, _ = certificate
    trusted = ssl.create_default_context(cafile=str(cert))
    for url in services:
        assert httpx.get(f"{url}/healthz", verify=trusted, timeout=10).status_code == 200
        with pytest.raises(httpx.ConnectError):  # the system's CAs do not know a self-signed certificate
            httpx.get(f"{url}/healthz", timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP to a TLS port gets no HTTP answer
            httpx.get(url.replace("https://", "http://") + "/healthz", timeout=10)


def test_a_client_trains_a_round_over_https(
    services: tuple[str, str], certificate: tuple[Path, Path], sst2_dir: Path, tmp_path: Path
) -> None:
    model_url, coord_url = services
    cert, _ = certificate
    trusted = ssl.create_default_context(cafile=str(cert))
    config = RunConfig(
        rounds=1, projection={"seed": 3, "intrinsic_dim": 8, "prompt_length": 2},  # type: ignore[arg-type]
        local_popsize=4, local_iters=1, max_input_tokens=16, eval_every=0,
    )  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text("".join((sst2_dir / "train.jsonl").read_text().splitlines(keepends=True)[:12]))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=coord_url, headers=admin, verify=trusted, timeout=30) as http:
        run_id = http.post("/v1/runs", json=config.model_dump(mode="json")).json()["run_id"]
        token = http.post(f"/v1/runs/{run_id}/clients", json={"name": "site"}).json()["token"]
        assert http.post(f"/v1/runs/{run_id}/start").status_code == 200
        argv = fedbpt_command(
            "client", "--coordinator", coord_url, "--model-endpoint", model_url, "--data", str(train),
            "--ca-file", str(cert), "--poll-wait", "2",
        )  # fmt: skip
        done = subprocess.run(
            argv, env={**os.environ, "FEDBPT_TOKEN": token}, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert http.get(f"/v1/runs/{run_id}").json()["state"] == "finished"
        prompt = PromptResponse.model_validate_json(http.get(f"/v1/runs/{run_id}/prompt?state=final").content)
    assert np.linalg.norm(prompt.z.numpy()) > 0
