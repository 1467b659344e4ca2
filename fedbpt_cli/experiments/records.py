"""The compact result record of one cell (``experiments/results/<cell>.json``), small enough to
commit: the tables and plots of docs/results.md are regenerated from these files alone."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fedbpt_cli.experiments.grid import Cell


class CellResult(BaseModel):
    cell: Cell
    status: str = "ok"
    # (global state, test accuracy): state r is the prompt after r rounds; state 0 the initial one.
    curve: list[tuple[int, float]] = Field(default_factory=list)
    # best: picked with test data (hindsight, a reference); selected: the state the run hands out
    # (lowest validation loss; test data never chooses it); final: the last state. Selected and
    # final are scored on the whole test set, best on the per-round test set (grid: eval_subset).
    best_accuracy: float | None = None
    best_state: int | None = None
    final_accuracy: float | None = None
    selected_accuracy: float | None = None
    selected_state: int | None = None
    test_size: int = 0
    rounds: int = 0
    clients: int = 0
    # Mean bytes one client moved per round on each link, measured on the wire (or, for the
    # in-process white-box baseline, the size of the body the same exchange would carry).
    bytes_per_client_per_round: dict[str, float] = Field(default_factory=dict)
    model_rows: int = 0  # rows (prompt x input) the model scored for training, whole federation
    client_peak_rss_bytes: int | None = None
    wall_seconds: float = 0.0
    machine: str = Field(default_factory=lambda: f"{platform.node()} ({platform.machine()})")
    device: str = ""
    # The grid settings the cell ran with (cells.cell_settings); None in records made before
    # they were stored.
    settings: dict[str, Any] | None = None
    details: dict[str, Any] = Field(default_factory=dict)


def record_path(records: Path, cell: Cell) -> Path:
    return records / f"{cell.key}.json"


def write_record(records: Path, result: CellResult) -> Path:
    records.mkdir(parents=True, exist_ok=True)
    path = record_path(records, result.cell)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(result.model_dump_json(indent=1))
    tmp.replace(path)  # a record is either whole or absent: a killed runner leaves no half file
    return path


def read_records(records: Path) -> list[CellResult]:
    out = []
    for path in sorted(records.glob("*.json")):
        if path.name.startswith("_"):  # side records (the memory measurement), not cells
            continue
        out.append(CellResult.model_validate(json.loads(path.read_text())))
    return out


def finished(
    records: Path, cell: Cell, settings: dict[str, Any] | None = None, rounds: int | None = None
) -> bool:
    """Whether the cell has an ok record made with ``settings`` (when given). A record from before
    settings were stored is checked on its round count (``rounds``, when given) instead."""
    path = record_path(records, cell)
    if not path.exists():
        return False
    try:
        result = CellResult.model_validate_json(path.read_text())
    except ValueError:
        return False
    if result.status != "ok":
        return False
    if settings is not None and result.settings is not None:
        return result.settings == settings
    return rounds is None or result.rounds == rounds


def best_and_final(
    curve: list[tuple[int, float]], rounds: int
) -> tuple[float | None, int | None, float | None]:
    """Best accuracy over the evaluated states, its state, and the final state's accuracy."""
    if not curve:
        return None, None, None
    state, best = max(curve, key=lambda p: p[1])
    final = curve[-1][1] if curve[-1][0] == rounds else None
    return best, state, final
