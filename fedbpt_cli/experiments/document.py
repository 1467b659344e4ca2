"""docs/results.md and its plots, written from the cell records (and nothing else)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbpt_cli.experiments import tables
from fedbpt_cli.experiments.figures import save_figure
from fedbpt_cli.experiments.forms import forms_section, refresh_block
from fedbpt_cli.experiments.grid import LABELS, METHODS, Grid, cells, partition_name
from fedbpt_cli.experiments.records import CellResult
from fedbpt_cli.experiments.runner import MEMORY_RECORD

PARTITION_TITLES = {"iid": "IID", "all": "(split-free)"}


def partition_title(p: str) -> str:
    return PARTITION_TITLES.get(p, f"Dirichlet α={p[3:]}" if p.startswith("dir") else p)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.1f} MiB"


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:,.1f} {unit}"
    return f"{value:,.0f} B"


def plot_curves(grid: Grid, records: Sequence[CellResult], folder: Path) -> list[Path]:
    """One PNG per dataset: a panel per partition, mean accuracy per global state (± std shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = tables.mean_curves(records)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    partitions = [partition_name(p) for p in grid.partitions]
    for dataset in grid.datasets:
        if not any(key[0] == dataset and key[2] != "zero_shot" for key in curves):
            continue  # nothing tuned on it yet: no plot (a legend of no entries is an error)
        fig, axes = plt.subplots(1, len(partitions), figsize=(5.2 * len(partitions), 4.2), squeeze=False)
        for ax, part in zip(axes[0], partitions, strict=True):
            for method in METHODS:
                key = (dataset, "all" if method in ("zero_shot", "centralized_bbt") else part, method)
                if key not in curves:
                    continue
                states, means, stds = curves[key]
                if method == "zero_shot":
                    ax.axhline(means[0], color="grey", ls="--", label=LABELS[method])
                    continue
                color = f"C{METHODS.index(method)}"  # one colour per method in every panel
                ax.plot(states, means, marker="o", ms=3, color=color, label=LABELS[method])
                lo = [m - s for m, s in zip(means, stds, strict=True)]
                hi = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(states, lo, hi, color=color, alpha=0.15)
            ax.set(
                title=f"{dataset}, {partition_title(part)}",
                xlabel="round (global state)",
                ylabel="test accuracy",
            )
            ax.grid(alpha=0.3)
        handles: dict[str, Any] = {}
        for ax in axes[0]:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
        path = folder / f"{dataset}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def accuracy_section(
    grid: Grid, records: Sequence[CellResult], plots: dict[str, Path], doc: Path
) -> list[str]:
    stats = tables.accuracy_stats(records)
    partitions = [partition_name(p) for p in grid.partitions]
    lines = []
    for dataset in grid.datasets:
        sizes = {r.test_size for r in records if r.cell.dataset == dataset and r.status == "ok"}
        lines += [
            f"### {dataset} (test set: {', '.join(str(s) for s in sorted(sizes)) or '?'} examples)",
            "",
            "Test accuracy in %, mean ± std over seeds. **selected** = the prompt the run hands out "
            "(lowest validation loss on the sites' held-out examples; test data never chooses it), "
            "**final** = the prompt after the last round, both on the whole test set; **best** = "
            "the best evaluated round (picked with test data: hindsight, on the per-round test set). "
            "Split-free methods have one value per row.",
            "",
            "| method | "
            + " | ".join(" | ".join(f"{partition_title(p)} {k}" for k in tables.KINDS) for p in partitions)
            + " | seeds |",
            "|---|" + "---:|" * (len(tables.KINDS) * len(partitions)) + "---:|",
        ]
        for method in grid.methods:
            cells, seeds = [], 0
            for part in partitions:
                key = (dataset, "all" if method in ("zero_shot", "centralized_bbt") else part, method)
                found = stats.get(key, {})
                cells += [s.pct() if (s := found.get(kind)) else "–" for kind in tables.KINDS]
                seeds = max([seeds] + [s.n for s in found.values() if s])
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {seeds} |")
        if dataset in plots:
            lines += [
                "",
                f"![accuracy per round, {dataset}]({plots[dataset].relative_to(doc.parent).as_posix()})",
            ]
        lines.append("")
    return lines


