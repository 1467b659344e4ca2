"""The FastAPI app of the coordinator: ``create_app(settings)``.

``uvicorn --factory coordinator.app:app_from_env`` builds one from ``FEDBPT_*``. The SQLite file is
opened when the app is created; at startup the app settles open rounds (a crash may have left one
complete or past its deadline) and then checks deadlines every ``deadline_check_interval_s``.

Auth (docs/coordinator.md): admin routes need ``FEDBPT_ADMIN_TOKEN``; task, update, eval and whoami
need a client token of that run; read routes (runs, rounds, prompt) take either, a client seeing
only its own run. /healthz, /metrics and / are open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from coordinator import auth
from coordinator.engine import Engine
from coordinator.errors import ApiError, Forbidden, Unauthorized
from coordinator.metrics import CONTENT_TYPE, CoordinatorMetrics
from coordinator.middleware import GuardMiddleware
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store
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


def _validation_detail(errors: Any) -> list[dict[str, Any]]:
    """pydantic's errors without ``input`` (which may echo whole arrays) or ``ctx`` objects."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]


def _json(model: Any, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _json_list(models: list[Any]) -> Response:
    # Each model serialises itself (typed arrays stay base64); no list round-trip through Python.
    return Response(
        b"[" + b",".join(m.model_dump_json().encode() for m in models) + b"]", media_type="application/json"
    )


# ----- auth dependencies (they run before the body is validated) -----
async def caller(request: Request) -> auth.Principal:
    engine: Engine = request.app.state.engine
    token = auth.bearer(request.headers.get("authorization"))
    principal = await run_in_threadpool(engine.principal, token)
    if principal is None:
        raise Unauthorized("unknown bearer token")
    return principal


async def admin(request: Request) -> auth.Principal:
    engine: Engine = request.app.state.engine
    if not engine.admin_configured:
        auth.require_admin(None, admin_configured=False)
    principal = await caller(request)
    auth.require_admin(principal, admin_configured=True)
    return principal


Caller = Annotated[auth.Principal, Depends(caller)]
Admin = Annotated[auth.Principal, Depends(admin)]


def create_app(settings: CoordinatorSettings | None = None) -> FastAPI:
    settings = settings or CoordinatorSettings()
    metrics = CoordinatorMetrics()
    store = Store(settings.db)
    engine = Engine(store, settings, hooks=metrics)
    signals = RunSignals()

    async def call(fn: Callable[..., T], *args: Any) -> T:
        return await run_in_threadpool(fn, *args)

    async def deadline_loop() -> None:
        while True:
            await asyncio.sleep(settings.deadline_check_interval_s)
            try:
                for run_id in await call(engine.check_rounds):
                    signals.notify(run_id)
            except Exception:  # keep checking; the next pass retries
                log.exception("deadline check failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for run_id in await call(engine.resume):
            signals.notify(run_id)
        checker = asyncio.get_running_loop().create_task(deadline_loop())
        try:
            yield
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            signals.notify_all()
            await call(engine.close)

    app = FastAPI(
        title="fedbpt coordinator",
        description="Runs, rounds and server-level CMA-ES aggregation of federated black-box prompt tuning.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_detail(exc.errors())}, status_code=422)

    # ----- open routes -----
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        def refresh() -> None:
            with engine.lock:
                metrics.runs.clear()
                for row in store.all("SELECT state, COUNT(*) AS n FROM runs GROUP BY state"):
                    metrics.runs.labels(row["state"]).set(row["n"])
                count = store.one("SELECT COUNT(*) AS n FROM clients")
                metrics.clients.set(count["n"] if count else 0)

        await call(refresh)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # The run dashboard: static pages that read the REST routes below with the admin token.
    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD / "static"), name="dashboard")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(DASHBOARD / "static" / "index.html")

    @app.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
    async def run_page(run_id: str) -> FileResponse:
        return FileResponse(DASHBOARD / "static" / "index.html")

    # ----- runs (admin writes, admin or own-client reads) -----
    @app.post("/v1/runs", status_code=201, response_model=RunCreated)
    async def create_run(_: Admin, config: RunConfig | None = None) -> Response:
        run_id = await call(engine.create_run, config or RunConfig())
        return _json(RunCreated(run_id=run_id), 201)

    @app.get("/v1/runs", response_model=list[RunInfo])
    async def list_runs(principal: Caller) -> Response:
        def infos() -> list[RunInfo]:
            ids = engine.run_ids() if principal.is_admin else [principal.run_id or ""]
            return [engine.run_info(run_id) for run_id in ids]

        found = await call(infos)
        return _json_list(found)

    @app.get("/v1/runs/{run_id}", response_model=RunInfo)
    async def get_run(run_id: str, principal: Caller) -> Response:
        auth.require_reader(principal, run_id)
        return _json(await call(engine.run_info, run_id))

    @app.post("/v1/runs/{run_id}/clients", status_code=201, response_model=EnrolResponse)
    async def enrol(run_id: str, _: Admin, request: EnrolRequest) -> Response:
        return _json(await call(engine.enrol, run_id, request.name), 201)

    @app.get("/v1/runs/{run_id}/clients", response_model=list[ClientSummary])
    async def clients(run_id: str, _: Admin) -> Response:
        found = await call(engine.clients, run_id)
        return _json_list(found)

    @app.post("/v1/runs/{run_id}/start", response_model=RunInfo)
    async def start(run_id: str, _: Admin) -> Response:
        info = await call(engine.start, run_id)
        signals.notify(run_id)
        return _json(info)

    @app.get("/v1/runs/{run_id}/rounds", response_model=list[RoundRecord])
    async def rounds(run_id: str, principal: Caller) -> Response:
        auth.require_reader(principal, run_id)
        found = await call(engine.rounds, run_id)
        return _json_list(found)

    @app.get("/v1/runs/{run_id}/prompt", response_model=PromptResponse)
    async def prompt(run_id: str, principal: Caller, state: str = "selected") -> Response:
        """``state``: selected (lowest validation loss; the default), final, or a state index."""
        auth.require_reader(principal, run_id)
        return _json(await call(engine.prompt, run_id, state))

    # ----- client routes -----
    @app.get("/v1/whoami", response_model=ClientIdentity)
    async def whoami(principal: Caller) -> Response:
        if principal.is_admin:
            raise Forbidden("the admin token has no client identity")
        assert principal.client_id and principal.run_id and principal.name is not None
        return _json(
            ClientIdentity(client_id=principal.client_id, run_id=principal.run_id, name=principal.name)
        )

    @app.get("/v1/runs/{run_id}/task", response_model=Task)
    async def task(
        run_id: str,
        principal: Caller,
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

    @app.post("/v1/runs/{run_id}/rounds/{round_}/updates", response_model=UpdateAck)
    async def post_update(
        run_id: str, round_: int, principal: Caller, update: ClientUpdate, request: Request
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

    @app.post("/v1/runs/{run_id}/rounds/{round_}/eval", response_model=UpdateAck)
    async def post_eval(run_id: str, round_: int, principal: Caller, report: EvalReport) -> Response:
        auth.require_client(principal, run_id)
        return _json(await call(engine.record_eval, principal, run_id, round_, report))

    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory coordinator.app:app_from_env``: settings from the environment only."""
    return create_app(CoordinatorSettings())
