"""The coordinator's HTTP routes, one router per group: open (health, metrics, dashboard pages),
runs (admin writes, admin or own-client reads) and client (whoami, task, updates, eval).

Each route authenticates, calls one engine method in a worker thread and serialises its answer;
the rules live in the engine. Shared objects come from ``request.app.state`` (see ``create_app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response

from coordinator import auth
from coordinator.engine import Engine
from coordinator.errors import Forbidden, Unauthorized
from coordinator.metrics import CONTENT_TYPE, CoordinatorMetrics
from coordinator.settings import CoordinatorSettings
from protos import (
    ClientIdentity,
    ClientSummary,
    ClientUpdate,
    EnrolRequest,
    EnrolResponse,
    EvalReport,
    PromptResponse,
    RoundRecord,
    RunConfig,
    RunCreated,
    RunInfo,
    Task,
    UpdateAck,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
DASHBOARD = Path(__file__).resolve().parent / "dashboard"


class RunSignals:
    """Wakes long-polling task requests when their run changes (started, round closed or re-issued,
    finished, failed). Used only on the event loop's thread."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def event(self, run_id: str) -> asyncio.Event:
        return self._events.setdefault(run_id, asyncio.Event())

    def notify(self, run_id: str) -> None:
        event = self._events.pop(run_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        for run_id in list(self._events):
            self.notify(run_id)


async def call(fn: Callable[..., T], *args: Any) -> T:
    return await run_in_threadpool(fn, *args)


def _json(model: Any, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _json_list(models: list[Any]) -> Response:
    # Each model serialises itself (typed arrays stay base64); no list round-trip through Python.
    return Response(
        b"[" + b",".join(m.model_dump_json().encode() for m in models) + b"]", media_type="application/json"
    )


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _signals(request: Request) -> RunSignals:
    signals: RunSignals = request.app.state.signals
    return signals


def _settings(request: Request) -> CoordinatorSettings:
    settings: CoordinatorSettings = request.app.state.settings
    return settings


# ----- auth dependencies (they run before the body is validated) -----
async def caller(request: Request) -> auth.Principal:
    token = auth.bearer(request.headers.get("authorization"))
    principal = await run_in_threadpool(_engine(request).principal, token)
    if principal is None:
        raise Unauthorized("unknown bearer token")
    return principal


async def admin(request: Request) -> auth.Principal:
    if not _engine(request).admin_configured:
        auth.require_admin(None, admin_configured=False)
    principal = await caller(request)
    auth.require_admin(principal, admin_configured=True)
    return principal


Caller = Annotated[auth.Principal, Depends(caller)]
Admin = Annotated[auth.Principal, Depends(admin)]
EngineDep = Annotated[Engine, Depends(_engine)]
Signals = Annotated[RunSignals, Depends(_signals)]
Settings = Annotated[CoordinatorSettings, Depends(_settings)]

open_routes = APIRouter()
run_routes = APIRouter()
client_routes = APIRouter()


# ----- open routes -----
@open_routes.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@open_routes.get("/metrics")
async def metrics_route(request: Request, engine: EngineDep) -> Response:
    metrics: CoordinatorMetrics = request.app.state.metrics
    runs, clients = await call(engine.store.gauges)  # the read-only connection: no engine lock
    metrics.set_gauges(runs, clients)
    return Response(metrics.render(), media_type=CONTENT_TYPE)


# The run dashboard: static pages that read the REST routes below with the admin token.
@open_routes.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(DASHBOARD / "static" / "index.html")


@open_routes.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
async def run_page(run_id: str) -> FileResponse:
    return FileResponse(DASHBOARD / "static" / "index.html")


# ----- runs (admin writes, admin or own-client reads) -----
@run_routes.post("/v1/runs", status_code=201, response_model=RunCreated)
async def create_run(_: Admin, engine: EngineDep, config: RunConfig | None = None) -> Response:
    run_id = await call(engine.create_run, config or RunConfig())
    return _json(RunCreated(run_id=run_id), 201)


@run_routes.get("/v1/runs", response_model=list[RunInfo])
async def list_runs(principal: Caller, engine: EngineDep) -> Response:
    def infos() -> list[RunInfo]:
        ids = engine.run_ids() if principal.is_admin else [principal.run_id or ""]
        return [engine.run_info(run_id) for run_id in ids]

    return _json_list(await call(infos))


@run_routes.get("/v1/runs/{run_id}", response_model=RunInfo)
async def get_run(run_id: str, principal: Caller, engine: EngineDep) -> Response:
    auth.require_reader(principal, run_id)
    return _json(await call(engine.run_info, run_id))


@run_routes.post("/v1/runs/{run_id}/clients", status_code=201, response_model=EnrolResponse)
async def enrol(run_id: str, _: Admin, engine: EngineDep, request: EnrolRequest) -> Response:
    return _json(await call(engine.enrol, run_id, request.name), 201)


@run_routes.get("/v1/runs/{run_id}/clients", response_model=list[ClientSummary])
async def clients(run_id: str, _: Admin, engine: EngineDep) -> Response:
    return _json_list(await call(engine.clients, run_id))


@run_routes.post("/v1/runs/{run_id}/start", response_model=RunInfo)
async def start(run_id: str, _: Admin, engine: EngineDep, signals: Signals) -> Response:
    info = await call(engine.start, run_id)
    signals.notify(run_id)
    return _json(info)


@run_routes.get("/v1/runs/{run_id}/rounds", response_model=list[RoundRecord])
async def rounds(run_id: str, principal: Caller, engine: EngineDep) -> Response:
    auth.require_reader(principal, run_id)
    return _json_list(await call(engine.rounds, run_id))


@run_routes.get("/v1/runs/{run_id}/prompt", response_model=PromptResponse)
async def prompt(run_id: str, principal: Caller, engine: EngineDep, state: str = "selected") -> Response:
    """``state``: selected (lowest validation loss; the default), final, or a state index."""
    auth.require_reader(principal, run_id)
    return _json(await call(engine.prompt, run_id, state))


# ----- client routes -----
@client_routes.get("/v1/whoami", response_model=ClientIdentity)
async def whoami(principal: Caller) -> Response:
    if principal.is_admin:
        raise Forbidden("the admin token has no client identity")
    assert principal.client_id and principal.run_id and principal.name is not None
    return _json(ClientIdentity(client_id=principal.client_id, run_id=principal.run_id, name=principal.name))


@client_routes.get("/v1/runs/{run_id}/task", response_model=Task)
async def task(
    run_id: str,
    principal: Caller,
    engine: EngineDep,
    signals: Signals,
    settings: Settings,
    wait: Annotated[
        float, Query(ge=0, le=3600, description="long-poll seconds (cut to the server's max)")
    ] = 0.0,
) -> Response:
    auth.require_client(principal, run_id)
    loop = asyncio.get_running_loop()
    until = loop.time() + min(wait, settings.max_task_wait_s)
    while True:
        event = signals.event(run_id)  # taken before looking, so no change slips through
        answer = await call(engine.task, principal, run_id)
        remaining = until - loop.time()
        if answer.kind != "wait" or remaining <= 0:
            return Response(answer.body, media_type="application/json")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), remaining)


