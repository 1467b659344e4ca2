"""Round records as TensorBoard event files (flower_app/tracking.py), read back with TensorBoard's
own loader (which checks each record's checksums), as TensorBoard itself reads them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flower_app.checkpoint import RoundSummary
from flower_app.tracking import TAGS, EventWriter, export, main
from protos import RoundRecord

pytest.importorskip("tensorboard", reason="the tracking extra (in .[dev])")
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto import event_pb2


def read_events(path: Path) -> list[event_pb2.Event]:
    return list(LegacyEventFileLoader(str(path)).Load())  # the events as written


def scalars_by_step(events: list[event_pb2.Event]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for e in events:
        for v in e.summary.value:
            out.setdefault(e.step, {})[v.tag] = v.simple_value
    return out


def test_without_the_extra_the_writer_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    with pytest.raises(ImportError, match=r"pip install 'fedbpt\[tracking\]'"):
        EventWriter(logdir=tmp_path)


def test_records_of_both_drivers_become_the_same_tags(tmp_path: Path) -> None:
    coordinator = [
        RoundRecord(
            round=0, state="closed", train_loss=0.7, test_accuracy=0.5, sigma_before=1.0, bytes_in=300
        ),
        RoundRecord(round=1, state="closed", train_loss=0.6, final_test_accuracy=0.75, sigma_before=0.9),
    ]
    flower = [
        RoundSummary(
            round=0, sampled=["a"], sigma_before=1.0, sigma_after=0.9, mean_norm=2.0, train_loss=0.7
        ),
        RoundSummary(
            round=1, sampled=["a"], sigma_before=0.9, sigma_after=0.8, mean_norm=2.5, bytes_out=1234
        ),
    ]
    assert export(coordinator, tmp_path / "coordinator") == 2
    assert export(flower, tmp_path / "flower") == 2
    (file,) = (tmp_path / "coordinator").iterdir()
    events = read_events(file)
    assert events[0].file_version == "brain.Event:2"
    got = scalars_by_step(events)
    assert got[0] == pytest.approx(
        {
            TAGS["train_loss"]: 0.7,
            TAGS["test_accuracy"]: 0.5,
            TAGS["sigma_before"]: 1.0,
            "bytes/in": 300.0,
            "bytes/out": 0.0,
        }
    )
    assert got[1][TAGS["final_test_accuracy"]] == pytest.approx(0.75)
    (file,) = (tmp_path / "flower").iterdir()
    got = scalars_by_step(read_events(file))
    assert got[1] == pytest.approx(
        {
            "sigma/clients": 0.9,
            "sigma/clients_next": 0.8,
            "state/mean_norm": 2.5,
            "bytes/out": 1234.0,
            "bytes/in": 0.0,
        }
    )
    # Exported again (a run that went on): one file, each round once.
    export(flower[:1], tmp_path / "flower")
    (file,) = (tmp_path / "flower").iterdir()
    assert sorted(scalars_by_step(read_events(file))) == [0]


def test_a_live_writer_appends_step_by_step(tmp_path: Path) -> None:
    writer = EventWriter(logdir=tmp_path)
    writer.add(0, {"loss/train": 0.5})
    (file,) = tmp_path.iterdir()
    assert scalars_by_step(read_events(file)) == {0: {"loss/train": 0.5}}  # flushed: readable while running
    writer.add(1, {"loss/train": 0.25})
    writer.close()
    assert scalars_by_step(read_events(file)) == {0: {"loss/train": 0.5}, 1: {"loss/train": 0.25}}


def test_the_command_exports_a_flower_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flower_app import checkpoint
    from flower_app.strategy import FedBPTStrategy
    from protos import ProjectionSpec, RunConfig

    config = RunConfig(projection=ProjectionSpec(intrinsic_dim=4), rounds=2)
    strategy = FedBPTStrategy(config=config, sites=1, checkpoint_dir=tmp_path / "run")
    summary = RoundSummary(round=0, sampled=["a"], sigma_before=1.0, sigma_after=0.9, mean_norm=1.0)
    strategy.progress.advance(strategy.progress.state, summary)
    checkpoint.save(tmp_path / "run", strategy.progress)
    assert main(["--checkpoint", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert "1 round(s)" in capsys.readouterr().out
    (file,) = (tmp_path / "tb").iterdir()
    assert scalars_by_step(read_events(file))[0]["sigma/clients_next"] == pytest.approx(0.9)
