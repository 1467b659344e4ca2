"""The model worker: score jobs from every client queue here and run one at a time on one
dedicated thread, so model work never blocks the event loop (``/healthz`` answers during a long
score) and the model is only ever touched from one thread.

Cross-request batching hooks in at ``_take``: it returns the jobs to run together. Today that is
the first job alone; a later version can wait a short window and merge queued jobs whose
``key`` matches (same task and prompt spec) into one set of forward passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from inference_service.errors import Unavailable
from inference_service.metrics import ServiceMetrics

T = TypeVar("T")


@dataclass
class Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    key: Hashable | None = None  # jobs with equal keys may one day share forward passes
    enqueued: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(self, max_queue: int = 256, metrics: ServiceMetrics | None = None) -> None:
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0
        self.crashed: BaseException | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the worker on the running event loop (idempotent; a new loop gets a new worker)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedbpt-model")
        self._loop = loop
        self._queue = asyncio.Queue()
        self._task = loop.create_task(self._worker(), name="fedbpt-model-worker")

    def healthy(self) -> bool:
        return self._task is not None and not self._task.done() and self.crashed is None

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._pending

    async def submit(self, fn: Callable[[], T], key: Hashable | None = None) -> T:
        """Queue ``fn`` for the model thread and wait for its result (its exception is re-raised)."""
        self.start()
        assert self._queue is not None
        if self._pending >= self.max_queue:
            raise Unavailable(f"the model queue is full ({self.max_queue} jobs); retry shortly")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending += 1
        self._gauge()
        self._queue.put_nowait(Job(fn, future, key))
        try:
            result: T = await future
            return result
        finally:
            self._pending -= 1
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._pending)

    async def _take(self, first: Job) -> list[Job]:
        """The jobs to run now, starting with ``first``. (Cross-request batching goes here.)"""
        return [first]

    async def _worker(self) -> None:
        assert self._queue is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            while True:
                jobs = await self._take(await self._queue.get())
                for job in jobs:
                    if job.future.done():  # the caller went away before its turn
                        continue
                    if self.metrics is not None:
                        self.metrics.in_flight.set(1)
                    try:
                        result = await loop.run_in_executor(executor, job.fn)
                    except Exception as exc:  # handed to the caller, who maps it to HTTP
                        if not job.future.done():
                            job.future.set_exception(exc)
                    else:
                        if not job.future.done():
                            job.future.set_result(result)
                    finally:
                        if self.metrics is not None:
                            self.metrics.in_flight.set(0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # pragma: no cover - a bug in the loop itself
            self.crashed = exc
            raise

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(Unavailable("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
