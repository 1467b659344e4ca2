"""The model worker (inference_service/scheduler.py) on its own, with plain functions for jobs: one
thread runs them in order, a full queue answers 503 and frees its slot, failures reach only their
caller, a caller that went away is skipped, the batching window takes late arrivals along, and stop
fails what is still queued. Timing is gated by events, not by sleeps, except where a test is about
time (the window) and then only in the direction a slow machine cannot break.

Written for the scheduler's surviving mutants (docs/development.md, "Mutation testing"); each test
names a break of ``scheduler.py`` it was seen to fail on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from inference_service.errors import Unavailable
from inference_service.metrics import ServiceMetrics
from inference_service.scheduler import Scheduler


class Gate:
    """A job that blocks the model thread until released, recording which thread ran it."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def job(self, value: Any = "gate") -> Callable[[], Any]:
        def run() -> Any:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            assert self.release.wait(30), "the test never released the gate"
            return value

        return run


async def _until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30)


def test_jobs_run_one_at_a_time_in_order_on_the_model_thread() -> None:
    """Break seen to fail: a thread name prefix other than fedbpt-model (the thread a profile and a
    stack dump show), and jobs run outside the queue's order."""

    async def scenario() -> tuple[list[int], list[str], set[str]]:
        scheduler, gate, order = Scheduler(), Gate(), []
        blocker = asyncio.create_task(scheduler.submit(gate.job()))
        await _until(gate.entered)
        jobs = [asyncio.create_task(scheduler.submit(lambda i=i: order.append(i) or i)) for i in range(5)]
        await asyncio.sleep(0)
        assert order == []  # queued behind the gate, not run beside it
        gate.release.set()
        results = await asyncio.gather(blocker, *jobs)
        names = set(gate.threads)
        await scheduler.stop()
        return order, results, names

    order, results, names = asyncio.run(scenario())
    assert order == [0, 1, 2, 3, 4] and results == ["gate", 0, 1, 2, 3, 4]
    assert len(names) == 1 and next(iter(names)).startswith("fedbpt-model")


def test_a_full_queue_refuses_with_503_and_frees_its_slots() -> None:
    """max_queue 2: with two jobs waiting or running, a third is refused with Unavailable (503)
    and the depth (and its gauge) stays at 2; once they finish the depth is 0 and a new job runs.
    Break seen to fail: ``>`` for ``>=`` in ``_enqueue`` (a third job admitted), and the pending
    count not decremented in ``finally`` (every later job refused)."""

    async def scenario() -> None:
        metrics = ServiceMetrics()
        scheduler, gate = Scheduler(max_queue=2, metrics=metrics), Gate()
        running = asyncio.create_task(scheduler.submit(gate.job()))
        await _until(gate.entered)
        waiting = asyncio.create_task(scheduler.submit(lambda: "second"))
        await asyncio.sleep(0)
        assert scheduler.depth == 2 and metrics.queue_depth._value.get() == 2
        with pytest.raises(Unavailable, match="queue is full \\(2 jobs\\)"):
            await scheduler.submit(lambda: "third")
        assert scheduler.depth == 2
        gate.release.set()
        assert await asyncio.gather(running, waiting) == ["gate", "second"]
        assert scheduler.depth == 0 and metrics.queue_depth._value.get() == 0
        assert await scheduler.submit(lambda: "again") == "again"
        await scheduler.stop()

    asyncio.run(scenario())


def test_a_failing_job_fails_only_its_caller_and_the_worker_goes_on() -> None:
    """Break seen to fail: the exception not handed to the future (the caller would hang: the
    test's timeout), or the worker loop ending on it (the next job never runs)."""

    def boom() -> None:
        raise ValueError("bad input")

    async def scenario() -> None:
        scheduler = Scheduler()
        with pytest.raises(ValueError, match="bad input"):
            await asyncio.wait_for(scheduler.submit(boom), 30)
        assert await asyncio.wait_for(scheduler.submit(lambda: 7), 30) == 7
        assert scheduler.healthy()
        await scheduler.stop()
        assert not scheduler.healthy() and not scheduler.started

    asyncio.run(scenario())


def test_a_caller_that_went_away_is_skipped() -> None:
    """A queued job whose caller was cancelled never runs. Break seen to fail: the worker's
    ``if not j.future.done()`` filter removed (the cancelled job runs)."""

    async def scenario() -> list[str]:
        scheduler, gate, ran = Scheduler(), Gate(), []
        blocker = asyncio.create_task(scheduler.submit(gate.job()))
        await _until(gate.entered)
        gone = asyncio.create_task(scheduler.submit(lambda: ran.append("gone")))
        kept = asyncio.create_task(scheduler.submit(lambda: ran.append("kept")))
        await asyncio.sleep(0)
        gone.cancel()
        gate.release.set()
        await asyncio.gather(blocker, kept)
        await scheduler.stop()
        return ran

    assert asyncio.run(scenario()) == ["kept"]


