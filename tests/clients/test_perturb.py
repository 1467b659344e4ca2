"""Input perturbation: rate, scope, special ids, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from fed_clients.perturb import Perturber, client_key_int, perturb_ids, replacement_pool, round_seed

VOCAB = 1000
SPECIALS = (0, 1, 2, 3, 103)


def _inputs(n_seqs: int = 2000, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    # Input ids as a tokenizer gives them: never special ids.
    pool = replacement_pool(VOCAB, SPECIALS)
    return [pool[rng.integers(0, pool.size, size=int(rng.integers(5, 60)))].tolist() for _ in range(n_seqs)]


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_replaced_share_matches_the_rate(rate: float) -> None:
    ids = _inputs()
    out = Perturber(VOCAB, SPECIALS, rate).copy(ids, run_seed=1234, round_=3, client_key="c1").input_ids
    flat_in = np.concatenate([np.array(s) for s in ids])
    flat_out = np.concatenate([np.array(s) for s in out])
    assert flat_in.size > 50_000
    changed = float((flat_in != flat_out).mean())
    # A replacement can draw the same id again (1 in |pool|), so the visible share is a bit lower.
    expected = rate * (1 - 1 / (VOCAB - len(SPECIALS)))
    assert abs(changed - expected) < 0.01, (changed, expected)


def test_shapes_are_kept_and_only_the_given_input_ids_change() -> None:
    ids = _inputs(200)
    copy = Perturber(VOCAB, SPECIALS, 0.5).copy(ids, 1, 0, "c")
    assert [len(s) for s in copy.input_ids] == [len(s) for s in ids]
    # Scope "input": the service gets no instruction to touch the template, specials or mask.
    assert copy.template is None


def test_input_scope_never_draws_special_ids() -> None:
    ids = _inputs(3000)
    out = Perturber(VOCAB, SPECIALS, 1.0).copy(ids, 7, 0, "c").input_ids
    flat = np.concatenate([np.array(s) for s in out])
    assert not np.isin(flat, SPECIALS).any()
    # ... while covering the rest of the vocabulary uniformly: every other id shows up.
    assert np.unique(flat).size == VOCAB - len(SPECIALS)


def test_all_scope_draws_from_the_whole_vocabulary_and_asks_the_service_for_the_rest() -> None:
    ids = _inputs(3000)
    copy = Perturber(VOCAB, SPECIALS, 1.0, scope="all").copy(ids, 7, 0, "c")
    flat = np.concatenate([np.array(s) for s in copy.input_ids])
    assert np.isin(flat, SPECIALS).any()  # as the reference: any id, specials included
    assert copy.template is not None
    assert copy.template.rate == 1.0
    assert 0 <= copy.template.seed < 2**63
    next_round = Perturber(VOCAB, SPECIALS, 1.0, scope="all").copy(ids, 7, 1, "c")
    assert next_round.template is not None and next_round.template.seed != copy.template.seed


def test_seeded_reproducible_and_fresh_per_round_and_client() -> None:
    ids = _inputs(100)
    p = Perturber(VOCAB, SPECIALS, 0.5)
    a = p.copy(ids, 1234, 5, "client-a").input_ids
    assert a == p.copy(ids, 1234, 5, "client-a").input_ids
    assert a != p.copy(ids, 1234, 6, "client-a").input_ids  # fresh each round
    assert a != p.copy(ids, 1234, 5, "client-b").input_ids  # and per client
    assert a != p.copy(ids, 99, 5, "client-a").input_ids  # and per run seed


def test_perturbation_leaves_numpys_global_rng_alone() -> None:
    # pycma samples from numpy's global RNG; perturbing between two asks must not shift it.
    np.random.seed(5)
    expected = np.random.rand(3)
    np.random.seed(5)
    Perturber(VOCAB, SPECIALS, 0.5).copy(_inputs(50), 1, 1, "c")
    assert np.array_equal(np.random.rand(3), expected)


def test_rate_zero_changes_nothing_and_edge_cases() -> None:
    ids = _inputs(50)
    assert Perturber(VOCAB, SPECIALS, 0.0).copy(ids, 1, 1, "c").input_ids == ids
    assert perturb_ids([], 0.5, replacement_pool(10), np.random.default_rng(0)) == []
    with pytest.raises(ValueError):
        replacement_pool(3, (0, 1, 2))
    with pytest.raises(ValueError):
        Perturber(VOCAB, SPECIALS, 0.5, scope="everything")
    assert round_seed(1, 2, "x").entropy == round_seed(1, 2, "x").entropy


def test_a_clients_key_is_the_little_endian_head_of_the_sha256_of_its_name() -> None:
    """The seeding must not change between versions or machines: the key of "site-a" is the first
    8 bytes of SHA-256("site-a") = d7 4a 1f fe 00 24 2c d0, read low byte first."""
    assert client_key_int("site-a") == 0xD02C2400FE1F4AD7


def test_perturbed_ids_stay_integers() -> None:
    """They go to the service as token ids (JSON integers), however many are replaced."""
    out = perturb_ids([[5, 6, 7], [], [8]], 0.5, replacement_pool(50), np.random.default_rng(3))
    assert [len(s) for s in out] == [3, 0, 1]
    assert all(type(t) is int for s in out for t in s)


def test_the_template_seed_uses_the_schemas_63_bits() -> None:
    """Scope "all": the per-round seed for the service spans [0, 2**63), not a 32- or 62-bit part."""
    p = Perturber(VOCAB, SPECIALS, 0.3, scope="all")
    seeds = []
    for round_ in range(16):
        template = p.copy([[5, 6]], 7, round_, "c").template
        assert template is not None
        seeds.append(template.seed)
    assert all(0 <= s < 2**63 for s in seeds)
    assert max(seeds) >= 2**62


def test_refusals_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"^no vocabulary ids left to draw replacements from$"):
        replacement_pool(3, (0, 1, 2))
    with pytest.raises(ValueError, match=r"^unknown perturb scope 'everything'$"):
        Perturber(VOCAB, SPECIALS, 0.5, scope="everything")
    for rate in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"^perturb rate must be in \[0, 1\]$"):
            Perturber(VOCAB, SPECIALS, rate)
    Perturber(VOCAB, SPECIALS, 1.0)
