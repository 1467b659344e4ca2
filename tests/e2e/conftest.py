"""Fixtures of the end-to-end tests: a tiny random model on disk and a small data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbpt_cli.procs import ManagedProcess, fedbpt_command


def build_random_model(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Path:
    """A tiny random ``arch`` saved with save_pretrained, built by `fedbpt make-random-model`."""
    out = tmp_path_factory.mktemp("e2e-models") / arch
    proc = ManagedProcess(
        "make-random-model", fedbpt_command("make-random-model", arch, str(out)), out.parent / "make.log"
    )
    proc.start()
    assert proc.wait(timeout=300) == 0, proc.log_tail()
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT (mlm head)."""
    return build_random_model(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random sentence-transformers model (embedding head)."""
    return build_random_model(tmp_path_factory, "st-bert")


@pytest.fixture(scope="session")
def sst2_dir(shared_data: Path) -> Path:
    """The real SST-2 folder (train.jsonl, test.jsonl), read where it lies."""
    return shared_data / "sst2"
