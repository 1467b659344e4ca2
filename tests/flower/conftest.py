"""Fixtures of the Flower driver's tests and the ones shared with other suites (a tiny random BERT,
coordinators on SQLite). Without Flower installed (the ``flower`` extra, part of ``dev``) the
folder is not collected, as tests/vllm without vLLM."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest

from tests.coordinator.conftest import coordinator_factory  # noqa: F401
from tests.e2e.conftest import tiny_bert_dir  # noqa: F401

if os.environ.get("CI") == "true" and importlib.util.find_spec("flwr") is None:
    # CI installs the dev extra, which includes Flower: a missing flwr there is a broken
    # environment, not a reason to skip the folder.
    raise RuntimeError("tests/flower: flwr is not installed; CI needs `pip install -e '.[dev]'`")
collect_ignore_glob = [] if importlib.util.find_spec("flwr") else ["test_*.py"]


@pytest.fixture
def flower_identity() -> Iterator[None]:
    """Flower stamps every message with the identity of the task that creates it; a ServerApp
    process has one, this test process has to be given one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
