"""Read models: ``RoundRecord`` and ``RunInfo`` assembled from the stored rows."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable

from coordinator.store import Store, select_state
from protos import ClientMetrics, ClientSummary, ParticipantRecord, RoundRecord, RunConfig, RunInfo


def weighted(pairs: Iterable[tuple[float | None, float]]) -> float | None:
    """Weighted mean of the (value, weight) pairs with a value and a positive weight; None if none."""
    total = 0.0
    weight = 0.0
    for value, w in pairs:
        if value is not None and w > 0:
            total += value * w
            weight += w
    return total / weight if weight > 0 else None


def _json_list(text: str | None) -> list[str]:
    return [] if text is None else [str(x) for x in json.loads(text)]


def round_records(store: Store, run_id: str, config: RunConfig, finished: bool) -> list[RoundRecord]:
    rounds = store.all("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", (run_id,))
    updates: dict[int, list[sqlite3.Row]] = defaultdict(list)
    for u in store.all(
        "SELECT u.round, u.client_id, c.name, u.fitness, u.n_samples, u.metrics "
        "FROM updates u JOIN clients c ON c.client_id = u.client_id "
        "WHERE u.run_id = ? ORDER BY u.round, c.seq",
        (run_id,),
    ):
        updates[int(u["round"])].append(u)
    traffic: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
    for t in store.all(
        "SELECT round, client_id, bytes_in, bytes_out FROM traffic WHERE run_id = ?", (run_id,)
    ):
        traffic[int(t["round"])][t["client_id"]] = (int(t["bytes_in"]), int(t["bytes_out"]))
    evals: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for e in store.all("SELECT round, test_accuracy, n_test FROM evals WHERE run_id = ?", (run_id,)):
        evals[int(e["round"])].append((float(e["test_accuracy"]), int(e["n_test"])))

    validations = store.validation_by_state(run_id)
    records: list[RoundRecord] = []
    for r in rounds:
        number = int(r["round"])
        val = validations.get(number)
        final_val = validations.get(number + 1) if number == config.rounds - 1 else None
        clipped = set(_json_list(r["clipped"]))
        rejected = set(_json_list(r["rejected"]))
        flows = traffic.get(number, {})
        participants: list[ParticipantRecord] = []
        for u in updates.get(number, []):
            bytes_in, bytes_out = flows.get(u["client_id"], (0, 0))
            participants.append(
                ParticipantRecord(
                    client_id=u["client_id"],
                    name=u["name"],
                    fitness=float(u["fitness"]),
                    n_samples=int(u["n_samples"]),
                    metrics=ClientMetrics.model_validate_json(u["metrics"]),
                    bytes_in=bytes_in,
                    bytes_out=bytes_out,
                    clipped=u["client_id"] in clipped,
                    rejected=u["client_id"] in rejected,
                )
            )
        last = number == config.rounds - 1
        records.append(
            RoundRecord(
                round=number,
                state=r["state"],
                attempt=int(r["attempt"]),
                sampled=_json_list(r["sampled"]),
                participants=participants,
                sigma_before=r["sigma_before"],
                sigma_after=r["sigma_after"],
                server_sigma=r["server_sigma"],
                mean_norm=r["mean_norm"],
                train_loss=weighted((p.metrics.train_loss, p.n_samples) for p in participants),
                test_accuracy=weighted((p.metrics.test_accuracy, p.metrics.n_test) for p in participants),
                final_test_accuracy=weighted(evals.get(number, [])) if (last and finished) else None,
                val_loss=val.loss if val else None,
                val_accuracy=val.accuracy if val else None,
                n_val=val.n if val else 0,
                final_val_loss=final_val.loss if final_val else None,
                bytes_in=sum(b for b, _ in flows.values()),
                bytes_out=sum(b for _, b in flows.values()),
                opened_at=r["opened_at"],
                closed_at=r["closed_at"],
                aggregation_seconds=r["aggregation_seconds"],
            )
        )
    return records


def run_info(store: Store, row: sqlite3.Row, config: RunConfig) -> RunInfo:
    run_id = row["run_id"]
    finished = row["state"] == "finished"
    clients = store.one("SELECT COUNT(*) AS n FROM clients WHERE run_id = ?", (run_id,))
    closed = store.one("SELECT COUNT(*) AS n FROM rounds WHERE run_id = ? AND state = 'closed'", (run_id,))
    per_round: dict[int, list[tuple[float | None, float]]] = defaultdict(list)
    for u in store.all("SELECT round, metrics FROM updates WHERE run_id = ?", (run_id,)):
        m = json.loads(u["metrics"])
        per_round[int(u["round"])].append((m.get("test_accuracy"), float(m.get("n_test") or 0)))
    accuracies = [a for a in (weighted(v) for v in per_round.values()) if a is not None]
    final = None
    if finished:
        last = config.rounds - 1
        final = weighted(
            (float(e["test_accuracy"]), float(e["n_test"]))
            for e in store.all(
                "SELECT test_accuracy, n_test FROM evals WHERE run_id = ? AND round = ?", (run_id, last)
            )
        )
        if final is not None:
            accuracies.append(final)
    validations = store.validation_by_state(run_id)
    selected = select_state(validations)
    return RunInfo(
        run_id=run_id,
        state=row["state"],
        round=int(row["round"]),
        config=config,
        created_at=float(row["created_at"]),
        clients=int(clients["n"]) if clients else 0,
        rounds_completed=int(closed["n"]) if closed else 0,
        best_accuracy=max(accuracies) if accuracies else None,
        final_accuracy=final,
        selected_state=selected,
        selected_val_loss=validations[selected].loss if selected is not None else None,
        error=row["error"],
    )


def client_summaries(store: Store, run_id: str) -> list[ClientSummary]:
    """Each enrolled client of the run with what it contributed (updates and evaluations)."""
    contributed: dict[str, list[sqlite3.Row]] = defaultdict(list)
    for u in store.all(
        "SELECT client_id, round, metrics, received_at FROM updates WHERE run_id = ? ORDER BY round",
        (run_id,),
    ):
        contributed[u["client_id"]].append(u)
    evals: dict[str, sqlite3.Row] = {}
    for e in store.all(
        "SELECT client_id, round, test_accuracy, received_at FROM evals WHERE run_id = ? ORDER BY round",
        (run_id,),
    ):
        evals[e["client_id"]] = e  # ordered by round: the last one wins
    summaries = []
    for c in store.all(
        "SELECT client_id, name, created_at FROM clients WHERE run_id = ? ORDER BY seq", (run_id,)
    ):
        mine = contributed.get(c["client_id"], [])
        final = evals.get(c["client_id"])
        latest = ClientMetrics.model_validate_json(mine[-1]["metrics"]) if mine else None
        reported = [ClientMetrics.model_validate_json(u["metrics"]).test_accuracy for u in mine]
        accuracy = final["test_accuracy"] if final is not None else None
        if accuracy is None:
            accuracy = next((a for a in reversed(reported) if a is not None), None)
        seen = [float(u["received_at"]) for u in mine] + ([float(final["received_at"])] if final else [])
        summaries.append(
            ClientSummary(
                client_id=c["client_id"],
                name=c["name"],
                enrolled_at=float(c["created_at"]),
                last_seen=max(seen) if seen else None,
                rounds_contributed=len({int(u["round"]) for u in mine}),
                last_round=int(mine[-1]["round"]) if mine else None,
                test_accuracy=accuracy,
                train_loss=latest.train_loss if latest else None,
            )
        )
    return summaries
