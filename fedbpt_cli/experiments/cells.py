"""Running one cell of the grid and turning what it produced into a ``CellResult``.

- black-box methods (centralized BBT, FedBPT with and without perturbation, FedAvg-BBT): a
  ``Simulation``, the code path of ``fedbpt simulate``: coordinator and client processes on
  127.0.0.1 talking HTTP to the shared inference service; its report.json is the source.
- zero-shot: the whole test set scored with no prompt rows, through the service.
- the white-box baseline (``whitebox``): in process, on the same data files a simulation writes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fed_clients.data import LabeledTexts, load_labeled_texts
from fed_clients.evaluate import evaluate_prompt
from fed_clients.inputs import encode_split, input_budget
from fed_clients.model_api import ModelService
from fed_clients.presets import resolve_config
from fed_clients.transport import JsonService
from fedbpt_cli import federation_data
from fedbpt_cli.experiments.grid import BLACK_BOX, ONE_GENERATION_PER_ROUND, Cell, Grid
from fedbpt_cli.experiments.records import CellResult, best_and_final
from fedbpt_cli.report import accuracy_curve
from fedbpt_cli.simulation import EXIT_OK, Simulation
from protos import RoundRecord, RunConfig


def run_fields(grid: Grid, cell: Cell) -> dict[str, Any]:
    """The RunConfig fields a cell sets: grid < dataset < method; the cell's seed."""
    from fedbpt_cli.simulate import _merge

    entry = grid.datasets[cell.dataset]
    merged = _merge(_merge(grid.run, entry.run), BLACK_BOX.get(cell.method, {}))
    if cell.method in ONE_GENERATION_PER_ROUND:
        generations = int(merged.get("local_iters", RunConfig.model_fields["local_iters"].default))
        for name in ("rounds", "eval_every"):
            default = RunConfig.model_fields[name].default
            merged[name] = int(merged.get(name, default)) * generations
    merged["seed"] = cell.seed if cell.seed is not None else 0
    merged["name"] = cell.key
    merged["min_clients"] = 1
    return merged


def run_config(grid: Grid, cell: Cell) -> RunConfig:
    """The run settings of a black-box cell."""
    return RunConfig.model_validate(run_fields(grid, cell))


# What a zero-shot score depends on of the run fields (no prompt, no training, no seed).
ZERO_SHOT_FIELDS = ("task", "labels", "max_input_tokens")
# Run fields that change how long a run may wait, not what it computes.
RESULT_NEUTRAL = ("round_timeout_s",)


def cell_settings(grid: Grid, cell: Cell, model: str | None = None) -> dict[str, Any]:
    """Everything in the grid a cell's result depends on, as stored in its record: a record made
    with other settings (say, after a budget in grid.yaml changed) is run again. Only what the
    grid sets is compared, not RunConfig's defaults, so a new defaulted field leaves records valid."""
    fields = {k: v for k, v in run_fields(grid, cell).items() if k not in RESULT_NEUTRAL}
    if cell.method == "zero_shot":
        fields = {k: v for k, v in fields.items() if k in ZERO_SHOT_FIELDS}
    settings: dict[str, Any] = {
        "model": model,
        "service": grid.service,
        "data": grid.datasets[cell.dataset].model_dump(exclude={"run"}),
        "run": fields,
    }
    if cell.method != "zero_shot":
        settings.update(clients=sites(grid, cell), k_shot=k_shot(grid, cell))
    if cell.method == "fedprompt":
        settings["whitebox"] = grid.whitebox.model_dump(exclude={"memory_check"})
    return json.loads(json.dumps(settings))  # as a record reads back: lists, not tuples


def k_shot(grid: Grid, cell: Cell) -> int:
    """Training examples per class for the whole federation: the dataset entry's, else the grid's."""
    entry = grid.datasets[cell.dataset].k_shot
    return entry if entry is not None else grid.k_shot


def sites(grid: Grid, cell: Cell) -> int:
    return 1 if cell.method == "centralized_bbt" else grid.clients


def data_source(grid: Grid, cell: Cell, data_root: Path) -> str:
    data = grid.datasets[cell.dataset].data
    return data if data.startswith("hf:") else str(data_root / data)


def run_black_box(
    grid: Grid, cell: Cell, data_root: Path, work: Path, model_url: str, client_python: str | None = None
) -> CellResult:
    config = run_config(grid, cell)
    work.mkdir(parents=True, exist_ok=True)
    with (work / "simulate.log").open("w") as log:
        sim = Simulation(
            config=config,
            sites=sites(grid, cell),
            data=data_source(grid, cell, data_root),
            out=work,
            alpha=cell.alpha,
            k_shot=k_shot(grid, cell),
            test_split=grid.datasets[cell.dataset].test_split,
            round_test_limit=grid.datasets[cell.dataset].round_test_limit,
            text_column=grid.datasets[cell.dataset].text_column,
            overwrite=True,
            console=Console(file=log, width=120),
            model_url=model_url,
            zero_shot=False,
            client_python=client_python,
        )
        code = sim.run()
    report_path = work / "report.json"
    if code != EXIT_OK or not report_path.exists():
        raise RuntimeError(f"{cell.key}: the simulation failed (exit {code}); see {work / 'simulate.log'}")
    result = result_from_report(cell, json.loads(report_path.read_text()))
    result.details["client_python"] = client_python or sys.executable
    return result


