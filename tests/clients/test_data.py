"""Data loading (JSON Lines, CSV, TSV), label mapping, cleaning, and the errors for bad files."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fed_clients.data import DataError, clean_texts, encode_labels, load_labeled_texts
from tests.clients.conftest import write_jsonl


def test_jsonl_with_custom_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [("good film", 1), ("bad film", 0)], "sentence", "y")
    data = load_labeled_texts(path, text_column="sentence", label_column="y")
    assert data.texts == ["good film", "bad film"]
    assert data.labels == [1, 0]
    assert len(data.subset([1])) == 1 and data.subset([1]).texts == ["bad film"]


def test_csv_and_tsv(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('review,stars\n"great, really great",positive\nawful,negative\n')
    csv_data = load_labeled_texts(tmp_path / "d.csv", "review", "stars")
    assert csv_data.texts == ["great, really great", "awful"]
    assert encode_labels(csv_data.labels).tolist() == [1, 0]
    (tmp_path / "d.tsv").write_text("sentence\tlabel\nhide new secretions \t0\nlovely\t1\n")
    tsv = load_labeled_texts(tmp_path / "d.tsv", "sentence", "label")
    assert tsv.texts == ["hide new secretions ", "lovely"] and tsv.labels == [0, 1]


def test_string_labels_map_deterministically() -> None:
    assert encode_labels(["pos", "neg", "pos"]).tolist() == [1, 0, 1]  # sorted: neg, pos
    # A preset's class names keep the preset's order (sorted would put Business first).
    names = ("World", "Sports", "Business", "Sci/Tech")
    assert encode_labels(["sports", "World", "Sci/Tech", "business"], 4, names).tolist() == [1, 0, 3, 2]
    # Strings that are not all class names fall back to sorted order.
    assert encode_labels(["b", "a"], None, names).tolist() == [1, 0]
    assert encode_labels([2, 0, 1], 3).dtype == np.int64


def test_digit_strings_are_integers(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text,label\nx,1\ny,0\n")
    assert load_labeled_texts(tmp_path / "d.csv").labels == [1, 0]
    # Unicode digits are names, not integers ("²".isdigit() is True, and int("²") raises).
    (tmp_path / "u.csv").write_text("text,label\nx,²\ny,١\n", encoding="utf-8")
    assert load_labeled_texts(tmp_path / "u.csv").labels == ["²", "١"]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ('{"text": "a", "label": 0}\n{"text": "b", "label": \n', ".jsonl", r"d\.jsonl:2: not valid JSON"),
        ('["a", 0]\n', ".jsonl", "expected a JSON object"),
        ('{"text": "a", "lbl": 0}\n', ".jsonl", r"missing column\(s\) \['label'\]"),
        ('{"text": "   ", "label": 0}\n', ".jsonl", "non-empty string"),
        ('{"text": "a", "label": true}\n', ".jsonl", "boolean"),
        ('{"text": "a", "label": 1.5}\n', ".jsonl", "integer or a non-empty string"),
        ("", ".jsonl", "no examples"),
        ("", ".csv", "empty file"),
        ("text,label\na,0,extra\n", ".csv", "more fields than the header"),
        ("x", ".parquet", "unknown file type"),
    ],
)
def test_bad_files_say_what_and_where(tmp_path: Path, content: str, suffix: str, message: str) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_labeled_texts(path)


def test_missing_paths_and_label_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_labeled_texts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="folder"):
        load_labeled_texts(tmp_path)
    with pytest.raises(DataError, match="mix integers and strings"):
        encode_labels([0, "pos"])
    with pytest.raises(DataError, match=r"outside \[0, 2\)"):
        encode_labels([0, 2], 2)


def test_hugging_face_names_need_the_optional_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # `datasets` is optional; without it a dataset name gets a clear error (never a download).
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="'datasets' package"):
        load_labeled_texts("hf:glue/sst2:validation")
    with pytest.raises(DataError, match="'datasets' package"):
        load_labeled_texts("ag_news")


def test_yelp_cleaning_replaces_literal_backslash_n() -> None:
    assert clean_texts(["good.\\nGreat staff\\n"], "yelp") == ["good. Great staff "]
    assert clean_texts(["a\\nb"], None) == ["a\\nb"]
    with pytest.raises(ValueError):
        clean_texts(["x"], "unknown")


def test_the_shared_data_loads(shared_data: Path) -> None:
    data = load_labeled_texts(shared_data / "yelp_polarity" / "test.jsonl")
    assert len(data) == 20 and set(data.labels) == {0, 1}
    assert any("\\n" in t for t in data.texts)


def test_a_byte_order_mark_does_not_hide_the_first_column(tmp_path: Path) -> None:
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\nfine,1\n".encode())
    assert load_labeled_texts(tmp_path / "bom.csv").texts == ["fine"]
