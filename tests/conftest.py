"""Fixtures every test area shares. Area-specific fixtures live in tests/<area>/conftest.py."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# The vLLM suite needs vLLM's own environment (.venv-vllm, make test-vllm); elsewhere it is not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

REPO = Path(__file__).resolve().parent.parent
# The real data sits beside the repository (../shared/data); it is read there, never copied.
SHARED_DATA = Path(os.environ.get("FEDBPT_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST_OUTPUT = REPO / "test-output"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "test.jsonl").exists():
        pytest.fail(f"the shared data is missing at {SHARED_DATA} (set FEDBPT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def test_output() -> Path:
    """A folder kept after the run (screenshots, logs): CI artifacts live here."""
    TEST_OUTPUT.mkdir(exist_ok=True)
    return TEST_OUTPUT