def data_size_section(records: Sequence[CellResult], doc: Path) -> list[str]:
    """The shots study (experiments/data_size.yaml): selected accuracy against training examples per
    class, one panel per partition, a line per method; and the numbers as a table."""
    points = tables.by_shots(records)
    if not points:
        return [
            "Not run yet: `make data-size` runs experiments/data_size.yaml (SST-2 at 40, 200 and 1,000 "
            "shots per class, IID and Dirichlet 0.5, FedBPT / centralized BBT / zero-shot, 3 seeds) "
            "and this section then shows the selected prompt's accuracy against the shots. Its "
            "1,000-shot cells score 25x the rows of the 40-shot ones: hours each on 2 CPU cores, a "
            "GPU's work.",
            "",
        ]
    path = plot_by_shots(points, doc.parent / "results" / "data_size.png")
    lines = [
        "SST-2, 10 clients; the prompt each run hands out (selected by validation loss) on the whole "
        "test set, mean ± std over seeds, against the training examples per class of the whole "
        "federation (`make data-size`, records in experiments/data_size/results).",
        "",
        f"![selected accuracy against shots per class]({path.relative_to(doc.parent).as_posix()})",
        "",
        "| method | partition | shots per class | selected accuracy | final accuracy | seeds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    finals = tables.by_shots(records, final=True)
    for key, value in sorted(points.items()):
        method, part, shots = key
        last = finals[key].pct() if key in finals else "–"
        lines.append(
            f"| {LABELS[method]} | {partition_title(part)} | {shots} | {value.pct()} | {last} | {value.n} |"
        )
    return [*lines, ""]


def plot_by_shots(points: dict[tuple[str, str, int], tables.Stat], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    partitions = sorted({p for _, p, _ in points if p != "all"}) or ["all"]
    fig, axes = plt.subplots(1, len(partitions), figsize=(5.2 * len(partitions), 4.0), squeeze=False)
    for ax, part in zip(axes[0], partitions, strict=True):
        for method in METHODS:
            series = sorted((k, v) for (m, p, k), v in points.items() if m == method and p in (part, "all"))
            if not series:
                continue
            shots = [k for k, _ in series]
            means = [100 * v.mean for _, v in series]
            errors = [100 * v.std for _, v in series]
            ax.errorbar(shots, means, yerr=errors, marker="o", capsize=3, color=f"C{METHODS.index(method)}",
                        label=LABELS[method])  # fmt: skip
        ax.set(xscale="log", title=f"SST-2, {partition_title(part)}", xlabel="training examples per class",
               ylabel="selected prompt, test accuracy (%)")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


LINKS = ("coordinator_to_client", "client_to_coordinator", "client_to_service", "service_to_client")


def communication_section(grid: Grid, records: Sequence[CellResult]) -> list[str]:
    prompt_length = int(grid.run.get("projection", {}).get("prompt_length", 50))
    lines = [
        "Measured on the wire (HTTP bodies), mean bytes per client per round over the finished cells. "
        "For the white-box baseline, which runs in process, the size of the JSON body that would carry "
        f"its L x hidden prompt (L = {prompt_length}) each way in our protocol:",
        "",
        "| dataset | method | coordinator → client | client → coordinator | client → service | service → client |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for dataset in grid.datasets:
        ds = [r for r in records if r.cell.dataset == dataset]
        for method in grid.methods:
            measured = tables.measured_bytes(ds, method)
            if measured:
                cols = " | ".join(f"{measured[k]:,.0f}" if k in measured else "–" for k in LINKS)
                lines.append(f"| {dataset} | {LABELS[method]} | {cols} |")
    # Perturbation changes only what a client asks the service; the coordinator link is the same.
    source = next((m for m in ("fedbpt", "fedbpt_no_perturb") if tables.measured_bytes(records, m)), None)
    if source is None:
        return [*lines, "", "No finished FedBPT cell yet: no reduction factors.", ""]
    fedbpt = tables.measured_bytes(records, source)
    lines += [
        "",
        f"FedBPT's client ↔ coordinator traffic (measured, {LABELS[source]}) does not depend on the model: "
        "it carries z in R^d, the step size and the d x d covariance down, and the local mean, its "
        "fitness and the step sizes up. Against each model's FedAvg full fine-tuning (every float32 weight "
        f"down and up per round) and FedPrompt (the L x hidden float32 prompt down and up, L = {prompt_length}):",
        "",
        "| model | FedAvg full FT | FedPrompt | FedPrompt, L = 50 | FedBPT measured | FedAvg / FedBPT "
        "| FedAvg up / FedBPT up | FedPrompt / FedBPT | FedPrompt L = 50 / FedBPT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in tables.communication(fedbpt, prompt_length):
        lines.append(
            f"| {row.model} | {_bytes(row.fedavg_bytes)} | {_bytes(row.fedprompt_bytes)} | "
            f"{_bytes(row.fedprompt_paper_bytes)} | {_bytes(row.fedbpt_bytes)} | {row.vs_fedavg:,.0f}x | "
            f"{row.up_vs_fedavg:,.0f}x | {row.vs_fedprompt:,.2f}x | "
            f"{row.fedprompt_paper_bytes / row.fedbpt_bytes:,.2f}x |"
        )
    lines.append("")
    return lines


def memory_section(records: Sequence[CellResult], records_dir: Path) -> list[str]:
    peaks = tables.client_peak_rss(records)
    memory_path = records_dir / MEMORY_RECORD
    whitebox = json.loads(memory_path.read_text()) if memory_path.exists() else {}
    wb = whitebox.get("whitebox_client_peak_rss_bytes")
    lines = ["| client | environment | peak RSS |", "|---|---|---:|"]
    for (install, device), peak in sorted(peaks.items()):
        lines.append(
            "| fedbpt client (`fedbpt client` process: data, pycma, HTTP; the largest of every "
            f"black-box cell's clients) | {install}, cells with the model on {device} | {_mib(peak)} |"
        )
    lines.append(
        "| white-box client (MiniLM in memory, one local round of backpropagation to the prompt) | "
        f"CPU, {whitebox.get('machine', '-')} | {_mib(wb)} |"
    )
    site = [peak for (install, _), peak in peaks.items() if install == "client-only install"]
    if site and wb:
        lines += [
            "",
            f"White-box client / fedbpt client (client-only install, as a site runs it): **{wb / max(site):.1f}x**.",
        ]
    lines.append("")
    return lines


def budget_section(grid: Grid, records: Sequence[CellResult]) -> list[str]:
    rows = tables.query_budget(records)
    walls = tables.wall_seconds(records)
    devices = sorted({d for d, _, _ in walls})
    lines = [
        "| dataset | method | model rows scored for training per run | "
        + " | ".join(f"wall time per run, model on {d}" for d in devices)
        + " |",
        "|---|---|---:|" + "---:|" * len(devices),
    ]
    for dataset in grid.datasets:
        for method in grid.methods:
            r = rows.get((dataset, method))
            w = [walls.get((d, dataset, method)) for d in devices]
            if r is None and not any(w):
                continue
            rows_text = f"{r.mean:,.0f}" if r else "–"
            wall_text = " | ".join(f"{x.mean:,.0f} s (n={x.n})" if x else "–" for x in w)
            lines.append(f"| {dataset} | {LABELS[method]} | {rows_text} | {wall_text} |")
    machines = sorted({f"{r.machine}, model on {r.device}" for r in records if r.status == "ok"})
    lines += ["", f"Machines of these records: {'; '.join(machines)}.", ""]
    return lines


def runs_section(records: Sequence[CellResult]) -> list[str]:
    """Every recorded run on its own line: best (with its round) and final, where and how long."""
    lines = [
        "| cell | best | best round | final | rounds | wall | model on |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in sorted(records, key=lambda r: (r.cell.seed is not None, r.cell.seed or 0, r.cell.key)):
        if r.status != "ok":
            continue
        best = "–" if r.best_accuracy is None else f"{100 * r.best_accuracy:.2f}"
        final = "–" if r.final_accuracy is None else f"{100 * r.final_accuracy:.2f}"
        lines.append(
            f"| `{r.cell.key}` | {best} | {r.best_state if r.best_state is not None else '–'} | {final} | "
            f"{r.rounds} | {r.wall_seconds:,.0f} s | {r.device or '-'} |"
        )
    lines.append("")
    return lines


def coverage_section(grid: Grid, records: Sequence[CellResult]) -> list[str]:
    """How much of the grid the records cover: a partial grid must say so up front."""
    wanted = cells(grid)
    done = {r.cell.key for r in records if r.status == "ok"}
    have = [c for c in wanted if c.key in done]
    lines = ["## Coverage", "", f"**{len(have)} of {len(wanted)} cells** of the grid are recorded."]
    if len(have) < len(wanted):
        by_seed = {s: sum(1 for c in have if c.seed == s) for s in grid.seeds}
        per_seed = sum(1 for c in wanted if c.seed == grid.seeds[0])
        lines.append(
            "Cells recorded per seed: "
            + ", ".join(f"seed {s}: {n} of {per_seed}" for s, n in by_seed.items())
            + ". A '–' in a table is a cell not run yet; `make experiments` runs the rest (it resumes)."
        )
    lines.append("")
    return lines


def write_document(
    grid: Grid,
    records: Sequence[CellResult],
    records_dir: Path,
    doc: Path,
    preface: Path | None = None,
    discussion: Path | None = None,
    data_size: Sequence[CellResult] | None = None,
    forms: Sequence[CellResult] | None = None,
) -> Path:
    """The results document; ``forms``: the records of a covariance-forms study (None: the grid's
    own, when they hold more than one form), also written into performance.md beside ``doc``."""
    plot_paths = plot_curves(grid, records, doc.parent / "results")
    plots = {p.stem: p for p in plot_paths}
    failed = [r.cell.key for r in records if r.status != "ok"]
    lines = [
        "# Results: FedBPT and its baselines, measured",
        "",
        "<!-- Generated by `fedbpt experiment` from experiments/results/*.json; do not edit by hand. -->",
        "",
    ]
    if preface and preface.exists():
        lines += [preface.read_text().rstrip(), ""]
    lines += coverage_section(grid, records)
    lines += ["## Accuracy", ""]
    lines += accuracy_section(grid, records, plots, doc)
    if data_size is not None:  # the grid names a shots study (run or not yet)
        lines += ["## How much data a federation needs", ""]
        lines += data_size_section(data_size, doc)
    lines += ["## Communication", ""]
    lines += communication_section(grid, records)
    forms_records = forms if forms is not None else records
    if forms is not None or len(tables.covariance_forms(records)) > 1:
        block = forms_section(forms_records, doc)
        lines += ["### What a task carries of the covariance", "", *block]
        refresh_block(doc.parent / "performance.md", block)
    lines += ["## Client memory", ""]
    lines += memory_section(records, records_dir)
    lines += ["## Query budget and time", ""]
    lines += budget_section(grid, records)
    if failed:
        lines += ["## Cells that failed", "", *[f"- {k}" for k in failed], ""]
    if discussion and discussion.exists():
        lines += [discussion.read_text().rstrip(), ""]
    lines += ["## Every run", ""]
    lines += runs_section(records)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines))
    return doc
