"""Client sampling and seeds: deterministic in (seed, round, attempt), answering clients kept."""

from __future__ import annotations

from coordinator.sampling import client_seed, evaluates, sample_clients, sample_size

POOL = [f"c{k}" for k in range(10)]


def test_sample_size_is_the_references_formula() -> None:
    assert [sample_size(f, 10) for f in (1.0, 0.5, 0.25, 0.01)] == [10, 5, 2, 1]
    assert sample_size(0.3, 1) == 1


def test_sampling_is_deterministic_ordered_and_varies_by_round() -> None:
    a = sample_clients(POOL, 4, 1234, 3, 1)
    assert a == sample_clients(POOL, 4, 1234, 3, 1)
    assert a == [c for c in POOL if c in a] and len(set(a)) == 4
    draws = {tuple(sample_clients(POOL, 4, 1234, r, 1)) for r in range(20)}
    assert len(draws) > 10
    assert sample_clients(POOL, 10, 1, 0, 1) == POOL


def test_reissue_keeps_the_answering_clients_and_tops_up() -> None:
    for attempt in range(2, 12):
        s = sample_clients(POOL, 4, 99, 0, attempt, keep=["c7", "c2"])
        assert {"c7", "c2"} <= set(s) and len(s) == 4
    assert sample_clients(POOL, 1, 99, 0, 2, keep=["c7", "c2"]) == ["c2", "c7"]  # never drops an answer


def test_client_seeds() -> None:
    assert client_seed("shared", 1234, 5, "c1") == 1234
    seeds = {client_seed("per_client", 1234, r, c) for r in range(20) for c in POOL}
    assert len(seeds) == 200 and all(1 <= s < 2**31 for s in seeds)
    assert client_seed("per_client", 1234, 3, "c1") == client_seed("per_client", 1234, 3, "c1")


def test_evaluate_flag() -> None:
    assert [evaluates(1, r) for r in range(3)] == [True, True, True]
    assert [evaluates(3, r) for r in range(4)] == [True, False, False, True]
    assert not any(evaluates(0, r) for r in range(5))
