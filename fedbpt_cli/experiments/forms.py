"""The covariance-forms study of docs/results.md (experiments/communication/grid.yaml): for each d
and each form in which a task carries the server's C (full, diagonal, low-rank, nothing), the
measured downlink per client and round against the accuracy of the prompt the run hands out.

The same lines go into docs/results.md (inside its Communication section) and, between markers,
into docs/performance.md, so both show the figures of the same records."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedbpt_cli.experiments import tables
from fedbpt_cli.experiments.figures import save_figure
from fedbpt_cli.experiments.records import CellResult

BLOCK = re.compile(r"(<!-- fedbpt:covariance-forms -->\n).*?(<!-- /fedbpt:covariance-forms -->)", re.S)


def forms_section(records: Sequence[CellResult], doc: Path) -> list[str]:
    rows = tables.covariance_forms(records)
    if not rows:
        return [
            "Not run yet: `fedbpt experiment experiments/communication/grid.yaml` measures accuracy "
            "against the downlink for each form of the covariance.",
            "",
        ]
    full = {(row.task, row.dim): row.down for row in rows if row.form == "full"}
    lines = [
        "What a task carries of the server's covariance C (`covariance` in RunConfig; the server "
        "always keeps the full C): FedBPT IID, 10 clients, 40 shots per class, the results grid's "
        "settings and budgets (SST-2 20 rounds, AG News 5; experiments/communication/grid.yaml). "
        "Bytes per client and round measured on the wire (JSON, arrays as base64); accuracy of the "
        "selected and the final prompt on the whole test set, mean ± std over seeds.",
        "",
        "| task | d | C sent as | coordinator → client | vs full C | client → coordinator | selected | final | seeds |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        key = (row.task, row.dim)
        ratio = f"{full[key] / row.down:,.1f}x smaller" if key in full and row.form != "full" else "–"
        seeds = row.selected.n if row.selected else 0
        lines.append(
            f"| {row.task} | {row.dim} | {row.form} | {row.down:,.0f} | {ratio} | {row.up:,.0f} | "
            f"{row.selected.pct() if row.selected else '–'} | {row.final.pct() if row.final else '–'} | {seeds} |"
        )
    path = plot_forms(rows, doc.parent / "results" / "covariance_forms.png")
    return [
        *lines,
        "",
        f"![accuracy against downlink per form]({path.relative_to(doc.parent).as_posix()})",
        "",
    ]


def plot_forms(rows: Sequence[tables.FormRow], path: Path) -> Path:
    """Selected accuracy against downlink, one panel per task, one marker per d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({row.task for row in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.4 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        _plot_task(ax, [row for row in rows if row.task == task], task)
    return save_figure(fig, path)


def _plot_task(ax: Any, rows: Sequence[tables.FormRow], task: str) -> None:
    import matplotlib.ticker

    for i, dim in enumerate(sorted({row.dim for row in rows})):
        for row in (r for r in rows if r.dim == dim and r.selected):
            assert row.selected is not None
            ax.errorbar(row.down, 100 * row.selected.mean, yerr=100 * row.selected.std, marker="os"[i % 2],
                        capsize=3, color=f"C{i}")  # fmt: skip
            ax.annotate(f"{row.form} (n={row.selected.n})", (row.down, 100 * row.selected.mean), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))  # fmt: skip
        ax.plot([], [], "os"[i % 2], color=f"C{i}", label=f"d = {dim}")
    ax.set(xscale="log", xlabel="coordinator → client, bytes per client and round",
           ylabel="selected prompt, test accuracy (%)", title=f"{task}, FedBPT IID: what C costs")  # fmt: skip
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: no overlapping labels
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def refresh_block(path: Path, lines: Sequence[str]) -> bool:
    """Replace the lines between the covariance-forms markers of ``path``, a document in the same
    folder as the results document (so its image links hold); False when it has no markers."""
    if not path.exists() or not BLOCK.search(text := path.read_text()):
        return False
    body = "\n".join(lines).rstrip() + "\n"
    path.write_text(BLOCK.sub(lambda m: m.group(1) + body + m.group(2), text))
    return True
