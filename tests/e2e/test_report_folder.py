"""A report folder holds one simulation: a second one is refused unless asked to replace it, and
replacing removes only what a simulation wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbpt_cli.services import SimulationError
from fedbpt_cli.simulation import clear_previous


def _fill(out: Path) -> None:
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "client-0.log").write_text("x")
    (out / "report.json").write_text("{}")
    (out / "coordinator.sqlite").write_bytes(b"db")
    (out / "coordinator.sqlite-wal").write_bytes(b"wal")
    (out / "notes.txt").write_text("the user's own file")


def test_refuses_to_mix_two_simulations(tmp_path: Path) -> None:
    _fill(tmp_path)
    with pytest.raises(SimulationError, match="--overwrite"):
        clear_previous(tmp_path, overwrite=False)
    assert (tmp_path / "report.json").exists() and (tmp_path / "logs" / "client-0.log").exists()


def test_overwrite_removes_only_simulation_files(tmp_path: Path) -> None:
    _fill(tmp_path)
    clear_previous(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_folder_without_a_simulation_is_used_as_it_is(tmp_path: Path) -> None:
    """An empty folder, or one holding only the user's own files, takes a simulation without
    --overwrite and loses nothing. Catches a check that refuses any non-empty folder, and a clear
    that removes more than what a simulation wrote."""
    clear_previous(tmp_path, overwrite=False)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "other-runs").mkdir()
    for overwrite in (False, True):
        clear_previous(tmp_path, overwrite=overwrite)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "other-runs"]
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"
