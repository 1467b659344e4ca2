"""The data of a simulated federation: one dataset split into client training files and test shards.

``fedbpt simulate --data DIR`` takes a folder with ``train.*`` and ``test.*`` (.jsonl/.csv/.tsv), or
``hf:NAME[/CONFIG]`` for a Hugging Face dataset. The training pool is first cut to ``k_shot``
examples per class (whole federation, seeded), then split IID or with Dirichlet label skew. The test
set (or a fixed sample of it, ``round_test_limit``) is dealt round-robin into one shard per client:
each client scores the global prompt on its own shard, and the coordinator's accuracy (weighted by
shard size) is the accuracy on the shards together; the whole set is also written as ``test.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fed_clients.data import DataError, LabeledTexts, encode_labels, load_labeled_texts, write_jsonl
from fed_clients.fewshot import k_shot as sample_k_shot
from fed_clients.partition import dirichlet_partition, iid_partition, label_counts, mean_label_entropy

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")


@dataclass(frozen=True)
class Sources:
    train: str
    test: str


@dataclass(frozen=True)
class FederationFiles:
    train: list[Path]  # one per client
    test: list[Path]  # one shard per client (of the per-round test set)
    whole_test: Path  # the whole test set: the selected and final prompts are scored on it
    counts: np.ndarray  # [clients, classes] training labels per client
    classes: list[str]
    test_size: int
    entropy: float
    round_test_size: int = 0  # examples in the clients' shards (the per-round curve)


def find_sources(data: str, test_split: str = "test") -> Sources:
    """The train and test sources behind ``--data``."""
    if data.startswith("hf:"):
        name = data.split(":", 2)[1]
        return Sources(f"hf:{name}:train", f"hf:{name}:{test_split}")
    folder = Path(data)
    if not folder.is_dir():
        raise DataError(f"{data}: not a folder (give one with train.jsonl and test.jsonl, or hf:NAME)")
    found = {}
    for split in ("train", test_split):
        hits = [folder / f"{split}{s}" for s in SUFFIXES if (folder / f"{split}{s}").is_file()]
        if not hits:
            raise DataError(f"{folder}: no {split}.jsonl/.csv/.tsv")
        found[split] = str(hits[0])
    return Sources(found["train"], found[test_split])


def _class_names(raw: LabeledTexts, labels: np.ndarray) -> list[str]:
    names: dict[int, str] = {}
    for value, index in zip(raw.labels, labels.tolist(), strict=True):
        names.setdefault(int(index), str(value))
    return [names.get(c, str(c)) for c in range(int(labels.max()) + 1)]


def prepare(
    sources: Sources,
    out: Path,
    clients: int,
    k_shot: int | None,
    alpha: float | None,
    seed: int,
    test_limit: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
    round_test_limit: int | None = None,
) -> FederationFiles:
    """Write ``client_<k>.jsonl``, ``test_<k>.jsonl`` and ``test.jsonl`` under ``out``; return their
    paths. ``round_test_limit``: the clients' shards (scored during the rounds) hold a fixed seeded
    sample of that many test examples, the whole test set stays in ``test.jsonl``."""
    raw = load_labeled_texts(sources.train, text_column, label_column)
    labels = encode_labels(raw.labels)
    classes = _class_names(raw, labels)
    if k_shot is not None:
        pick = sample_k_shot(labels, k_shot, seed)
        raw, labels = raw.subset(pick.train), labels[pick.train]
    parts = (
        iid_partition(len(raw), clients, seed)
        if alpha is None
        else dirichlet_partition(labels, clients, alpha, seed)
    )
    test = load_labeled_texts(sources.test, text_column, label_column)
    if len(test) < clients:
        raise DataError(
            f"{sources.test}: {len(test)} test examples cannot give {clients} clients a shard each"
        )
    if test_limit is not None and test_limit < len(test):
        # A seeded sample, not the head: test files are often sorted by label.
        test = test.subset(np.sort(np.random.RandomState(seed).permutation(len(test))[:test_limit]))
    write_jsonl(out / "test.jsonl", test.texts, test.labels)
    per_round = test
    if round_test_limit is not None and max(round_test_limit, clients) < len(test):
        sample = np.random.RandomState(seed + 1).permutation(len(test))[: max(round_test_limit, clients)]
        per_round = test.subset(np.sort(sample))
    train_files, test_files = [], []
    for k, part in enumerate(parts):
        subset = raw.subset(part)
        train_files.append(out / f"client_{k}.jsonl")
        write_jsonl(train_files[-1], subset.texts, subset.labels)
        shard = per_round.subset(range(k, len(per_round), clients))
        test_files.append(out / f"test_{k}.jsonl")
        write_jsonl(test_files[-1], shard.texts, shard.labels)
    counts = label_counts(labels, parts, len(classes))
    return FederationFiles(
        train_files,
        test_files,
        out / "test.jsonl",
        counts,
        classes,
        len(test),
        mean_label_entropy(counts),
        len(per_round),
    )
