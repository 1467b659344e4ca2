"""How ``fedbpt simulate`` splits one dataset into client files and test shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fed_clients.data import DataError
from fedbpt_cli.federation_data import find_sources, prepare


def _write(path: Path, rows: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))


def _read(path: Path) -> list[tuple[str, int]]:
    return [(r["text"], r["label"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _write(tmp_path / "d" / "train.jsonl", [(f"train {i}", i % 3) for i in range(300)])
    _write(tmp_path / "d" / "test.jsonl", [(f"test {i}", i % 3) for i in range(50)])
    return tmp_path / "d"


def test_k_shot_pool_split_once_and_test_dealt_in_shards(folder: Path, tmp_path: Path) -> None:
    files = prepare(find_sources(str(folder)), tmp_path / "out", clients=4, k_shot=10, alpha=None, seed=3)
    train = [row for p in files.train for row in _read(p)]
    assert len(train) == 30 and len(set(train)) == 30  # every sampled example used exactly once
    assert Counter(y for _, y in train) == {0: 10, 1: 10, 2: 10}
    assert files.counts.sum() == 30 and files.counts.shape == (4, 3)
    test = [row for p in files.test for row in _read(p)]
    assert sorted(test) == sorted((f"test {i}", i % 3) for i in range(50))  # disjoint shards, all of it
    assert files.test_size == 50


def test_dirichlet_skews_labels_and_test_limit_samples(folder: Path, tmp_path: Path) -> None:
    iid = prepare(find_sources(str(folder)), tmp_path / "iid", 5, None, None, seed=1)
    skew = prepare(find_sources(str(folder)), tmp_path / "skew", 5, None, alpha=0.1, seed=1, test_limit=20)
    assert skew.entropy < iid.entropy
    assert skew.test_size == 20 and sum(len(_read(p)) for p in skew.test) == 20


def test_missing_split_is_a_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / "only" / "train.jsonl", [("a", 0)])
    with pytest.raises(DataError, match=r"no test\.jsonl"):
        find_sources(str(tmp_path / "only"))
    with pytest.raises(DataError, match="not a folder"):
        find_sources(str(tmp_path / "nothing"))


def test_a_round_test_limit_shards_a_fixed_sample_and_keeps_the_whole_set(
    folder: Path, tmp_path: Path
) -> None:
    """The clients' shards (the per-round curve) hold a seeded sample of round_test_limit examples;
    test.jsonl keeps the whole test set, which the selected and final prompts are scored on."""
    files = prepare(find_sources(str(folder)), tmp_path / "a", 4, 10, None, seed=3, round_test_limit=12)
    shards = [row for p in files.test for row in _read(p)]
    whole = _read(files.whole_test)
    assert len(shards) == len(set(shards)) == files.round_test_size == 12
    assert set(shards) <= set(whole) and len(whole) == files.test_size == 50
    again = prepare(find_sources(str(folder)), tmp_path / "b", 4, 10, None, seed=3, round_test_limit=12)
    assert [row for p in again.test for row in _read(p)] == shards  # the same sample every time
    plain = prepare(find_sources(str(folder)), tmp_path / "c", 4, 10, None, seed=3)
    assert plain.round_test_size == 50 and sorted(_read(plain.whole_test)) == sorted(whole)
