"""Local data: JSON Lines, CSV or TSV files (or a Hugging Face dataset), labels as indices.

Files have one example per line/row with a text column and a label column (names configurable).
CSV and TSV need a header row. Labels are integers, or strings mapped to indices (see
:func:`encode_labels`). Nothing here talks to a service: labels never leave the client.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
TSV_SUFFIXES = (".tsv", ".tab")
HF_PREFIX = "hf:"

Label = int | str


class DataError(ValueError):
    """A data file or dataset that cannot be read as labelled texts; says where and why."""


@dataclass(frozen=True)
class LabeledTexts:
    """Texts and their labels as read (integers or strings), in file order."""

    texts: list[str]
    labels: list[Label]
    source: str

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabeledTexts:
        idx = [int(i) for i in indices]
        return LabeledTexts([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.source)


def load_labeled_texts(
    source: str | Path, text_column: str = "text", label_column: str = "label"
) -> LabeledTexts:
    """Read ``source``: a .jsonl/.csv/.tsv file, or ``hf:NAME[/CONFIG][:SPLIT]`` (or a bare
    dataset name that is not an existing path) through the optional ``datasets`` package."""
    text = str(source)
    path = Path(text)
    if text.startswith(HF_PREFIX):
        return _load_hf(text[len(HF_PREFIX) :], text_column, label_column)
    if path.exists():
        if path.is_dir():
            raise DataError(f"{path} is a folder; give a .jsonl, .csv or .tsv file")
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            rows = _read_jsonl(path)
        elif suffix in CSV_SUFFIXES:
            rows = _read_delimited(path, ",")
        elif suffix in TSV_SUFFIXES:
            rows = _read_delimited(path, "\t")
        else:
            raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .csv or .tsv")
        return _columns(rows, str(path), text_column, label_column)
    if not _looks_like_hf_name(text):
        raise DataError(f"{path}: no such file")
    return _load_hf(text, text_column, label_column)


def _looks_like_hf_name(text: str) -> bool:
    # "glue/sst2", "ag_news", "glue/sst2:validation": at most one slash, no file suffix.
    name = text.split(":", 1)[0]
    return name.count("/") <= 1 and not Path(name).suffix and not name.startswith((".", "/", "~"))


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            rows.append((lineno, record))
    return rows


def _read_delimited(path: Path, delimiter: str) -> list[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise DataError(f"{path}: empty file (a header row with the column names is needed)")
        rows: list[tuple[int, dict[str, Any]]] = []
        try:
            for record in reader:
                if None in record:
                    raise DataError(f"{path}:{reader.line_num}: more fields than the header has columns")
                rows.append((reader.line_num, dict(record)))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: {exc}") from None
    return rows


def _columns(
    rows: list[tuple[int, dict[str, Any]]], source: str, text_column: str, label_column: str
) -> LabeledTexts:
    if not rows:
        raise DataError(f"{source}: no examples")
    texts: list[str] = []
    labels: list[Label] = []
    for lineno, record in rows:
        where = f"{source}:{lineno}"
        if text_column not in record or label_column not in record:
            missing = [c for c in (text_column, label_column) if c not in record]
            raise DataError(f"{where}: missing column(s) {missing}; the record has {sorted(record)}")
        text = record[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: {text_column!r} must be a non-empty string, got {text!r:.80}")
        texts.append(text)
        labels.append(_label(record[label_column], where, label_column))
    return LabeledTexts(texts, labels, source)


def _label(value: Any, where: str, column: str) -> Label:
    if isinstance(value, bool):
        raise DataError(f"{where}: {column!r} is a boolean; use integers or strings")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        stripped = value.strip()
        if stripped.lstrip("-").isascii() and stripped.lstrip("-").isdigit():  # not "²"
            return int(stripped)
        return stripped
    raise DataError(f"{where}: {column!r} must be an integer or a non-empty string, got {value!r:.80}")


def encode_labels(
    labels: Sequence[Label], num_classes: int | None = None, class_names: Sequence[str] | None = None
) -> np.ndarray:
    """Label indices (int64) of ``labels``.

    - Integers (and strings of digits) are indices as they are.
    - Strings: when every one names a class of ``class_names`` (case-insensitive), its position
      there; otherwise the distinct strings sorted by Unicode code point take 0, 1, 2, ... So
      "negative"/"positive" -> 0/1 either way, and a preset's names (e.g. AG News' World, Sports,
      Business, Sci/Tech) keep the preset's order.
    - A mix of integers and strings is an error; so is an index outside [0, num_classes).
    """
    if not labels:
        return np.zeros(0, dtype=np.int64)
    strings = [x for x in labels if isinstance(x, str)]
    if strings and len(strings) != len(labels):
        raise DataError("labels mix integers and strings; use one kind")
    if strings:
        names = [x.lower() for x in strings]
        if class_names is not None and set(names) <= {c.lower() for c in class_names}:
            order = {c.lower(): i for i, c in enumerate(class_names)}
        else:
            order = {name: i for i, name in enumerate(sorted(set(names)))}
        out = np.array([order[name] for name in names], dtype=np.int64)
    else:
        out = np.array(labels, dtype=np.int64)
    if num_classes is not None:
        bad = out[(out < 0) | (out >= num_classes)]
        if bad.size:
            raise DataError(
                f"label index {int(bad[0])} is outside [0, {num_classes}) for a task with {num_classes} labels"
            )
    return out


def clean_texts(texts: Sequence[str], cleaning: str | None) -> list[str]:
    """Dataset-specific cleaning the reference applies before tokenising.

    ``yelp``: Yelp Polarity keeps newlines as the two characters backslash-n; BBT and FedBPT
    replace them by a space. Other datasets are used as they are.
    """
    if cleaning is None:
        return list(texts)
    if cleaning == "yelp":
        return [t.replace("\\n", " ") for t in texts]
    raise ValueError(f"unknown cleaning {cleaning!r}")


def _load_hf(spec: str, text_column: str, label_column: str) -> LabeledTexts:
    """``NAME[/CONFIG][:SPLIT]`` through ``datasets`` (optional; default split ``train``)."""
    try:
        import datasets  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        raise DataError(
            f"{spec!r} is not a file, and reading Hugging Face datasets by name needs the optional "
            "'datasets' package (pip install 'fedbpt[datasets]'); or give a .jsonl/.csv/.tsv file"
        ) from None
    name, _, split = spec.partition(":")
    path, _, config = name.partition("/")
    try:
        ds = datasets.load_dataset(path, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many types; all mean "cannot load this"
        raise DataError(f"cannot load Hugging Face dataset {spec!r}: {exc}") from None
    columns = list(ds.column_names)
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise DataError(f"dataset {spec!r} has no column(s) {missing}; its columns are {columns}")
    rows = [
        (i + 1, {text_column: t, label_column: y})
        for i, (t, y) in enumerate(zip(ds[text_column], ds[label_column], strict=True))
    ]
    return _columns(rows, f"hf:{spec}", text_column, label_column)


def write_jsonl(path: Path, texts: Sequence[str], labels: Sequence[Label]) -> None:
    """One ``{"text", "label"}`` object per line, labels as read (integers or strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text, label in zip(texts, labels, strict=True):
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
