"""The numbers of docs/results.md from hand-made records: grouping, mean ± std, factors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbpt_cli.experiments import tables
from fedbpt_cli.experiments.cells import run_config
from fedbpt_cli.experiments.document import write_document
from fedbpt_cli.experiments.grid import Cell, Grid, cells, load_grid
from fedbpt_cli.experiments.records import CellResult, best_and_final, finished, read_records, write_record


def result(method: str, seed: int, best: float, final: float, part: str = "iid", **kw: object) -> CellResult:
    cell = Cell(dataset="d", partition=part, method=method, seed=seed)  # type: ignore[arg-type]
    return CellResult(
        cell=cell, curve=[(0, 0.5), (1, best), (2, final)], best_accuracy=best, final_accuracy=final, **kw
    )  # type: ignore[arg-type]


def test_mean_and_sample_std_over_seeds() -> None:
    records = [result("fedbpt", s, b, f) for s, (b, f) in enumerate([(0.8, 0.7), (0.9, 0.8), (0.7, 0.6)])]
    records.append(result("fedbpt", 3, 0.1, 0.1, part="dir0.5"))
    records.append(
        CellResult(cell=Cell(dataset="d", partition="iid", method="fedbpt", seed=9), status="failed")
    )
    found = tables.accuracy_stats(records)[("d", "iid", "fedbpt")]
    best, final, selected = found["best"], found["final"], found["selected"]
    assert best is not None and final is not None and selected is not None
    assert selected.mean == pytest.approx(0.7)  # no selected accuracy recorded: the final one counts
    assert (best.mean, best.n) == (pytest.approx(0.8), 3)
    assert best.std == pytest.approx(0.1)  # sample std of 0.7, 0.8, 0.9
    assert final.mean == pytest.approx(0.7)
    assert best.pct() == "80.00 ± 10.00"
    states, means, stds = tables.mean_curves(records)[("d", "iid", "fedbpt")]
    assert states == [0, 1, 2] and means[0] == pytest.approx(0.5) and stds[0] == 0.0


def test_communication_factors_come_from_the_measured_bytes() -> None:
    rows = tables.communication(
        {"coordinator_to_client": 3000.0, "client_to_coordinator": 1000.0}, prompt_length=5
    )
    mini = rows[0]
    assert mini.model == "all-MiniLM-L6-v2"
    assert mini.fedavg_bytes == 2 * 22_713_216 * 4
    assert mini.fedprompt_bytes == 2 * 5 * 384 * 4
    assert mini.vs_fedavg == pytest.approx(2 * 22_713_216 * 4 / 4000)
    assert mini.up_vs_fedavg == pytest.approx(22_713_216 * 4 / 1000)


def test_best_and_final() -> None:
    assert best_and_final([(0, 0.5), (2, 0.7), (4, 0.6)], rounds=4) == (0.7, 2, 0.6)
    # A run cut short has no final state.
    assert best_and_final([(0, 0.5), (2, 0.7)], rounds=4) == (0.7, 2, None)
    assert best_and_final([], rounds=3) == (None, None, None)


def test_cells_are_seed_major_and_split_free_methods_run_once(tmp_path: Path) -> None:
    grid = Grid.model_validate(
        {"seeds": [0, 1], "partitions": ["iid", 0.5], "datasets": {"a": {"data": "a"}, "b": {"data": "b"}}}
    )
    out = cells(grid)
    assert len(out) == 2 + 2 * 2 * (1 + 2 * 6)  # 6 split-dependent methods by default
    assert [c.method for c in out[:2]] == ["zero_shot", "zero_shot"]
    seeds = [c.seed for c in out[2:] if c.seed is not None]
    assert len(seeds) == len(out) - 2
    assert seeds == sorted(seeds)  # every seed-0 cell before any seed-1 cell
    assert Cell(dataset="a", partition="dir0.5", method="fedbpt", seed=0).alpha == 0.5
    path = tmp_path / "grid.yaml"
    path.write_text("datasets: {a: {data: a}}\nmethods: [fedbpt, magic]\n")
    with pytest.raises(ValueError, match="magic"):
        load_grid(path)


def test_shared_es_cells_get_fedbpts_query_budget_one_generation_a_round() -> None:
    grid = Grid.model_validate(
        {
            "run": {"local_iters": 8},
            "datasets": {"a": {"data": "a", "run": {"rounds": 20, "eval_every": 2}}},
        }
    )
    shared = run_config(grid, Cell(dataset="a", partition="iid", method="shared_es", seed=0))
    fedbpt = run_config(grid, Cell(dataset="a", partition="iid", method="fedbpt", seed=0))
    assert (shared.rounds, shared.eval_every, shared.aggregator) == (160, 16, "shared_es")
    assert (fedbpt.rounds, fedbpt.eval_every) == (20, 2)
    assert not shared.perturb and not shared.searches_locally


def test_records_are_whole_and_a_failed_cell_is_run_again(tmp_path: Path) -> None:
    ok = result("fedbpt", 0, 0.8, 0.7)
    failed = CellResult(cell=Cell(dataset="d", partition="iid", method="fedavg_bbt", seed=0), status="failed")
    write_record(tmp_path, ok)
    write_record(tmp_path, failed)
    assert finished(tmp_path, ok.cell) and not finished(tmp_path, failed.cell)
    assert not list(tmp_path.glob("*.tmp"))
    (tmp_path / "_memory.json").write_text("{}")  # side record, not a cell
    assert {r.cell.key for r in read_records(tmp_path)} == {ok.cell.key, failed.cell.key}


def test_a_dataset_without_tuned_runs_gets_no_plot(tmp_path: Path) -> None:
    # A partial grid (e.g. only one dataset's cells run on a machine) still gets its document.
    grid = Grid.model_validate({"seeds": [0], "datasets": {"d": {"data": "d"}, "e": {"data": "e"}}})
    zero = CellResult(
        cell=Cell(dataset="e", partition="all", method="zero_shot", seed=None),
        curve=[(0, 0.25)],
        best_accuracy=0.25,
        final_accuracy=0.25,
    )
    records = [result("fedbpt", 0, 0.8, 0.7), zero]
    doc = write_document(grid, records, tmp_path / "records", tmp_path / "results.md")
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["d.png"]
    text = doc.read_text()
    assert "results/d.png" in text and "results/e.png" not in text
    assert "80.00" in text and "25.00" in text


def _grid(ag_rounds: int = 10, lr: float = 0.01) -> Grid:
    return Grid.model_validate(
        {
            "seeds": [0],
            "partitions": ["iid"],
            "run": {"local_iters": 8},
            "datasets": {
                "sst2": {"data": "sst2", "run": {"task": "sst2", "rounds": 20}},
                "ag": {"data": "ag_news", "run": {"task": "ag_news", "rounds": ag_rounds}},
            },
            "whitebox": {"lr": lr},
        }
    )


def test_a_changed_budget_reruns_exactly_the_cells_it_touches(tmp_path: Path) -> None:
    """Records keep the grid settings they ran with; the runner runs again what they no longer
    match (here AG News's rounds, then the white-box learning rate), and nothing else."""
    from fedbpt_cli.experiments.cells import cell_settings
    from fedbpt_cli.experiments.runner import Runner

    def runner(grid: Grid) -> Runner:
        return Runner(grid=grid, data_root=tmp_path, out=tmp_path / "out", records=tmp_path / "rec")

    first = runner(_grid())
    assert len(first.todo()) == 2 + 2 * 7
    for cell in first.todo():
        rounds = 0 if cell.method == "zero_shot" else first.grid.datasets[cell.dataset].run["rounds"]
        record = CellResult(
            cell=cell, curve=[(0, 0.5)], rounds=rounds, settings=cell_settings(first.grid, cell)
        )
        write_record(tmp_path / "rec", record)
    assert first.todo() == []
    shorter = {c.key for c in runner(_grid(ag_rounds=5)).todo()}
    assert shorter == {c.key for c in cells(_grid()) if c.dataset == "ag" and c.method != "zero_shot"}
    assert {c.key for c in runner(_grid(lr=0.1)).todo()} == {
        "sst2__iid__fedprompt__seed0",
        "ag__iid__fedprompt__seed0",
    }
    patient = _grid()
    patient.run["round_timeout_s"] = 99  # how long a round may wait changes no result
    assert runner(patient).todo() == []
    other_model = Runner(
        grid=_grid(), data_root=tmp_path, out=tmp_path, records=tmp_path / "rec", model="roberta-large"
    )
    assert len(other_model.todo()) == 2 + 2 * 7


def test_a_record_without_settings_is_checked_on_its_rounds(tmp_path: Path) -> None:
    legacy = result("fedbpt", 0, 0.8, 0.7, rounds=10)
    write_record(tmp_path, legacy)
    assert finished(tmp_path, legacy.cell, {"any": 1}, rounds=10)
    assert not finished(tmp_path, legacy.cell, {"any": 1}, rounds=5)
    current = result("fedbpt", 1, 0.8, 0.7, rounds=10, settings={"run": {"rounds": 10}})
    write_record(tmp_path, current)
    assert finished(tmp_path, current.cell, {"run": {"rounds": 10}}, rounds=10)
    assert not finished(tmp_path, current.cell, {"run": {"rounds": 10, "local_iters": 4}}, rounds=10)


def test_the_shots_study_is_plotted_from_the_records_settings(tmp_path: Path) -> None:
    """The data-size section groups the study's records by the k_shot their settings name, puts
    the zero-shot figure at every count, and draws the plot; a grid without the study has no section."""
    study = []
    for k, accs in ((40, (0.70, 0.72)), (200, (0.76, 0.78))):
        for seed, acc in enumerate(accs):
            cell = Cell(dataset=f"sst2_k{k}", partition="iid", method="fedbpt", seed=seed)
            study.append(
                CellResult(cell=cell, selected_accuracy=acc, final_accuracy=0.5, settings={"k_shot": k})
            )
    zero = Cell(dataset="sst2_k40", partition="all", method="zero_shot", seed=None)
    study.append(CellResult(cell=zero, final_accuracy=0.71, settings={"run": {}}))
    points = tables.by_shots(study)
    assert points[("fedbpt", "iid", 40)].mean == pytest.approx(0.71)
    assert points[("fedbpt", "iid", 200)].mean == pytest.approx(0.77)
    assert points[("zero_shot", "all", 40)].mean == points[("zero_shot", "all", 200)].mean == 0.71
    finals = tables.by_shots(study, final=True)
    assert finals[("fedbpt", "iid", 200)].mean == pytest.approx(0.5)  # the final states, not the selected

    grid = _grid()
    doc = write_document(grid, [], tmp_path, tmp_path / "doc" / "results.md", data_size=study)
    text = doc.read_text()
    assert "## How much data a federation needs" in text
    assert "| FedBPT | IID | 200 | 77.00 ± 1.41 | 50.00 ± 0.00 | 2 |" in text
    assert (tmp_path / "doc" / "results" / "data_size.png").stat().st_size > 5000
    plain = write_document(grid, [], tmp_path, tmp_path / "plain" / "results.md").read_text()
    assert "How much data" not in plain  # the grid names no study
    pending = write_document(
        grid, [], tmp_path, tmp_path / "pending" / "results.md", data_size=[]
    ).read_text()
    assert "## How much data a federation needs" in pending and "Not run yet: `make data-size`" in pending


def test_the_covariance_forms_study_is_tabulated_from_the_records_settings(tmp_path: Path) -> None:
    """The forms section groups FedBPT records by (d, the form their run settings name), averages
    the measured downlink and the selected accuracy over seeds, states the saving against the full
    C of the same task and d, and refreshes the marked block of performance.md beside the document."""
    study = []
    for form, down, accs in (("full", 55_000.0, (0.72, 0.70)), ("lowrank", 5_500.0, (0.71, 0.73))):
        for seed, acc in enumerate(accs):
            run = {"projection": {"intrinsic_dim": 100}, "covariance": form, "covariance_rank": 8}
            study.append(
                CellResult(
                    cell=Cell(dataset=f"sst2_{form}", partition="iid", method="fedbpt", seed=seed),
                    selected_accuracy=acc,
                    final_accuracy=0.6,
                    bytes_per_client_per_round={
                        "coordinator_to_client": down + seed,
                        "client_to_coordinator": 1600.0,
                    },
                    settings={"run": run},
                )
            )
    study.append(
        CellResult(cell=Cell(dataset="z", partition="all", method="zero_shot", seed=None), final_accuracy=0.7)
    )
    rows = tables.covariance_forms(study)
    assert [(r.task, r.dim, r.form) for r in rows] == [("sst2", 100, "full"), ("sst2", 100, "lowrank k = 8")]
    # The same form with a float32 mean is another task on the wire: its own row, not another seed.
    f32 = {"projection": {"intrinsic_dim": 100}, "covariance": "lowrank", "mean_dtype": "float32"}
    lean = CellResult(
        cell=Cell(dataset="sst2_lowrank_f32", partition="iid", method="fedbpt", seed=0),
        selected_accuracy=0.5,
        bytes_per_client_per_round={"coordinator_to_client": 5_000.0, "client_to_coordinator": 1600.0},
        settings={"run": f32},
    )
    forms = [(r.form, r.down) for r in tables.covariance_forms([*study, lean])]
    assert forms[1:] == [("lowrank k = 8", 5_500.5), ("lowrank k = 8, float32 mean", 5_000.0)]
    assert rows[1].down == pytest.approx(5_500.5) and rows[1].selected is not None
    assert rows[1].selected.mean == pytest.approx(0.72) and rows[1].selected.n == 2

    # Another task's full C is its own row and never the saving's reference for SST-2's forms.
    ag_run = {"task": "yelp_polarity", "projection": {"intrinsic_dim": 100}, "covariance": "full"}
    ag_full = CellResult(
        cell=Cell(dataset="yelp", partition="iid", method="fedbpt", seed=0),
        selected_accuracy=0.8,
        bytes_per_client_per_round={"coordinator_to_client": 60_000.0, "client_to_coordinator": 1600.0},
        settings={"run": ag_run},
    )
    last = tables.covariance_forms([*study, ag_full])[-1]
    assert (last.task, last.form) == ("yelp_polarity", "full")
    study.append(ag_full)

    (tmp_path / "doc").mkdir()
    perf = tmp_path / "doc" / "performance.md"
    perf.write_text("# P\n<!-- fedbpt:covariance-forms -->\nold\n<!-- /fedbpt:covariance-forms -->\ntail\n")
    text = write_document(_grid(), [], tmp_path, tmp_path / "doc" / "results.md", forms=study).read_text()
    line = "| sst2 | 100 | lowrank k = 8 | 5,500 | 10.0x smaller | 1,600 | 72.00 ± 1.41 | 60.00 ± 0.00 | 2 |"
    assert "### What a task carries of the covariance" in text and line in text
    refreshed = perf.read_text()
    assert line in refreshed and "old" not in refreshed and refreshed.endswith("tail\n")
    assert (tmp_path / "doc" / "results" / "covariance_forms.png").stat().st_size > 5000
    plain = write_document(_grid(), [], tmp_path, tmp_path / "plain" / "results.md").read_text()
    assert "What a task carries" not in plain  # the grid names no study and has one form
