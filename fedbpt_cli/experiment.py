"""``fedbpt experiment GRID``: run the results grid and write docs/results.md from its records."""

from __future__ import annotations

import time
from pathlib import Path

import typer


def experiment(
    grid_file: Path = typer.Argument(..., help="the grid (YAML), e.g. experiments/grid.yaml"),
    data: Path = typer.Option(Path("../shared/data"), help="folder holding each dataset's folder"),
    out: Path = typer.Option(Path("runs/experiments"), help="work folder: every cell's report, logs, data"),
    records: Path = typer.Option(Path("experiments/results"), help="one result record per cell (committed)"),
    doc: Path = typer.Option(Path("docs/results.md"), help="the document written from the records"),
    jobs: int = typer.Option(1, min=1, help="black-box cells run at the same time"),
    replicas: int = typer.Option(1, min=1, help="inference service processes the cells are dealt to"),
    only: list[str] = typer.Option([], help="run only cells whose key matches (glob; repeatable)"),
    model: str | None = typer.Option(None, help="model for the service (default: the embedded MiniLM)"),
    client_python: str | None = typer.Option(
        None, help="interpreter of the client processes, e.g. .venv-client/bin/python (no torch)"
    ),
    memory: bool = typer.Option(True, help="measure a white-box client's peak RSS after the grid"),
    report_only: bool = typer.Option(False, help="write the document from the records; run nothing"),
) -> None:
    """Run every cell of the grid not yet recorded, then write the results document."""
    from rich.console import Console

    from fedbpt_cli.experiments.document import write_document
    from fedbpt_cli.experiments.grid import load_grid
    from fedbpt_cli.experiments.records import read_records
    from fedbpt_cli.experiments.runner import Runner, measure_white_box_client

    console = Console()
    try:
        grid = load_grid(grid_file)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="GRID_FILE") from None
    code = 0
    if not report_only:
        started = time.monotonic()
        runner = Runner(
            grid,
            data,
            out,
            records,
            jobs=jobs,
            replicas=replicas,
            only=only,
            model=model,
            console=console,
            client_python=client_python,
        )
        code = runner.run()
        if memory and not (records / "_memory.json").exists():
            measure_white_box_client(grid, out, records, console)
        console.print(f"grid done in {time.monotonic() - started:.0f} s")
    here = grid_file.parent
    path = write_document(
        grid,
        read_records(records),
        records,
        doc,
        here / grid.preface if grid.preface else None,
        here / grid.discussion if grid.discussion else None,
        read_records(here / grid.data_size) if grid.data_size else None,
        read_records(here / grid.communication) if grid.communication else None,
    )
    console.print(f"wrote {path}")
    raise typer.Exit(code)
