"""Numbers of docs/results.md computed from the cell records: mean +- std over seeds, the
communication comparison and the memory comparison. Pure functions of the records."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from fedbpt_cli.experiments.records import CellResult

# Reference models of the communication table: parameters and hidden size (from their configs).
# MiniLM's count is the embedded model's own; the others are the published architectures.
MODELS: dict[str, tuple[int, int]] = {
    "all-MiniLM-L6-v2": (22_713_216, 384),
    "RoBERTa-large": (355_359_744, 1024),
    "Llama-2-7B": (6_738_415_616, 4096),
}
FLOAT32 = 4
PAPER_PROMPT_LENGTH = 50


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float
    n: int

    def pct(self) -> str:
        if self.n == 1:
            return f"{100 * self.mean:.2f}"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


def stat(values: Sequence[float]) -> Stat | None:
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stat(statistics.fmean(values), std, len(values))


# The three accuracies of a cell, in the order the tables print them: the prompt the run hands out
# (selected by validation loss), the last one, and the best evaluated one (picked with test data).
KINDS = ("selected", "final", "best")


def accuracy_stats(records: Sequence[CellResult]) -> dict[tuple[str, str, str], dict[str, Stat | None]]:
    """(dataset, partition, method) -> {selected, final, best: accuracy over seeds}. A record
    without a selected accuracy (no validation, or made before selection) counts its final one:
    what such a run hands out."""
    values: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.status != "ok":
            continue
        key = (r.cell.dataset, r.cell.partition, r.cell.method)
        selected = r.selected_accuracy if r.selected_accuracy is not None else r.final_accuracy
        for kind, value in zip(KINDS, (selected, r.final_accuracy, r.best_accuracy), strict=True):
            if value is not None:
                values[key][kind].append(value)
    return {k: {kind: stat(v.get(kind, [])) for kind in KINDS} for k, v in values.items()}


def by_shots(records: Sequence[CellResult], *, final: bool = False) -> dict[tuple[str, str, int], Stat]:
    """(method, partition, shots per class) -> selected (or, with ``final``, final) accuracy over
    seeds, from records whose settings name their k_shot (a shots study); zero-shot rows sit at
    every shots count."""
    values: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    shots = sorted({int(r.settings["k_shot"]) for r in records if r.settings and "k_shot" in r.settings})
    for r in records:
        if r.status != "ok":
            continue
        accuracy = r.selected_accuracy if r.selected_accuracy is not None else r.final_accuracy
        if final:
            accuracy = r.final_accuracy
        if accuracy is None:
            continue
        if r.cell.method == "zero_shot":  # no training: one figure (the first), drawn at every count
            for k in shots:
                values.setdefault(("zero_shot", "all", k), [accuracy])
        elif r.settings and "k_shot" in r.settings:
            values[(r.cell.method, r.cell.partition, int(r.settings["k_shot"]))].append(accuracy)
    return {k: s for k, v in values.items() if (s := stat(v)) is not None}


def mean_curves(
    records: Sequence[CellResult],
) -> dict[tuple[str, str, str], tuple[list[int], list[float], list[float]]]:
    """(dataset, partition, method) -> (states, mean accuracy, std) over the seeds that have the state."""
    points: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.status == "ok":
            for state, acc in r.curve:
                points[(r.cell.dataset, r.cell.partition, r.cell.method)][state].append(acc)
    out = {}
    for key, by_state in points.items():
        states = sorted(by_state)
        means = [statistics.fmean(by_state[s]) for s in states]
        stds = [statistics.stdev(by_state[s]) if len(by_state[s]) > 1 else 0.0 for s in states]
        out[key] = (states, means, stds)
    return out


def measured_bytes(records: Sequence[CellResult], method: str) -> dict[str, float]:
    """Mean bytes per client per round on each link over a method's finished cells."""
    per: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.cell.method == method:
            for link, value in r.bytes_per_client_per_round.items():
                per[link].append(value)
    return {link: statistics.fmean(v) for link, v in per.items()}


@dataclass(frozen=True)
class CommRow:
    model: str
    fedavg_bytes: int  # full fine-tuning: every weight down and up, float32
    fedprompt_bytes: int  # the L x hidden prompt down and up, float32 (raw, no encoding)
    fedprompt_paper_bytes: int  # the same at the paper's L = 50
    fedbpt_bytes: float  # measured, client <-> coordinator, both directions
    fedbpt_up_bytes: float  # measured, client -> coordinator

    @property
    def vs_fedavg(self) -> float:
        return self.fedavg_bytes / self.fedbpt_bytes

    @property
    def up_vs_fedavg(self) -> float:
        return (self.fedavg_bytes / 2) / self.fedbpt_up_bytes

    @property
    def vs_fedprompt(self) -> float:
        return self.fedprompt_bytes / self.fedbpt_bytes


