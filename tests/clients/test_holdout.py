"""The validation split a site holds out (``inputs.hold_out``): its size, that it is drawn from the
run seed and the site's name alone, and that sites too small to spare examples validate nothing."""

from __future__ import annotations

import numpy as np

from fed_clients.inputs import MIN_TRAIN_EXAMPLES, EncodedSplit, hold_out


def _split(n: int) -> EncodedSplit:
    return EncodedSplit([[100 + i] for i in range(n)], np.arange(n) % 2)


def test_the_share_is_held_out_and_nothing_is_lost_or_shared() -> None:
    train, val = hold_out(_split(20), 0.25, seed=7, client_key="site-a")
    assert val is not None and (len(train), len(val)) == (15, 5)  # floor(0.25 * 20)
    ids = sorted(x[0] for x in train.input_ids + val.input_ids)
    assert ids == list(range(100, 120))  # a partition: every example in exactly one part
    for part in (train, val):  # labels travel with their inputs
        assert [x[0] % 2 for x in part.input_ids] == part.labels.tolist()


def test_the_draw_follows_the_run_seed_and_the_site_name() -> None:
    def held(seed: int, key: str) -> list[int]:
        _, val = hold_out(_split(40), 0.25, seed, key)
        assert val is not None
        return [x[0] for x in val.input_ids]

    assert held(7, "site-a") == held(7, "site-a")  # a restart or a rerun holds out the same ones
    assert held(7, "site-a") != held(7, "site-b")
    assert held(7, "site-a") != held(8, "site-a")


def test_small_sites_and_a_zero_share_validate_nothing() -> None:
    whole = _split(3)
    assert hold_out(whole, 0.25, 1, "x") == (whole, None)  # floor(0.75) = 0 held out
    assert hold_out(_split(10), 0.0, 1, "x")[1] is None
    # Holding out 1 of 2 would leave fewer than MIN_TRAIN_EXAMPLES to train on.
    assert MIN_TRAIN_EXAMPLES == 2 and hold_out(_split(2), 0.5, 1, "x")[1] is None
    train, val = hold_out(_split(4), 0.5, 1, "x")
    assert val is not None and len(train) == len(val) == 2
