"""Few-shot sampling and partitioning: counts, coverage, balance, Dirichlet skew."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fed_clients.fewshot import k_shot
from fed_clients.partition import dirichlet_partition, iid_partition, label_counts, mean_label_entropy
from fedbpt_cli.main import app
from tests.clients.conftest import write_jsonl


def _labels(n: int, classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=n)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert allidx.size == n
    assert np.array_equal(np.sort(allidx), np.arange(n))  # every example exactly once


def test_iid_sizes_cover_and_balance() -> None:
    labels = _labels(10_007, 4)
    parts = iid_partition(len(labels), 10, seed=1)
    _assert_exact_cover(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    share = label_counts(labels, parts, 4) / np.array(sizes)[:, None]
    overall = np.bincount(labels, minlength=4) / len(labels)
    assert np.abs(share - overall).max() < 0.05  # each client near the global label mix
    assert all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(len(labels), 10, seed=1), strict=True)
    )
    assert not all(
        np.array_equal(a, b) for a, b in zip(parts, iid_partition(len(labels), 10, seed=2), strict=True)
    )


@pytest.mark.parametrize("alpha", [0.05, 0.5, 5.0])
def test_dirichlet_covers_everything_and_feeds_every_client(alpha: float) -> None:
    labels = _labels(400, 2)
    parts = dirichlet_partition(labels, 10, alpha, seed=3)
    _assert_exact_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_every_client_gets_one_even_when_draws_keep_failing() -> None:
    # 12 examples, 10 clients, tiny alpha: almost every draw leaves clients empty; the repair
    # must still give each at least one.
    labels = np.array([0] * 6 + [1] * 6)
    parts = dirichlet_partition(labels, 10, 0.01, seed=0, max_attempts=1)
    _assert_exact_cover(parts, 12)
    assert min(len(p) for p in parts) >= 1


def test_smaller_alpha_means_more_label_skew() -> None:
    labels = _labels(4000, 4)

    def entropy(alpha: float) -> float:
        return float(
            np.mean(
                [
                    mean_label_entropy(label_counts(labels, dirichlet_partition(labels, 10, alpha, s), 4))
                    for s in range(5)
                ]
            )
        )

    h = [entropy(a) for a in (0.1, 1.0, 100.0)]
    assert h[0] < h[1] < h[2], h
    assert h[2] > 0.95 * np.log(4)  # large alpha: close to IID
    assert h[0] < 0.6 * np.log(4)


def test_partition_refuses_impossible_requests() -> None:
    with pytest.raises(ValueError, match="at least one"):
        iid_partition(3, 5, 0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.zeros(10, dtype=int), 2, 0.0, 0)


def test_k_shot_takes_k_per_class_seeded() -> None:
    labels = _labels(1000, 3)
    pick = k_shot(labels, 16, seed=42, dev_k=8)
    counts = np.bincount(labels[pick.train], minlength=3)
    assert counts.tolist() == [16, 16, 16]
    assert np.bincount(labels[pick.dev], minlength=3).tolist() == [8, 8, 8]
    assert not set(pick.train.tolist()) & set(pick.dev.tolist())
    assert np.array_equal(pick.train, k_shot(labels, 16, seed=42).train)
    assert not np.array_equal(pick.train, k_shot(labels, 16, seed=43).train)
    assert pick.short_classes == {}


def test_k_shot_short_class_gives_what_it_has() -> None:
    labels = np.array([0] * 50 + [1] * 3)
    pick = k_shot(labels, 10, seed=0)
    assert np.bincount(labels[pick.train]).tolist() == [10, 3]
    assert pick.short_classes == {1: 3}


def test_partition_command_writes_client_files_and_a_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [(f"text {i}", ["World", "Sports", "Business"][int(rng.integers(3))]) for i in range(300)]
    src = write_jsonl(tmp_path / "all.jsonl", rows)
    out = tmp_path / "parts"
    result = CliRunner().invoke(
        app,
        [
            "partition",
            "--data",
            str(src),
            "--clients",
            "4",
            "--out",
            str(out),
            "--alpha",
            "0.5",
            "--k-shot",
            "20",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "client_3.jsonl" in result.output and "Business" in result.output
    manifest = json.loads((out / "partition.json").read_text())
    assert manifest["scheme"] == "dirichlet-per-class"
    seen = []
    for k in range(4):
        lines = (out / f"client_{k}.jsonl").read_text().splitlines()
        assert lines, f"client {k} got nothing"
        seen += [json.loads(x)["text"] for x in lines]
    assert len(seen) == len(set(seen)) == 60  # 20 per class, each used once
    assert np.array(manifest["label_counts"]).sum() == 60


def test_partition_command_needs_one_scheme(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "a.jsonl", [("x", 0), ("y", 1)])
    result = CliRunner().invoke(
        app, ["partition", "--data", str(src), "--clients", "2", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "--iid or --alpha" in result.output
    ok = CliRunner().invoke(
        app, ["partition", "--data", str(src), "--clients", "2", "--out", str(tmp_path / "o"), "--iid"]
    )
    assert ok.exit_code == 0, ok.output