def communication(fedbpt: dict[str, float], prompt_length: int) -> list[CommRow]:
    """FedBPT's measured coordinator traffic does not depend on the model (only on d), so the
    same measured figure stands against each model's FedAvg and FedPrompt traffic."""
    both = fedbpt.get("coordinator_to_client", 0.0) + fedbpt.get("client_to_coordinator", 0.0)
    up = fedbpt.get("client_to_coordinator", 0.0)
    return [
        CommRow(
            model=name,
            fedavg_bytes=2 * params * FLOAT32,
            fedprompt_bytes=2 * prompt_length * hidden * FLOAT32,
            fedprompt_paper_bytes=2 * PAPER_PROMPT_LENGTH * hidden * FLOAT32,
            fedbpt_bytes=both,
            fedbpt_up_bytes=up,
        )
        for name, (params, hidden) in MODELS.items()
    ]


def client_install(record: CellResult) -> str:
    """Which environment the clients ran from: a site's client-only install, or a full one where
    pycma finds (and imports) scipy and matplotlib."""
    python = str(record.details.get("client_python", ""))
    return "client-only install" if "venv-client" in python else "full install"


def client_peak_rss(records: Sequence[CellResult]) -> dict[tuple[str, str], int]:
    """(client install, where the model ran) -> the largest peak RSS of any fedbpt client process."""
    out: dict[tuple[str, str], int] = {}
    for r in records:
        if r.status == "ok" and r.client_peak_rss_bytes:
            key = (client_install(r), r.device)
            out[key] = max(out.get(key, 0), r.client_peak_rss_bytes)
    return out


def query_budget(records: Sequence[CellResult]) -> dict[tuple[str, str], Stat | None]:
    """(dataset, method) -> model rows scored for training per run, over cells."""
    rows: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.model_rows:
            rows[(r.cell.dataset, r.cell.method)].append(float(r.model_rows))
    return {k: stat(v) for k, v in rows.items()}


def wall_seconds(records: Sequence[CellResult]) -> dict[tuple[str, str, str], Stat | None]:
    """(where it ran, dataset, method) -> wall seconds per cell."""
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in records:
        if r.status == "ok":
            out[(r.device, r.cell.dataset, r.cell.method)].append(r.wall_seconds)
    return {k: stat(v) for k, v in out.items()}


@dataclass(frozen=True)
class FormRow:
    """One covariance form of the communication study: its downlink and what it cost in accuracy."""

    task: str  # the run's task preset (sst2, ag_news, ...)
    dim: int
    form: str  # "full", "diagonal", "lowrank k = 8", "identity"; ", float32 mean" where the mean is
    down: float  # coordinator -> client, bytes per client and round (measured)
    up: float  # client -> coordinator
    selected: Stat | None
    final: Stat | None


def covariance_forms(records: Sequence[CellResult]) -> list[FormRow]:
    """FedBPT cells grouped by (task, d, what the task carried of C), from each record's run
    settings; by task, then d ascending, the heaviest form first."""
    from protos import RunConfig  # the settings are RunConfig fields; read them as the run did

    groups: dict[tuple[str, int, str], list[CellResult]] = defaultdict(list)
    for r in records:
        if r.status == "ok" and r.cell.method.startswith("fedbpt") and r.settings:
            config = RunConfig.model_validate(r.settings["run"])
            form = config.covariance + (
                f" k = {config.covariance_rank}" if config.covariance == "lowrank" else ""
            )
            if config.mean_dtype != "float64":  # another task on the wire: its own row
                form += f", {config.mean_dtype} mean"
            groups[(config.task, config.dim, form)].append(r)
    rows = []
    for (task, dim, form), group in groups.items():
        selected = [
            r.selected_accuracy if r.selected_accuracy is not None else r.final_accuracy for r in group
        ]
        rows.append(
            FormRow(
                task=task,
                dim=dim,
                form=form,
                down=statistics.fmean(
                    r.bytes_per_client_per_round.get("coordinator_to_client", 0.0) for r in group
                ),
                up=statistics.fmean(
                    r.bytes_per_client_per_round.get("client_to_coordinator", 0.0) for r in group
                ),
                selected=stat([v for v in selected if v is not None]),
                final=stat([r.final_accuracy for r in group if r.final_accuracy is not None]),
            )
        )
    return sorted(rows, key=lambda row: (row.task, row.dim, -row.down))
