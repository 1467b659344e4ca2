"""Read models: ``RoundRecord``, ``RunInfo`` and ``ClientSummary`` assembled from the store's typed rows."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from coordinator.store import RoundRow, RunRow, Store, UpdateSummary, Validation, select_state
from protos import ClientSummary, ParticipantRecord, RoundRecord, RunConfig, RunInfo


def weighted(pairs: Iterable[tuple[float | None, float]]) -> float | None:
    """Weighted mean of the (value, weight) pairs with a value and a positive weight; None if none."""
    total = 0.0
    weight = 0.0
    for value, w in pairs:
        if value is not None and w > 0:
            total += value * w
            weight += w
    return total / weight if weight > 0 else None


def round_records(store: Store, run_id: str, config: RunConfig, finished: bool) -> list[RoundRecord]:
    updates: dict[int, list[UpdateSummary]] = defaultdict(list)
    for u in store.update_summaries(run_id):
        updates[u.round].append(u)
    traffic: dict[int, dict[str, tuple[int, int]]] = defaultdict(dict)
    for t in store.traffic(run_id):
        traffic[t.round][t.client_id] = (t.bytes_in, t.bytes_out)
    evals: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for e in store.evals(run_id):
        evals[e.round].append((e.test_accuracy, e.n_test))
    validations = store.validation_by_state(run_id)
    last = config.rounds - 1
    return [
        _round_record(
            r,
            updates.get(r.round, []),
            traffic.get(r.round, {}),
            evals.get(r.round, []) if (r.round == last and finished) else None,
            validations,
            last,
        )
        for r in store.rounds(run_id)
    ]


def _round_record(
    r: RoundRow,
    updates: list[UpdateSummary],
    flows: dict[str, tuple[int, int]],
    final_evals: list[tuple[float, int]] | None,
    validations: dict[int, Validation],
    last: int,
) -> RoundRecord:
    val = validations.get(r.round)
    final_val = validations.get(r.round + 1) if r.round == last else None
    participants = [
        ParticipantRecord(
            client_id=u.client_id,
            name=u.name,
            fitness=u.fitness,
            n_samples=u.n_samples,
            metrics=u.metrics,
            bytes_in=flows.get(u.client_id, (0, 0))[0],
            bytes_out=flows.get(u.client_id, (0, 0))[1],
            clipped=u.client_id in r.clipped,
            rejected=u.client_id in r.rejected,
        )
        for u in updates
    ]
    return RoundRecord(
        round=r.round,
        state=r.state,
        attempt=r.attempt,
        sampled=r.sampled,
        participants=participants,
        sigma_before=r.sigma_before,
        sigma_after=r.sigma_after,
        server_sigma=r.server_sigma,
        mean_norm=r.mean_norm,
        train_loss=weighted((p.metrics.train_loss, p.n_samples) for p in participants),
        test_accuracy=weighted((p.metrics.test_accuracy, p.metrics.n_test) for p in participants),
        final_test_accuracy=weighted(final_evals) if final_evals is not None else None,
        val_loss=val.loss if val else None,
        val_accuracy=val.accuracy if val else None,
        n_val=val.n if val else 0,
        final_val_loss=final_val.loss if final_val else None,
        bytes_in=sum(b for b, _ in flows.values()),
        bytes_out=sum(b for _, b in flows.values()),
        opened_at=r.opened_at,
        closed_at=r.closed_at,
        aggregation_seconds=r.aggregation_seconds,
    )


def run_info(store: Store, row: RunRow, config: RunConfig) -> RunInfo:
    run_id = row.run_id
    per_round: dict[int, list[tuple[float | None, float]]] = defaultdict(list)
    for u in store.update_summaries(run_id):
        per_round[u.round].append((u.metrics.test_accuracy, float(u.metrics.n_test)))
    accuracies = [a for a in (weighted(v) for v in per_round.values()) if a is not None]
    final = None
    if row.state == "finished":
        last = config.rounds - 1
        final = weighted((e.test_accuracy, float(e.n_test)) for e in store.evals(run_id) if e.round == last)
        if final is not None:
            accuracies.append(final)
    validations = store.validation_by_state(run_id)
    selected = select_state(validations)
    return RunInfo(
        run_id=run_id,
        state=row.state,
        round=row.round,
        config=config,
        created_at=row.created_at,
        clients=len(store.clients(run_id)),
        rounds_completed=sum(1 for r in store.rounds(run_id) if r.state == "closed"),
        best_accuracy=max(accuracies) if accuracies else None,
        final_accuracy=final,
        selected_state=selected,
        selected_val_loss=validations[selected].loss if selected is not None else None,
        error=row.error,
    )


def client_summaries(store: Store, run_id: str) -> list[ClientSummary]:
    """Each enrolled client of the run with what it contributed (updates and evaluations)."""
    contributed: dict[str, list[UpdateSummary]] = defaultdict(list)
    for u in store.update_summaries(run_id):  # by round
        contributed[u.client_id].append(u)
    evals = {e.client_id: e for e in store.evals(run_id)}  # ordered by round: the last one wins
    summaries = []
    for c in store.clients(run_id):
        mine = contributed.get(c.client_id, [])
        final = evals.get(c.client_id)
        latest = mine[-1].metrics if mine else None
        accuracy = final.test_accuracy if final is not None else None
        if accuracy is None:
            accuracy = next(
                (u.metrics.test_accuracy for u in reversed(mine) if u.metrics.test_accuracy is not None), None
            )
        seen = [u.received_at for u in mine] + ([final.received_at] if final else [])
        summaries.append(
            ClientSummary(
                client_id=c.client_id,
                name=c.name,
                enrolled_at=c.created_at,
                last_seen=max(seen) if seen else None,
                rounds_contributed=len({u.round for u in mine}),
                last_round=mine[-1].round if mine else None,
                test_accuracy=accuracy,
                train_loss=latest.train_loss if latest else None,
            )
        )
    return summaries
