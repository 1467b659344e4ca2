"""A finished run as a report folder: ``report.json`` (config, per-round metrics, bytes, summary),
``curves.png`` (accuracy and loss per round), ``prompt.json`` (the prompt the run hands out: the
state selected by validation loss) and ``prompt_final.json`` (the last state)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protos import PromptResponse, RoundRecord, RunInfo


def accuracy_curve(rounds: Sequence[RoundRecord]) -> list[tuple[int, float]]:
    """(state index, test accuracy): round r's record holds state r's accuracy; the last round's
    ``final_test_accuracy`` is the accuracy of the final state."""
    points = [(r.round, r.test_accuracy) for r in rounds if r.test_accuracy is not None]
    closed = [r for r in rounds if r.state == "closed"]
    if closed and closed[-1].final_test_accuracy is not None:
        points.append((closed[-1].round + 1, closed[-1].final_test_accuracy))
    return [(i, float(a)) for i, a in points if a is not None]


def bytes_per_client_round(rounds: Sequence[RoundRecord]) -> dict[str, float]:
    """Mean bytes one client moved in one round, on each link, as measured on the wire."""
    per: dict[str, list[float]] = {
        "coordinator_to_client": [],
        "client_to_coordinator": [],
        "client_to_service": [],
        "service_to_client": [],
    }
    for record in rounds:
        for p in record.participants:
            per["coordinator_to_client"].append(p.bytes_out)
            per["client_to_coordinator"].append(p.bytes_in)
            per["client_to_service"].append(p.metrics.service_bytes_sent)
            per["service_to_client"].append(p.metrics.service_bytes_received)
    return {k: (statistics.fmean(v) if v else 0.0) for k, v in per.items()}


def summarize(
    info: RunInfo,
    rounds: Sequence[RoundRecord],
    zero_shot_accuracy: float | None = None,
    wall_seconds: float | None = None,
    whole_test: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The run in figures. ``whole_test``: {"selected"|"final": {state, accuracy}} scored on the
    whole test set after the run (the simulation does); without it the final accuracy is the
    clients' own report and the selected one unknown."""
    curve = accuracy_curve(rounds)
    best = max(curve, key=lambda p: p[1]) if curve else None
    closed = [r for r in rounds if r.state == "closed"]
    final = curve[-1] if curve and closed and curve[-1][0] == closed[-1].round + 1 else None
    whole = whole_test or {}
    selected, last = whole.get("selected", {}), whole.get("final", {})
    return {
        "run_id": info.run_id,
        "state": info.state,
        "rounds_completed": len(closed),
        "zero_shot_accuracy": zero_shot_accuracy,
        "initial_accuracy": curve[0][1] if curve and curve[0][0] == 0 else None,
        # On the whole test set: the prompt the run hands out (chosen by validation loss) and the last.
        "selected_accuracy": selected.get("accuracy"),
        "selected_state": selected.get("state", info.selected_state),
        "final_accuracy": last.get("accuracy", final[1] if final else None),
        "final_state": last.get("state", closed[-1].round + 1 if closed else None),
        # Picked with test data (hindsight, on the per-round test set): a reference, never handed out.
        "best_accuracy": best[1] if best else None,
        "best_state": best[0] if best else None,
        "final_train_loss": closed[-1].train_loss if closed else None,
        "participants_per_round": statistics.fmean(len(r.participants) for r in closed) if closed else 0.0,
        "bytes_per_client_per_round": bytes_per_client_round(closed),
        "wall_seconds": wall_seconds,
    }


def plot_curves(
    rounds: Sequence[RoundRecord],
    path: Path,
    zero_shot_accuracy: float | None = None,
    selected_state: int | None = None,
) -> None:
    """Accuracy of each global state (the selected one marked), train and validation loss, and
    client sigma per round, one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    closed = [r for r in rounds if r.state == "closed"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _plot_accuracy(axes[0], accuracy_curve(rounds), zero_shot_accuracy, selected_state)
    _plot_losses(axes[1], closed)
    _plot_step_sizes(axes[2], closed)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _series(ax: Any, points: Sequence[tuple[float, float]], **style: Any) -> bool:
    """One line through (x, y) points; False (nothing drawn) when there are none."""
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], ms=3, **style)
    return bool(points)


def _plot_accuracy(
    ax: Any, curve: Sequence[tuple[float, float]], zero_shot: float | None, selected: int | None
) -> None:
    _series(ax, curve, marker="o", label="global prompt")
    if zero_shot is not None:
        ax.axhline(zero_shot, color="grey", ls="--", label=f"zero-shot {zero_shot:.3f}")
    if selected is not None:
        ax.axvline(selected, color="tab:purple", ls=":", label=f"selected (state {selected})")
    ax.set(
        title="test accuracy of the global prompt",
        xlabel="global state (rounds aggregated)",
        ylabel="accuracy",
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)


def _plot_losses(ax: Any, closed: Sequence[RoundRecord]) -> None:
    losses = [(r.round, r.train_loss) for r in closed if r.train_loss is not None]
    _series(ax, losses, marker="o", color="tab:red", label="train")
    val = [(r.round, r.val_loss) for r in closed if r.val_loss is not None]
    if closed and closed[-1].final_val_loss is not None:
        val.append((closed[-1].round + 1, closed[-1].final_val_loss))
    if _series(ax, val, marker="s", color="tab:purple", label="validation"):
        ax.legend(loc="upper right")
    ax.set(
        title="loss: train (after local training), validation (of state r)",
        xlabel="round / state",
        ylabel="cross-entropy",
    )
    ax.grid(alpha=0.3)


def _plot_step_sizes(ax: Any, closed: Sequence[RoundRecord]) -> None:
    sig = [(r.round, r.sigma_before) for r in closed if r.sigma_before is not None]
    _series(ax, sig, marker="o", color="tab:green", label="client sigma")
    srv = [(r.round, r.server_sigma) for r in closed if r.server_sigma is not None]
    _series(ax, srv, marker=".", color="tab:olive", label="server sigma'")
    ax.set(title="step sizes", xlabel="round", ylabel="sigma")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)


def write_report(
    out_dir: Path,
    info: RunInfo,
    rounds: Sequence[RoundRecord],
    prompt: PromptResponse | None,
    simulation: dict[str, Any],
    zero_shot_accuracy: float | None = None,
    wall_seconds: float | None = None,
    final_prompt: PromptResponse | None = None,
) -> dict[str, Any]:
    """Write the report files and return the summary: report.json, curves.png, prompt.json (the
    prompt the run hands out: the selected state) and prompt_final.json (the last state)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(info, rounds, zero_shot_accuracy, wall_seconds, simulation.get("whole_test"))
    report = {
        "summary": summary,
        "simulation": simulation,
        "config": info.config.model_dump(mode="json"),
        "run": info.model_dump(mode="json", exclude={"config"}),
        "rounds": [r.model_dump(mode="json") for r in rounds],
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    if prompt is not None:
        (out_dir / "prompt.json").write_text(prompt.model_dump_json(indent=2))
    if final_prompt is not None:
        (out_dir / "prompt_final.json").write_text(final_prompt.model_dump_json(indent=2))
    plot_curves(rounds, out_dir / "curves.png", zero_shot_accuracy, summary["selected_state"])
    return summary
