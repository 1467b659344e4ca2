"""Follow a run on the coordinator until it ends, with a rich progress display.

One line per closed round is printed as the round closes (round, participants, mean client train
loss, test accuracy of the global prompt the round started from, client sigma before -> after), so
a log or CI output shows the learning curve too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from pydantic import TypeAdapter
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from protos import RoundRecord, RunInfo

ROUNDS = TypeAdapter(list[RoundRecord])


def fetch(http: httpx.Client, run_id: str) -> tuple[RunInfo, list[RoundRecord]]:
    info = http.get(f"/v1/runs/{run_id}")
    info.raise_for_status()
    rounds = http.get(f"/v1/runs/{run_id}/rounds")
    rounds.raise_for_status()
    return RunInfo.model_validate_json(info.content), ROUNDS.validate_json(rounds.content)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def round_line(record: RoundRecord) -> str:
    return (
        f"round {record.round:>3}  clients {len(record.participants)}  "
        f"loss {_fmt(record.train_loss)}  val loss {_fmt(record.val_loss)}  acc {_fmt(record.test_accuracy)}  "
        f"sigma {_fmt(record.sigma_before, '.4g')} -> {_fmt(record.sigma_after, '.4g')}"
    )


def _remaining(rounds: list[RoundRecord], total: int) -> str:
    """ ", about N min left" at the pace of the rounds closed so far (from the first round on)."""
    closed = [r for r in rounds if r.state == "closed"]
    opened = rounds[0].opened_at if rounds else None
    if not closed or len(closed) >= total or opened is None:
        return ""
    per_round = (time.time() - opened) / len(closed)
    left = per_round * (total - len(closed))
    return f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"


def follow(
    http: httpx.Client,
    run_id: str,
    console: Console,
    check: Callable[[], None] = lambda: None,
    interval_s: float = 1.0,
) -> tuple[RunInfo, list[RoundRecord]]:
    """Poll until the run is finished or failed; ``check`` raises to abort (a service died)."""
    info, rounds = fetch(http, run_id)
    total = info.config.rounds
    printed: set[int] = set()
    columns = (
        TextColumn("[bold]rounds"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        job = bar.add_task("starting", total=total)
        while True:
            for record in rounds:
                if record.state == "closed" and record.round not in printed:
                    printed.add(record.round)
                    console.print(round_line(record))
            closed = [r for r in rounds if r.state == "closed"]
            current = next((r for r in rounds if r.state == "open"), None)
            last_acc = next((r.test_accuracy for r in reversed(rounds) if r.test_accuracy is not None), None)
            description = (
                f"round {info.round}"
                + (f", {len(current.participants)}/{len(current.sampled)} answered" if current else "")
                + f", loss {_fmt(closed[-1].train_loss if closed else None)}, acc {_fmt(last_acc)}"
            )
            bar.update(job, completed=len(closed), description=description + _remaining(rounds, total))
            if info.state in ("finished", "failed"):
                return info, rounds
            check()
            time.sleep(interval_s)
            info, rounds = fetch(http, run_id)
