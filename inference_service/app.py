"""The FastAPI app of the inference service: ``create_app(settings, backend=None)``.

With a backend given (tests, benchmarks) the app serves it at once; without one it loads
``settings.model`` on the model thread at startup, and ``/readyz`` says 503 until it is loaded.
``uvicorn --factory inference_service.app:app_from_env`` builds one from ``FEDBPT_*``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from inference_service.backends.base import Backend
from inference_service.errors import BadRequest, ServiceError, Unavailable
from inference_service.input_store import InputsTooLarge, InputStore
from inference_service.metrics import CONTENT_TYPE, ServiceMetrics
from inference_service.middleware import TENANT_KEY, GuardMiddleware
from inference_service.scheduler import Scheduler
from inference_service.scoring import Scorer
from inference_service.settings import ServiceSettings
from protos.arrays import Array
from protos.frames import PACKED_IDS, SCORE_FRAME, accepts, encode_score_frame
from protos.inputs import HandleScoreRequest, InputsHandle, InputsRegistration, PackedIds
from protos.scoring import ModelInfo, ScoreRequest, ScoreResponse, TokenizeRequest, TokenizeResponse

log = logging.getLogger(__name__)


class ServiceState:
    """The app's moving parts: settings, metrics, the model worker and (once loaded) the scorer."""

    def __init__(self, settings: ServiceSettings, backend: Backend | None) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()
        self.scheduler = Scheduler(
            settings.max_queue,
            self.metrics,
            window_s=settings.batch_window_ms / 1000,
            merge=bool(settings.cross_request_batching),
        )
        self.backend = backend
        self.inputs = InputStore(settings.input_cache_bytes, settings.input_ttl_s, self.metrics)
        self.scorer: Scorer | None = None
        self.load_error: str | None = None
        self._loading: asyncio.Task[None] | None = None

    def _build_scorer(self) -> Scorer:
        if self.backend is None:
            from inference_service.backends import load_backend

            self.backend = load_backend(self.settings)
        if self.settings.cross_request_batching is None:
            # Auto: merging fills a GPU, and vLLM batches whatever one call brings; with the
            # transformers backend on CPU it measured slower (benchmarks/bench_concurrency.py).
            described = self.backend.description
            self.scheduler.merging = described.backend == "vllm" or not described.device.startswith("cpu")
        return Scorer(self.backend, self.settings, on_forward=self.metrics.observe_forward)

    async def _load(self) -> None:
        try:
            self.scorer = await self.scheduler.submit(self._build_scorer)
            log.info("model ready: %s", self.scorer.model_info().model_dump_json())
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("the model failed to load")

    def ensure_started(self) -> None:
        """Start the worker and the model load (idempotent; also works without the lifespan)."""
        self.scheduler.start()
        if (
            self.scorer is None
            and self.load_error is None
            and (self._loading is None or self._loading.done())
        ):
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await asyncio.shield(self._loading)

    def ready_scorer(self) -> Scorer:
        self.ensure_started()
        if self.scorer is not None:
            return self.scorer
        if self.load_error is not None:
            raise Unavailable(f"the model failed to load: {self.load_error}")
        raise Unavailable("the model is still loading; retry shortly")

    async def stop(self) -> None:
        await self.scheduler.stop()
        if self.backend is not None:
            self.backend.close()  # an engine process (vLLM) stops with the service


def _validation_detail(errors: Any) -> list[dict[str, Any]]:
    """pydantic's errors without ``input`` (which may echo megabytes of base64) or ``ctx`` objects."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]


def create_app(settings: ServiceSettings | None = None, backend: Backend | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    state = ServiceState(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.ensure_started()
        if backend is not None:
            await state.wait_loaded()  # a given backend is ready within the startup
        yield
        await state.stop()

    app = FastAPIOffline(  # /docs loads Swagger UI from the package: no CDN, air-gapped sites too
        title="fedbpt inference service",
        description="Scores soft prompts (BBT/FedBPT) on a model it never shows.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state
    app.add_middleware(
        GuardMiddleware,
        api_keys=settings.bearer_keys(),
        max_body_bytes=settings.max_body_bytes,
        metrics=state.metrics,
    )
    app.exception_handler(ServiceError)(_service_error)
    app.exception_handler(RequestValidationError)(_invalid)
    app.include_router(_health_routes(state))
    app.include_router(_scoring_routes(state))
    app.include_router(_handle_routes(state))
    return app


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": _validation_detail(exc.errors())}, status_code=422)


def _health_routes(state: ServiceState) -> APIRouter:
    """Liveness, readiness (the model loaded and its worker running) and Prometheus metrics."""
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        state.ensure_started()
        failure = state.backend.failure() if state.backend is not None else None
        if state.scorer is not None and state.scheduler.healthy() and failure is None:
            info = state.scorer.info
            return JSONResponse({"status": "ready", "model_id": info.model_id, "head": info.head})
        if failure is not None:
            detail = f"the model backend has failed: {failure}"
        elif state.load_error is not None:
            detail = f"the model failed to load: {state.load_error}"
        elif state.scorer is None:
            detail = "the model is loading"
        else:
            detail = "the model worker is not running"
        return JSONResponse({"detail": detail}, status_code=503)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return router


async def _scored(state: ServiceState, request: ScoreRequest) -> ScoreResponse:
    """One score request through the scheduler (requests queued together may share passes)."""
    scorer = state.ready_scorer()
    try:
        result: ScoreResponse = await state.scheduler.submit_merged(request, scorer.score_many, key="score")
    except torch.OutOfMemoryError as exc:
        raise Unavailable(
            f"out of memory scoring {request.num_prompts * request.num_inputs} rows; "
            "retry with fewer rows (or lower FEDBPT_MAX_BATCH_TOKENS)"
        ) from exc
    state.metrics.rows_scored.inc(result.rows)
    return result


def _answer(state: ServiceState, result: ScoreResponse, http: Request) -> Response:
    """JSON, or the binary score frame where the request's Accept asks for it (protos/frames.py)."""
    state.metrics.score_requests.inc()
    if accepts(http.headers.get("accept"), SCORE_FRAME):
        return Response(encode_score_frame(result), media_type=SCORE_FRAME)
    # Built here, not re-validated by FastAPI: the logits array is encoded once.
    return Response(result.model_dump_json(), media_type="application/json")


