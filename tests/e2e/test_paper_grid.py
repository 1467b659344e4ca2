"""``experiments/paper.yaml`` (the paper's grid, RoBERTa-large on a GPU) through the code path it
runs on: the file itself, cut to one round, one seed, two sites and a small SST-2 sample, run by
``fedbpt experiment`` on a tiny random RoBERTa (mlm head, L = 50, d = 500 as in the file)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml

from fedbpt_cli.experiments.grid import load_grid
from fedbpt_cli.experiments.records import read_records
from fedbpt_cli.procs import ManagedProcess, fedbpt_command
from tests.e2e.conftest import build_random_model

PAPER = Path(__file__).resolve().parents[2] / "experiments" / "paper.yaml"


def test_the_paper_grid_holds_the_papers_settings() -> None:
    grid = load_grid(PAPER)
    assert grid.service["model"] == "roberta-large" and grid.service["head"] == "mlm"
    assert grid.run["projection"]["intrinsic_dim"] == 500 and grid.run["projection"]["prompt_length"] == 50
    assert (grid.run["local_popsize"], grid.run["local_iters"]) == (5, 8)
    assert (grid.k_shot, grid.clients, grid.partitions) == (40, 10, ["iid", 1.0])
    assert set(grid.datasets) == {"sst2", "ag_news", "yelp_polarity"}
    assert {d.run["rounds"] for d in grid.datasets.values()} == {200}
    assert "fedbpt_reference" in grid.methods and "fedbpt" in grid.methods


@pytest.mark.timeout(900)
def test_the_paper_grid_runs_one_round_on_a_tiny_roberta(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, shared_data: Path
) -> None:
    raw = yaml.safe_load(PAPER.read_text())
    raw.update(seeds=[0], clients=2, partitions=["iid"], methods=["zero_shot", "fedbpt", "fedbpt_reference"])
    raw["datasets"] = {"sst2": raw["datasets"]["sst2"]}
    raw["datasets"]["sst2"]["run"]["rounds"] = 1
    raw["datasets"]["sst2"]["round_test_limit"] = 8
    raw["run"]["max_input_tokens"] = 32
    grid = tmp_path / "paper-1-round.yaml"
    grid.write_text(yaml.safe_dump(raw))
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    for split, rows in (("train", 300), ("test", 16)):
        lines = (shared_data / "sst2" / f"{split}.jsonl").read_text().splitlines()[:rows]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")

    model = build_random_model(tmp_path_factory, "roberta")
    argv = fedbpt_command(
        "experiment", str(grid), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
        "--records", str(tmp_path / "records"), "--doc", str(tmp_path / "doc" / "results.md"),
        "--model", str(model), "--no-memory",
    )  # fmt: skip
    proc = ManagedProcess("experiment", argv, tmp_path / "experiment.log").start()
    assert proc.wait(timeout=800) == 0, proc.log_tail()

    records = {r.cell.method: r for r in read_records(tmp_path / "records")}
    assert set(records) == {"zero_shot", "fedbpt", "fedbpt_reference"}
    for method in ("fedbpt", "fedbpt_reference"):
        r = records[method]
        assert r.rounds == 1 and r.clients == 2 and r.test_size == 16
        assert r.settings is not None and r.settings["service"]["head"] == "mlm"
        assert r.settings["run"]["projection"]["intrinsic_dim"] == 500
        for accuracy in (r.final_accuracy, r.selected_accuracy):  # whole numbers of the 16 examples
            assert accuracy is not None and 0 <= accuracy <= 1, (method, accuracy)
            assert accuracy * 16 == pytest.approx(round(accuracy * 16), abs=1e-6), (method, accuracy)
    # The reference row keeps BBT's placeholders and hands out its final state (no validation split).
    assert records["fedbpt_reference"].settings["run"]["projection"]["init"] == "placeholder"  # type: ignore[index]
    # ... and another p0 reached the service: state 0 (z = 0) has another test loss there.
    assert _state0_test_loss(tmp_path, "fedbpt_reference") != pytest.approx(
        _state0_test_loss(tmp_path, "fedbpt")
    )
    assert records["fedbpt_reference"].selected_state == 1
    assert (tmp_path / "doc" / "results.md").exists()


def _state0_test_loss(tmp_path: Path, method: str) -> float:
    """The clients' test loss of state 0 as the cell's coordinator stored it."""
    db = tmp_path / "out" / "cells" / f"sst2__iid__{method}__seed0" / "coordinator.sqlite"
    with sqlite3.connect(db) as conn:
        rows = [json.loads(m) for (m,) in conn.execute("SELECT metrics FROM updates WHERE round = 0")]
    losses = [(m["test_loss"], m["n_test"]) for m in rows if m.get("test_loss") is not None]
    assert losses, f"no state-0 test loss in {db}"
    return sum(v * n for v, n in losses) / sum(n for _, n in losses)
