"""Runs the cells of a grid: one inference service for all of them, black-box cells ``jobs`` at a
time (each its own coordinator and client processes), white-box cells in this process, a record
per finished cell. A cell whose record says ok is skipped, so a stopped grid resumes where it
stopped; a failed cell is recorded as failed and run again next time, and so is a cell whose record
was made with other grid settings (a changed budget, another model)."""

from __future__ import annotations

import fnmatch
import os
import platform
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedbpt_cli.experiments import cells as run_cells
from fedbpt_cli.experiments.grid import Cell, Grid, cells
from fedbpt_cli.experiments.records import CellResult, finished, record_path, write_record
from fedbpt_cli.peak_rss import PeakRssWatcher
from fedbpt_cli.procs import ManagedProcess, free_port, python_module_command
from fedbpt_cli.services import ModelServer

MEMORY_RECORD = "_memory.json"


def service_env(grid: Grid) -> dict[str, str]:
    """The grid's service settings as the FEDBPT_* variables the service (and in-process model) read."""
    return {f"FEDBPT_{k.upper()}": str(v) for k, v in grid.service.items()}


@dataclass
class Runner:
    grid: Grid
    data_root: Path
    out: Path
    records: Path
    jobs: int = 1
    # Inference service processes (replicas of one model: the same spec gives the same A on each);
    # cells are dealt to them in turn. More than one pays where one process's per-request work,
    # not the accelerator, is what limits (a GPU shared by many small requests).
    replicas: int = 1
    only: list[str] = field(default_factory=list)
    model: str | None = None
    client_python: str | None = None  # e.g. a client-only environment (no torch), as sites run it
    console: Console = field(default_factory=Console)
    device: str = ""
    failures: list[str] = field(default_factory=list)
    _scorer: Any = None

    def todo(self) -> list[Cell]:
        chosen = [
            c for c in cells(self.grid) if not self.only or any(fnmatch.fnmatch(c.key, p) for p in self.only)
        ]
        return [c for c in chosen if not finished(self.records, c, *self._expected(c))]

    def _expected(self, cell: Cell) -> tuple[dict[str, Any], int | None]:
        rounds = None if cell.method == "zero_shot" else run_cells.run_config(self.grid, cell).rounds
        return run_cells.cell_settings(self.grid, cell, self.model), rounds

    def run(self) -> int:
        todo = self.todo()
        self.console.print(f"{len(todo)} cell(s) to run; records in {self.records}")
        redo = [c.key for c in todo if record_path(self.records, c).exists()]
        if redo:
            self.console.print(
                f"{len(redo)} of them have a record that failed or was made with other grid settings: "
                + ", ".join(redo[:5])
                + (" ..." if len(redo) > 5 else "")
            )
        if not todo:
            return 0
        os.environ.update(service_env(self.grid))  # the in-process white-box model reads them too
        if self.model:
            os.environ["FEDBPT_MODEL"] = self.model  # likewise: the baseline uses the service's model
        self.device = model_device()
        needs_service = any(c.method != "fedprompt" for c in todo)
        services = [self._start_service(i) for i in range(self.replicas)] if needs_service else []
        try:
            self._run_cells(todo, [url for _, url in services])
        finally:
            for proc, _ in services:
                proc.stop(grace=10.0)
        if self.failures:
            self.console.print(f"[red]{len(self.failures)} cell(s) failed:[/] {', '.join(self.failures)}")
            return 1
        return 0

    def _start_service(self, index: int) -> tuple[ManagedProcess, str]:
        port = free_port()
        argv = ModelServer(self.model).argv(port)
        name = "serve-model" if index == 0 else f"serve-model-{index}"
        proc = ManagedProcess(name, argv, self.out / "logs" / f"{name}.log").start()
        url = f"http://127.0.0.1:{port}"
        with self.console.status("starting the inference service"):
            proc.wait_http(f"{url}/readyz", timeout=600)
        self.console.print(f"inference service {url} (log {proc.log_path})")
        return proc, url

    def _run_cells(self, todo: list[Cell], model_urls: list[str]) -> None:
        columns = (
            TextColumn("[bold]cells"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
        )
        remote = [c for c in todo if c.method != "fedprompt"]
        local = [c for c in todo if c.method == "fedprompt"]
        with Progress(*columns, console=self.console) as progress, ThreadPoolExecutor(self.jobs) as pool:
            bar = progress.add_task("", total=len(todo))

            def on_done(cell: Cell) -> Callable[[Future[CellResult]], None]:
                def done(future: Future[CellResult]) -> None:
                    error = future.exception()
                    self._record(cell, None if error else future.result(), error, progress)
                    progress.advance(bar)

                return done

            for i, cell in enumerate(remote):
                future = pool.submit(self._run_remote, cell, model_urls[i % len(model_urls)])
                future.add_done_callback(on_done(cell))
            for cell in local:
                progress.update(bar, description=cell.key)
                try:
                    result = self._run_local(cell)
                    self._record(cell, result, None, progress)
                except Exception as exc:  # a failed cell is recorded; the grid goes on
                    self._record(cell, None, exc, progress)
                progress.advance(bar)
            pool.shutdown(wait=True)

    def _run_remote(self, cell: Cell, model_url: str) -> CellResult:
        if cell.method == "zero_shot":
            return run_cells.run_zero_shot(self.grid, cell, self.data_root, model_url)
        return run_cells.run_black_box(
            self.grid, cell, self.data_root, self.out / "cells" / cell.key, model_url, self.client_python
        )

    def _run_local(self, cell: Cell) -> CellResult:
        if self._scorer is None:
            from fedbpt_cli.experiments.whitebox import load_scorer

            with self.console.status("loading the model in process (white-box baseline)"):
                self._scorer = load_scorer()
        work = self.out / "cells" / cell.key
        if work.exists():
            shutil.rmtree(work)
        return run_cells.run_white_box(self.grid, cell, self.data_root, work, self._scorer)

    def _record(
        self, cell: Cell, result: CellResult | None, error: BaseException | None, progress: Progress
    ) -> None:
        if result is None:
            detail = "".join(traceback.format_exception(error)) if error else "no result"
            result = CellResult(cell=cell, status="failed", details={"error": detail[-4000:]})
            self.failures.append(cell.key)
        result.device = result.device or self.device
        result.settings = self._expected(cell)[0]
        write_record(self.records, result)
        if result.status == "ok":
            best = "-" if result.best_accuracy is None else f"{100 * result.best_accuracy:.2f}%"
            final = "-" if result.final_accuracy is None else f"{100 * result.final_accuracy:.2f}%"
            progress.console.print(
                f"{cell.key}: best {best} (state {result.best_state}), final {final}, "
                f"{result.wall_seconds:.0f} s"
            )
        else:
            progress.console.print(f"[red]{cell.key}: failed[/] ({str(error)[:300]})")


def model_device() -> str:
    """Where the model runs (the service and the in-process baseline), for the records."""
    import torch

    wanted = os.environ.get("FEDBPT_DEVICE", "auto")
    if wanted != "cpu" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


def measure_white_box_client(grid: Grid, runner_out: Path, records: Path, console: Console) -> Path | None:
    """Peak RSS of one white-box client process (model in memory, backpropagating through it) on
    the CPU, next to the fedbpt clients' peaks recorded by the black-box cells."""
    clients = sorted((runner_out / "cells").glob("*__fedprompt__*/data/client_0.jsonl"))
    if not grid.whitebox.memory_check or not clients:
        return None
    cell_dir = clients[0].parent.parent
    dataset = cell_dir.name.split("__")[0]
    config = run_cells.run_config(grid, Cell(dataset=dataset, partition="iid", method="fedprompt", seed=0))
    argv = python_module_command(
        "fedbpt_cli.experiments.whitebox",
        "--train", str(clients[0]),
        "--task", config.task,
        "--prompt-length", str(config.projection.prompt_length),
        "--max-input-tokens", str(config.max_input_tokens),
        "--steps", str(grid.whitebox.local_steps),
        "--lr", str(grid.whitebox.lr),
    )  # fmt: skip
    env = {**service_env(grid), "FEDBPT_DEVICE": "cpu"}
    proc = ManagedProcess("whitebox-client", argv, runner_out / "logs" / "whitebox-client.log", env=env)
    started = time.monotonic()
    with console.status("measuring one white-box client's peak RSS"):
        proc.start()
        with PeakRssWatcher(lambda: [proc.pid], interval_s=0.05) as memory:
            code = proc.wait(timeout=1800)
    if code != 0:
        raise RuntimeError(f"the white-box client failed:\n{proc.log_tail()}")
    record = {
        "whitebox_client_peak_rss_bytes": memory.max_bytes,
        "whitebox_client_seconds": time.monotonic() - started,
        "whitebox_client_data": str(clients[0].relative_to(runner_out)),
        "dataset": dataset,
        "machine": f"{platform.node()} ({platform.machine()})",
    }
    import json

    path = records / MEMORY_RECORD
    path.write_text(json.dumps(record, indent=1))
    return path