# OpenAPI: the score routes' other answer, for a request whose Accept names the frame.
FRAME_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {SCORE_FRAME: {"schema": {"type": "string", "format": "binary"}}}},
}
PACKED_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            PACKED_IDS: {"schema": PackedIds.model_json_schema(ref_template="#/components/schemas/{model}")}
        }
    },
}


def _scoring_routes(state: ServiceState) -> APIRouter:
    """The model's public description, tokenisation and the stateless score route."""
    router = APIRouter()

    @router.get("/v1/model", response_model=ModelInfo)
    async def model_info() -> ModelInfo:
        return state.ready_scorer().model_info()

    @router.post("/v1/tokenize", response_model=TokenizeResponse, responses=PACKED_RESPONSE)
    async def tokenize(request: TokenizeRequest, http: Request) -> Response:
        scorer = state.ready_scorer()
        ids = await run_in_threadpool(scorer.tokenize, request.texts)
        if accepts(http.headers.get("accept"), PACKED_IDS):  # protos/frames.py
            packed = PackedIds.pack(ids, scorer.info.vocab_size)
            return Response(packed.model_dump_json(), media_type=PACKED_IDS)
        return Response(TokenizeResponse(input_ids=ids).model_dump_json(), media_type="application/json")

    @router.post("/v1/score", response_model=ScoreResponse, responses=FRAME_RESPONSE)
    async def score(request: ScoreRequest, http: Request) -> Response:
        return _answer(state, await _scored(state, request), http)

    return router


def _check_vocabulary(ids: np.ndarray, lengths: np.ndarray, vocab: int) -> None:
    """BadRequest naming the first input and token whose id lies outside the vocabulary."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        i = int(np.flatnonzero((ids < 0) | (ids >= vocab))[0])
        b = int(np.searchsorted(np.cumsum(lengths), i, side="right"))
        start = int(lengths[:b].sum())
        raise BadRequest(
            f"input {b}, token {i - start}: id {int(ids[i])} is outside the vocabulary [0, {vocab})"
        )


def _handle_routes(state: ServiceState) -> APIRouter:
    """Inputs registered once per tenant, then scored by handle (docs/inference_service.md)."""
    router = APIRouter()

    def handles_on() -> None:
        if state.settings.input_cache_bytes <= 0:
            raise ServiceError("input handles are off on this service (FEDBPT_INPUT_CACHE_BYTES=0)", 404)

    @router.post("/v1/inputs", response_model=InputsHandle)
    async def register_inputs(body: InputsRegistration, request: Request) -> InputsHandle:
        handles_on()
        scorer = state.ready_scorer()
        ids, lengths = body.ids.numpy(), body.lengths.numpy()
        _check_vocabulary(ids, lengths, scorer.info.vocab_size)
        try:
            entry = state.inputs.put(request.scope.get(TENANT_KEY, ""), body.handle, ids, lengths)
        except InputsTooLarge as exc:
            raise ServiceError(f"{exc}; send them with POST /v1/score instead", 413) from None
        return InputsHandle(
            handle=body.handle,
            num_inputs=entry.num_inputs,
            num_ids=int(entry.ids.size),
            stored_bytes=entry.nbytes,
            ttl_s=state.inputs.ttl_s,
        )

    @router.post("/v1/score/handle", response_model=ScoreResponse, responses=FRAME_RESPONSE)
    async def score_handle(body: HandleScoreRequest, request: Request) -> Response:
        handles_on()
        state.ready_scorer()
        tenant = request.scope.get(TENANT_KEY, "")
        entries = [state.inputs.get(tenant, part.handle) for part in body.parts]
        for part, entry in zip(body.parts, entries, strict=True):
            if entry is None:
                # The same answer for never registered, evicted, expired and another key's handle.
                raise ServiceError(
                    f"unknown input handle {part.handle}: register the inputs again (POST /v1/inputs)", 404
                )
        # Checked already (the handle schema's prompt checks, the ids at registration). One part
        # after the other, each as its own /v1/score call would go: the same batches, so the same
        # logits as the stateless route (other callers' requests may still share the passes).
        results = []
        for part, entry in zip(body.parts, entries, strict=True):
            assert entry is not None
            scored = ScoreRequest.model_construct(
                projection=body.projection,
                z=body.z,
                prompt_embeds=body.prompt_embeds,
                task=body.task,
                input_ids=entry.rows(),
                texts=None,
                perturb_template=part.perturb_template,
            )
            results.append(await _scored(state, scored))
        return _answer(state, joined_parts(results), request)

    return router


def joined_parts(results: list[ScoreResponse]) -> ScoreResponse:
    """One answer for the parts of a handle call: logits side by side along B, rows added up.
    Stats only for a single part (parts scored in a shared forward pass would count it twice)."""
    if len(results) == 1:
        return results[0]
    logits = np.concatenate([r.logits.numpy() for r in results], axis=1)
    return ScoreResponse(
        logits=Array.from_numpy(logits, results[0].logits.dtype),
        rows=sum(r.rows for r in results),
    )


def app_from_env() -> FastAPI:
    """``uvicorn --factory inference_service.app:app_from_env``: settings from FEDBPT_* only."""
    return create_app(ServiceSettings())
