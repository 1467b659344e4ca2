"""Fixtures of the end-to-end tests: a tiny random model on disk and a small data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (mlm head) saved with save_pretrained, built by `fedbpt make-random-model`."""
    out = tmp_path_factory.mktemp("e2e-models") / "bert"
    proc = ManagedProcess(
        "make-random-model", fedbpt_command("make-random-model", "bert", str(out)), out.parent / "make.log"
    )
    proc.start()
    assert proc.wait(timeout=300) == 0, proc.log_tail()
    return out


@pytest.fixture(scope="session")
def sst2_dir(shared_data: Path) -> Path:
    """The real SST-2 folder (train.jsonl, test.jsonl), read where it lies."""
    return shared_data / "sst2"