def test_the_batching_window_takes_a_job_that_arrives_during_it() -> None:
    """With a window of 0.5 s, an item queued 0.05 s after the first (idle worker) runs in the same
    merged call; with no window it runs on its own. Break seen to fail: the ``asyncio.sleep(window)``
    removed from ``_take``."""

    async def scenario(window: float) -> list[list[str]]:
        groups: list[list[str]] = []

        def merge(items: list[str]) -> list[str]:
            groups.append(list(items))
            return items

        scheduler = Scheduler(window_s=window)
        first = asyncio.create_task(scheduler.submit_merged("a", merge, key="k"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(scheduler.submit_merged("b", merge, key="k"))
        assert await asyncio.gather(first, second) == ["a", "b"]
        await scheduler.stop()
        return groups

    assert asyncio.run(scenario(0.5)) == [["a", "b"]]
    assert asyncio.run(scenario(0.0)) == [["a"], ["b"]]


def test_stop_fails_what_is_queued_and_a_new_loop_gets_a_new_worker() -> None:
    """``stop`` fails the queued caller with Unavailable, a second ``start`` on the same loop keeps
    its worker, and the scheduler works again on a new loop (as after a lifespan restart). Break
    seen to fail: ``stop`` without draining the queue (the queued caller hangs until its
    ``wait_for`` times out)."""
    scheduler = Scheduler()

    async def first_loop() -> None:
        gate = Gate()
        blocker = asyncio.create_task(scheduler.submit(gate.job()))
        await _until(gate.entered)
        queued = asyncio.create_task(scheduler.submit(lambda: "never"))
        await asyncio.sleep(0)
        task = scheduler._task
        scheduler.start()  # idempotent on the same loop: the same worker
        assert scheduler._task is task
        await scheduler.stop()
        gate.release.set()
        with pytest.raises(Unavailable, match="shutting down"):
            await asyncio.wait_for(queued, 30)
        blocker.cancel()

    asyncio.run(first_loop())

    async def second_loop() -> str:
        result = await asyncio.wait_for(scheduler.submit(lambda: "runs"), 30)
        await scheduler.stop()
        return result

    assert asyncio.run(second_loop()) == "runs"


def test_the_in_flight_gauge_counts_the_merged_group() -> None:
    """While a merged group of three runs, ``fedbpt_in_flight`` is 3; afterwards 0. Break seen to
    fail: ``in_flight.set(1)`` or the reset in ``finally`` removed."""
    seen: list[float] = []

    async def scenario() -> None:
        metrics = ServiceMetrics()
        scheduler, gate = Scheduler(metrics=metrics), Gate()

        def merge(items: list[str]) -> list[str]:
            seen.append(metrics.in_flight._value.get())
            return items

        blocker = asyncio.create_task(scheduler.submit(gate.job()))
        await _until(gate.entered)
        group = [asyncio.create_task(scheduler.submit_merged(i, merge, key="k")) for i in "xyz"]
        await asyncio.sleep(0)
        gate.release.set()
        await asyncio.gather(blocker, *group)
        assert metrics.in_flight._value.get() == 0
        await scheduler.stop()

    asyncio.run(scenario())
    assert seen == [3]


def test_merged_jobs_run_on_the_model_thread_too() -> None:
    """The model is only ever touched from the one model thread, merged calls included. Break seen
    to fail: ``_run`` handing a merged group to the loop's default executor (``run_in_executor(None,
    ...)``), whose threads are not the model thread."""
    threads: list[str] = []

    def merge(items: list[str]) -> list[str]:
        threads.append(threading.current_thread().name)
        return items

    async def scenario() -> None:
        scheduler = Scheduler()
        assert await scheduler.submit_merged("a", merge, key="k") == "a"
        await scheduler.stop()

    asyncio.run(scenario())
    assert len(threads) == 1 and threads[0].startswith("fedbpt-model")


def test_a_new_event_loop_gets_a_worker_even_without_stop() -> None:
    """A scheduler used from a second event loop whose first loop ended without ``stop`` (a test
    client's lifespan, a restarted server) starts a worker there instead of queueing onto the dead
    loop's queue. Break seen to fail: ``start``'s reuse test with ``or`` for ``and`` (the job waits
    forever: ``wait_for`` times out)."""
    scheduler = Scheduler()

    async def use(value: int) -> int:
        return await asyncio.wait_for(scheduler.submit(lambda: value), 30)

    assert asyncio.run(use(1)) == 1
    assert asyncio.run(use(2)) == 2


def test_a_merged_caller_that_went_away_during_the_run_leaves_the_others_their_results() -> None:
    """The first caller of a merged group of three is cancelled while the model runs the group; the
    other two still get their results. Break seen to fail: ``_run`` stopping at the first finished
    future (``break`` for ``continue``: the later callers hang and ``wait_for`` times out)."""

    async def scenario() -> list[str]:
        scheduler, gate = Scheduler(), Gate()

        def merge(items: list[str]) -> list[str]:
            gate.job()()
            return [item.upper() for item in items]

        blocker = asyncio.create_task(scheduler.submit(lambda: "first"))
        await blocker
        group = [asyncio.create_task(scheduler.submit_merged(i, merge, key="k")) for i in "xyz"]
        await _until(gate.entered)
        group[0].cancel()
        await asyncio.sleep(0)
        gate.release.set()
        results = await asyncio.wait_for(asyncio.gather(*group[1:]), 30)
        assert group[0].cancelled()
        await scheduler.stop()
        return results

    assert asyncio.run(scenario()) == ["Y", "Z"]


def test_a_merge_that_returns_the_wrong_count_fails_its_callers_not_the_worker() -> None:
    """A merge function that returns fewer outcomes than items (a bug of the scorer) fails each caller
    of the group with an error naming the counts, and the worker serves the next job. Break seen to
    fail: the count check removed (``zip(strict=True)`` then raises in the worker loop, which dies:
    the callers hang and ``wait_for`` times out; with ``strict`` off too, the third caller hangs)."""

    def merge(items: list[str]) -> list[str]:
        return items[:-1]

    async def scenario() -> None:
        scheduler, gate = Scheduler(), Gate()
        blocker = asyncio.create_task(scheduler.submit(gate.job()))
        await _until(gate.entered)
        group = [asyncio.create_task(scheduler.submit_merged(i, merge, key="k")) for i in "xyz"]
        await asyncio.sleep(0)
        gate.release.set()
        await blocker
        outcomes = await asyncio.wait_for(asyncio.gather(*group, return_exceptions=True), 30)
        assert [str(o) for o in outcomes] == ["merged scoring returned 2 results for 3 requests"] * 3
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        assert await asyncio.wait_for(scheduler.submit(lambda: "next"), 30) == "next"
        assert scheduler.healthy()
        await scheduler.stop()

    asyncio.run(scenario())


def test_stop_does_not_wait_for_the_running_job_and_ends_the_model_thread() -> None:
    """``stop`` returns while a job still runs on the model thread (the model call cannot be
    interrupted; shutdown must not hang on it), fails the queued caller with exactly "the service is
    shutting down", and the model thread ends once its job is done. Breaks seen to fail: the
    executor shut down with ``wait=True`` (``stop`` returns only when the timer releases the job),
    its shutdown skipped (``is None`` for ``is not None``: the thread never ends), the message
    changed."""
    threads: list[threading.Thread] = []

    async def scenario() -> bool:
        scheduler, gate = Scheduler(), Gate()

        def job() -> str:
            threads.append(threading.current_thread())
            return gate.job()()  # type: ignore[no-any-return]

        blocker = asyncio.create_task(scheduler.submit(job))
        await _until(gate.entered)
        queued = asyncio.create_task(scheduler.submit(lambda: "never"))
        await asyncio.sleep(0)
        timer = threading.Timer(10, gate.release.set)  # only a stop that waits would see it fire
        timer.start()
        await scheduler.stop()
        released_before_stop_returned = gate.release.is_set()
        with pytest.raises(Unavailable) as refused:
            await asyncio.wait_for(queued, 30)
        assert str(refused.value) == "the service is shutting down"
        gate.release.set()
        timer.cancel()
        blocker.cancel()
        return released_before_stop_returned

    assert asyncio.run(scenario()) is False
    threads[0].join(30)
    assert not threads[0].is_alive()


class _KeyThatCannotCompare:
    """A merge key whose comparison raises: the one way a test can make the worker loop itself fail."""

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("keys cannot compare")


def test_a_worker_that_fails_answers_every_waiting_caller_with_503_instead_of_leaving_them_hanging() -> None:
    """A bug in the worker loop itself (here a merge key whose ``==`` raises while the queue is
    drained) fails every caller then waiting — the one the worker was grouping, the one it had taken
    from the queue and the plain job still queued — with Unavailable naming the error, turns
    ``healthy()`` False, and the next request gets a new worker. Breaks seen to fail: the failure
    handler not failing the callers (all three wait until ``wait_for`` times out), the message
    changed."""

    def merge(items: list[str]) -> list[str]:
        return items

    async def scenario() -> None:
        scheduler, gate = Scheduler(), Gate()
        blocker = asyncio.create_task(scheduler.submit(gate.job()))
        await _until(gate.entered)
        waiting = [
            asyncio.create_task(scheduler.submit_merged("x", merge, key=_KeyThatCannotCompare())),
            asyncio.create_task(scheduler.submit_merged("y", merge, key=_KeyThatCannotCompare())),
            asyncio.create_task(scheduler.submit(lambda: "z")),
        ]
        await asyncio.sleep(0)
        assert scheduler.depth == 4
        gate.release.set()
        assert await blocker == "gate"
        outcomes = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 30)
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        assert {str(o) for o in outcomes} == {
            "the model worker failed (RuntimeError: keys cannot compare) and this request was not "
            "scored; retry it (the next request starts a new worker) and see the service log"
        }
        assert scheduler.depth == 0 and not scheduler.healthy()
        assert isinstance(scheduler.crashed, RuntimeError)
        assert await asyncio.wait_for(scheduler.submit(lambda: "next"), 30) == "next"
        await scheduler.stop()

    asyncio.run(scenario())
