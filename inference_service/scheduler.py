"""The model worker: score jobs from every client queue here and run one at a time on one
dedicated thread, so model work never blocks the event loop (``/healthz`` answers during a long
score) and the model is only ever touched from one thread.

Cross-request batching: a job submitted with ``submit_merged`` carries an item and a function that
runs a list of items at once (``Scorer.score_many``). When such a job reaches the head of the
queue, the worker waits ``window_s`` (0: no wait, only what is already queued) and takes every
queued job with the same function and key along, so requests of several clients that arrived
while the model was busy share forward passes. Each job still gets its own result or error.
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
    fn: Callable[[], Any] | None
    future: asyncio.Future[Any]
    key: Hashable | None = None
    # Mergeable jobs: ``merge([item, ...])`` returns one result (or exception) per item.
    item: Any = None
    merge: Callable[[list[Any]], list[Any]] | None = None
    enqueued: float = field(default_factory=time.monotonic)


class Scheduler:
    def __init__(
        self,
        max_queue: int = 256,
        metrics: ServiceMetrics | None = None,
        window_s: float = 0.0,
        merge: bool = True,
    ) -> None:
        self.max_queue = max_queue
        self.window_s = window_s
        self.merging = merge
        self.metrics = metrics
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Every caller's future from enqueue until it returns, queued, taken or running: a worker
        # that dies fails them all (else they would wait forever), and their count is the depth.
        self._waiting: set[asyncio.Future[Any]] = set()
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
        return len(self._waiting)

    async def submit(self, fn: Callable[[], T], key: Hashable | None = None) -> T:
        """Queue ``fn`` for the model thread and wait for its result (its exception is re-raised)."""
        return await self._enqueue(Job(fn, self._new_future(), key))  # type: ignore[no-any-return]

    async def submit_merged(
        self, item: Any, merge: Callable[[list[Any]], list[Any]], key: Hashable = None
    ) -> Any:
        """Queue ``item``; it may run together with other queued items of the same ``merge`` and
        ``key`` (``merge`` returns one result or exception per item, in order)."""
        return await self._enqueue(Job(None, self._new_future(), key, item, merge))

    def _new_future(self) -> asyncio.Future[Any]:
        self.start()
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, job: Job) -> Any:
        assert self._queue is not None
        if len(self._waiting) >= self.max_queue:
            raise Unavailable(f"the model queue is full ({self.max_queue} jobs); retry shortly")
        self._waiting.add(job.future)
        self._gauge()
        self._queue.put_nowait(job)
        try:
            return await job.future
        finally:
            self._waiting.discard(job.future)
            self._gauge()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._waiting))

    async def _take(self, first: Job) -> list[Job]:
        """The jobs to run now: ``first``, plus the queued jobs that can merge with it."""
        assert self._queue is not None
        if first.merge is None or not self.merging:
            return [first]
        if self.window_s > 0:
            await asyncio.sleep(self.window_s)
        group: list[Job] = [first]
        rest: list[Job] = []
        while not self._queue.empty():
            job = self._queue.get_nowait()
            same = job.merge == first.merge and job.key == first.key and not job.future.done()
            (group if same else rest).append(job)
        for job in rest:  # the queue was emptied: putting them back keeps their order
            self._queue.put_nowait(job)
        return group

    async def _worker(self) -> None:
        assert self._queue is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        executor = self._executor
        try:
            while True:
                jobs = [j for j in await self._take(await self._queue.get()) if not j.future.done()]
                if not jobs:  # the callers went away before their turn
                    continue
                if self.metrics is not None:
                    self.metrics.in_flight.set(len(jobs))
                try:
                    await self._run(loop, executor, jobs)
                finally:
                    if self.metrics is not None:
                        self.metrics.in_flight.set(0)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug in the loop itself: /readyz says 503 from now on
            self.crashed = exc
            self._fail_waiting(exc)
            raise

    def _fail_waiting(self, exc: BaseException) -> None:
        """Fail every caller still waiting — queued, taken from the queue or running — with 503: with
        the worker gone nothing would ever answer them."""
        message = (
            f"the model worker failed ({type(exc).__name__}: {exc}) and this request was not scored; "
            "retry it (the next request starts a new worker) and see the service log"
        )
        for future in list(self._waiting):
            if not future.done():
                future.set_exception(Unavailable(message))

    @staticmethod
    async def _run(loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, jobs: list[Job]) -> None:
        """Run one job, or one merged group, on the model thread; hand each caller its outcome."""
        first = jobs[0]
        try:
            if first.merge is not None:
                merge = first.merge
                outcomes = await loop.run_in_executor(executor, lambda: merge([j.item for j in jobs]))
            else:
                assert first.fn is not None
                outcomes = [await loop.run_in_executor(executor, first.fn)]
        except Exception as exc:  # handed to the callers, who map it to HTTP
            outcomes = [exc] * len(jobs)
        if len(outcomes) != len(jobs):  # a merge function's bug fails its callers, not the worker
            bug = RuntimeError(f"merged scoring returned {len(outcomes)} results for {len(jobs)} requests")
            outcomes = [bug] * len(jobs)
        for job, outcome in zip(jobs, outcomes, strict=True):
            if job.future.done():
                continue
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

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
