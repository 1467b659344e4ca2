"""Fixtures of the client tests: small data files, a real inference service process on a tiny
random model (built once per session), a relay that records (and can lose) what a client sends
to a real service, and a stand-in HTTP server for flaky-network tests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fedbpt_cli.procs import ManagedProcess, fedbpt_command, free_port, running

SST2_SAMPLE = [
    ("a great movie , funny and good", 1),
    ("it was awful and bad , really the worst film of the year", 0),
    ("the story of the characters is funny and sad", 1),
    ("terrible", 0),
    ("a film about the story , not good", 0),
    ("great characters and a great story", 1),
    ("bad movie", 0),
    ("this is a good film", 1),
    ("not funny , sad and bad", 0),
    ("the best movie of the year", 1),
    ("awful", 0),
    ("funny", 1),
]


def write_jsonl(
    path: Path, rows: list[tuple[str, Any]], text_key: str = "text", label_key: str = "label"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text, label in rows:
            f.write(json.dumps({text_key: text, label_key: label}) + "\n")
    return path


@pytest.fixture
def sst2_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", SST2_SAMPLE)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (mlm head) with a real WordPiece tokenizer, built by the service's own
    command in a subprocess (the client tests never import torch)."""
    out = tmp_path_factory.mktemp("models") / "bert"
    log = out.parent / "make-model.log"
    proc = ManagedProcess("make-random-model", fedbpt_command("make-random-model", "bert", str(out)), log)
    proc.start()
    code = proc.wait(timeout=300)
    assert code == 0, proc.log_tail()
    return out


def _serve(
    model: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[ManagedProcess, str]:
    port = free_port()
    argv = fedbpt_command(
        "serve-model", "--model", str(model), "--port", str(port), "--device", "cpu",
        "--threads", "1", "--log-level", "warning", *extra,
    )  # fmt: skip
    return ManagedProcess("serve-model", argv, log, env=env), f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def model_url(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real inference service (``fedbpt serve-model``) on the tiny BERT, max_rows 64."""
    proc, url = _serve(tiny_bert, tmp_path_factory.mktemp("serve") / "serve-model.log", "--max-rows", "64")
    with running(proc, ready_url=f"{url}/readyz", timeout=180):
        yield url


# ----- a relay: the network between a client and a real service -----

Recorded = tuple[str, str, bytes]  # method, path, body


class Relay:
    """Forwards every request to ``target`` (a real service) and its answer back, and records them.
    Requests ``lose`` picks are recorded in ``lost`` instead and never forwarded: the connection
    closes without an answer, as when a network drops a request."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.requests: list[Recorded] = []
        self.lost: list[Recorded] = []
        self.lose: Callable[[str, str], bool] = lambda method, path: False
        self._http = httpx.Client(timeout=300)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def relay(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                record = (self.command, urlsplit(self.path).path, body)
                with relay._lock:
                    if relay.lose(record[0], record[1]):
                        relay.lost.append(record)
                        self.close_connection = True
                        return
                    relay.requests.append(record)
                keep = ("authorization", "content-type", "accept")
                headers = {k: v for k, v in self.headers.items() if k.lower() in keep}
                answer = relay._http.request(
                    self.command, relay.target + self.path, content=body, headers=headers
                )
                self.send_response(answer.status_code)
                for name in ("content-type", "retry-after"):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = relay

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> Relay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._http.close()

    def bodies(self, method: str, path_end: str) -> list[bytes]:
        """The forwarded bodies of ``method`` requests whose path ends with ``path_end``."""
        return [b for m, p, b in self.requests if m == method and p.endswith(path_end)]


@pytest.fixture
def relay() -> Iterator[Callable[[str], Relay]]:
    made: list[Relay] = []

    def make(target: str) -> Relay:
        made.append(Relay(target).start())
        return made[-1]

    yield make
    for r in made:
        r.stop()


# ----- a stand-in for a flaky network: our own tiny HTTP server, scripted per test -----


@dataclass
class Script:
    """Per path, the answers to give in order (status, json body, headers); the last one repeats."""

    answers: dict[str, list[tuple[int, Any, dict[str, str]]]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    bodies: dict[str, list[bytes]] = field(default_factory=dict)

    def on(self, path: str, *answers: tuple[int, Any] | tuple[int, Any, dict[str, str]]) -> None:
        self.answers[path] = [(a[0], a[1], a[2] if len(a) > 2 else {}) for a in answers]  # type: ignore[misc]


class StandIn:
    """A uvicorn server in a thread answering from a :class:`Script`; can be started late and
    stopped, like a service restart."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.script = Script()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _app(self) -> FastAPI:
        app = FastAPI()
        script = self.script

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def answer(path: str, request: Request) -> JSONResponse:
            key = "/" + path
            n = script.hits.get(key, 0)
            script.hits[key] = n + 1
            script.bodies.setdefault(key, []).append(await request.body())
            answers = script.answers.get(key) or [(404, {"detail": f"no route {key}"}, {})]
            status, body, headers = answers[min(n, len(answers) - 1)]
            return JSONResponse(body, status_code=status, headers=headers)

        return app

    def start(self) -> StandIn:
        import uvicorn

        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("stand-in server did not start")
            time.sleep(0.02)
        return self

    def start_later(self, delay: float) -> threading.Thread:
        def later() -> None:
            time.sleep(delay)
            self.start()

        t = threading.Thread(target=later, daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=20)


@pytest.fixture
def stand_in() -> Iterator[Callable[..., StandIn]]:
    made: list[StandIn] = []

    def make(port: int | None = None) -> StandIn:
        s = StandIn(port)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
