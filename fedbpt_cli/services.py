"""The three roles started as real processes on 127.0.0.1, for ``fedbpt simulate`` and experiments.

``LocalFederation`` owns every child process: it starts the inference service and the coordinator,
creates and starts a run through the coordinator's REST API, starts one ``fedbpt client`` per site,
and stops them all (SIGTERM, then SIGKILL) however the simulation ends, Ctrl-C included.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port
from protos import EnrolResponse, RunConfig, RunCreated, RunInfo


@dataclass
class ModelServer:
    """How to start ``fedbpt serve-model`` (no model: the embedded MiniLM)."""

    model: str | None = None
    head: str | None = None
    extra_args: Sequence[str] = ()

    def argv(self, port: int) -> list[str]:
        args = ["serve-model", "--host", "127.0.0.1", "--port", str(port)]
        if self.model:
            args += ["--model", self.model]
        if self.head:
            args += ["--head", self.head]
        return fedbpt_command(*args, *self.extra_args)


@dataclass
class LocalFederation:
    workdir: Path
    model_server: ModelServer = field(default_factory=ModelServer)
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    model_url: str = ""
    coordinator_url: str = ""
    processes: list[ManagedProcess] = field(default_factory=list)
    clients: list[ManagedProcess] = field(default_factory=list)
    # The interpreter of the client processes (None: this one); e.g. a client-only environment.
    client_python: str | None = None

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.workdir / "logs" / f"{name}.log", env=env).start()
        self.processes.append(proc)
        return proc

    def start_services(self, ready_timeout: float = 300.0, model_url: str | None = None) -> None:
        """Start the model service and the coordinator and wait until both answer. With
        ``model_url`` the federation uses that running service (one service shared by many runs:
        the experiment runner) and starts only the coordinator."""
        coord_port = free_port()
        self.coordinator_url = f"http://127.0.0.1:{coord_port}"
        model = None
        if model_url is None:
            model_port = free_port()
            self.model_url = f"http://127.0.0.1:{model_port}"
            model = self._start("serve-model", self.model_server.argv(model_port))
        else:
            self.model_url = model_url.rstrip("/")
        db = self.workdir / "coordinator.sqlite"
        coordinator = self._start(
            "serve-coordinator",
            fedbpt_command(
                "serve-coordinator", "--db", str(db), "--host", "127.0.0.1", "--port", str(coord_port)
            ),
            env={"FEDBPT_ADMIN_TOKEN": self.admin_token},
        )
        coordinator.wait_http(f"{self.coordinator_url}/healthz", timeout=ready_timeout)
        if model is not None:
            model.wait_http(f"{self.model_url}/readyz", timeout=ready_timeout)

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.coordinator_url, headers=self.admin_headers, timeout=60)

    def create_run(self, config: RunConfig, sites: int) -> tuple[str, list[str]]:
        """Create the run and enrol ``sites`` clients; returns the run id and the client tokens."""
        with self.admin() as http:
            created = http.post("/v1/runs", json=config.model_dump(mode="json"))
            _check(created, "create the run")
            run_id = RunCreated.model_validate_json(created.content).run_id
            tokens = []
            for k in range(sites):
                enrolled = http.post(f"/v1/runs/{run_id}/clients", json={"name": f"site-{k}"})
                _check(enrolled, f"enrol site-{k}")
                tokens.append(EnrolResponse.model_validate_json(enrolled.content).token)
        return run_id, tokens

    def start_client(
        self, k: int, token: str, train: Path, test: Path | None, poll_wait: float = 5.0
    ) -> None:
        args = [
            "client",
            "--coordinator",
            self.coordinator_url,
            "--model-endpoint",
            self.model_url,
            "--data",
            str(train),
            "--poll-wait",
            str(poll_wait),
        ]
        if test is not None:
            args += ["--test-data", str(test)]
        # The token travels in the environment, not on the command line (visible in `ps`).
        argv = fedbpt_command(*args, python=self.client_python)
        self.clients.append(self._start(f"client-{k}", argv, env={"FEDBPT_TOKEN": token}))

    def start_run(self, run_id: str) -> RunInfo:
        with self.admin() as http:
            started = http.post(f"/v1/runs/{run_id}/start")
            _check(started, "start the run")
            return RunInfo.model_validate_json(started.content)

    def restart(self, name: str, down_s: float = 0.0) -> None:
        """Stop the process called ``name`` and start it again with the same command (same port)
        after ``down_s`` seconds: a service restart as the clients see it (fault tests)."""
        proc = next(p for p in self.processes if p.name == name)
        proc.stop()
        time.sleep(down_s)
        proc.start()

    def dead_services(self) -> list[ManagedProcess]:
        """Services (not clients) that have exited: the run cannot go on without them."""
        return [p for p in self.processes if p not in self.clients and not p.alive()]

    def stop(self) -> None:
        # Clients first (they would only retry against stopped services), then the services.
        for proc in reversed(self.processes):
            proc.stop(grace=10.0)


class SimulationError(RuntimeError):
    pass


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise SimulationError(f"could not {what}: HTTP {response.status_code}: {response.text[:500]}")