def result_from_report(cell: Cell, report: dict[str, Any]) -> CellResult:
    rounds = [RoundRecord.model_validate(r) for r in report["rounds"]]
    closed = [r for r in rounds if r.state == "closed"]
    curve = accuracy_curve(rounds)
    best, state, final = best_and_final(curve, len(closed))
    summary, simulation = report["summary"], report["simulation"]
    if summary.get("final_accuracy") is not None:
        final = summary["final_accuracy"]  # on the whole test set
    train_rows = sum(p.metrics.service_rows for r in closed for p in r.participants)
    return CellResult(
        cell=cell,
        curve=curve,
        best_accuracy=best,
        best_state=state,
        final_accuracy=final,
        selected_accuracy=summary.get("selected_accuracy"),
        selected_state=summary.get("selected_state"),
        test_size=int(simulation["test_size"]),
        rounds=len(closed),
        clients=int(simulation["clients"]),
        bytes_per_client_per_round=summary["bytes_per_client_per_round"],
        model_rows=int(train_rows),
        client_peak_rss_bytes=simulation.get("client_peak_rss_bytes"),
        wall_seconds=float(summary["wall_seconds"] or 0.0),
        details={
            "train_loss": [r.train_loss for r in closed],
            "val_loss": [r.val_loss for r in closed] + [closed[-1].final_val_loss if closed else None],
            "sigma": [r.sigma_before for r in closed],
            "label_counts": simulation["label_counts"],
            "mean_label_entropy": simulation["mean_label_entropy"],
        },
    )


def test_set(grid: Grid, cell: Cell, data_root: Path) -> LabeledTexts:
    sources = federation_data.find_sources(
        data_source(grid, cell, data_root), grid.datasets[cell.dataset].test_split
    )
    return load_labeled_texts(sources.test, grid.datasets[cell.dataset].text_column)


def run_zero_shot(grid: Grid, cell: Cell, data_root: Path, model_url: str) -> CellResult:
    started = time.monotonic()
    config = run_config(grid, cell)
    test = test_set(grid, cell, data_root)
    with JsonService(name="model service", base_url=model_url, timeout_s=1800) as http:
        model = ModelService(http)
        task = resolve_config(config, model.info().head)
        budget = input_budget(model, task, config.projection.prompt_length, config.max_input_tokens)
        result = evaluate_prompt(model, task.spec, encode_split(model, test, task, budget), batch_size=256)
    return CellResult(
        cell=cell,
        curve=[(0, result.accuracy)],
        best_accuracy=result.accuracy,
        best_state=0,
        final_accuracy=result.accuracy,
        test_size=result.n,
        wall_seconds=time.monotonic() - started,
    )


def run_white_box(grid: Grid, cell: Cell, data_root: Path, work: Path, scorer: Any) -> CellResult:
    """The gradient baseline on exactly the client files a simulation of this cell would write."""
    from fed_clients.presets import resolve_task
    from fedbpt_cli.experiments.whitebox import PromptModel, run_federation

    config = run_config(grid, cell)
    sources = federation_data.find_sources(
        data_source(grid, cell, data_root), grid.datasets[cell.dataset].test_split
    )
    files = federation_data.prepare(
        sources,
        work / "data",
        grid.clients,
        k_shot(grid, cell),
        cell.alpha,
        config.seed,
        text_column=grid.datasets[cell.dataset].text_column,
    )
    task = resolve_task(config.task, scorer.info.head, config.template, config.labels)
    model = PromptModel(
        scorer, task, config.projection.prompt_length, config.max_input_tokens, config.projection.p0_text
    )
    train = [load_labeled_texts(str(p)) for p in files.train]
    run = run_federation(
        model,
        train,
        load_labeled_texts(sources.test),
        rounds=config.rounds,
        local_steps=grid.whitebox.local_steps,
        lr=grid.whitebox.lr,
        eval_every=config.eval_every,
        seed=config.seed,
    )
    best, state, final = best_and_final(run.curve, config.rounds)
    return CellResult(
        cell=cell,
        curve=run.curve,
        best_accuracy=best,
        best_state=state,
        final_accuracy=final,
        test_size=files.test_size,
        rounds=config.rounds,
        clients=grid.clients,
        bytes_per_client_per_round={
            "coordinator_to_client": float(run.bytes_per_direction),
            "client_to_coordinator": float(run.bytes_per_direction),
        },
        wall_seconds=run.seconds,
        details={"train_loss": run.losses, "label_counts": files.counts.tolist()},
    )