@client_routes.post("/v1/runs/{run_id}/rounds/{round_}/updates", response_model=UpdateAck)
async def post_update(
    run_id: str,
    round_: int,
    principal: Caller,
    engine: EngineDep,
    signals: Signals,
    settings: Settings,
    update: ClientUpdate,
    request: Request,
) -> Response:
    auth.require_client(principal, run_id)
    bytes_in = len(await request.body())
    result = await call(engine.accept_update, principal, run_id, round_, update, bytes_in)
    if result.completes:
        if settings.crash_point == "after_update_commit":
            log.warning("crash_point after_update_commit: SIGKILL before closing round %d", round_)
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            if await call(engine.close_round, run_id, round_, False) != "open":
                signals.notify(run_id)
        except Exception:  # the update is safe on disk; the deadline checker closes the round
            log.exception("run %s: closing round %d after its last update failed", run_id, round_)
    return Response(result.body, media_type="application/json")


@client_routes.post("/v1/runs/{run_id}/rounds/{round_}/eval", response_model=UpdateAck)
async def post_eval(
    run_id: str, round_: int, principal: Caller, engine: EngineDep, report: EvalReport
) -> Response:
    auth.require_client(principal, run_id)
    return _json(await call(engine.record_eval, principal, run_id, round_, report))
