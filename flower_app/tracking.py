"""Round records as TensorBoard scalars, from either driver (needs the ``tracking`` extra).

- fedbpt's coordinator: ``python -m flower_app.tracking --coordinator URL --run RUN_ID --tensorboard DIR``
  reads the run's ``RoundRecord``s (``GET /v1/runs/{id}/rounds``, admin token from
  ``FEDBPT_ADMIN_TOKEN``); run it again to add the rounds closed since (the export's event file is
  rewritten whole each time).
- Flower: the run config key ``tensorboard-dir`` makes the strategy write each round as it closes;
  ``python -m flower_app.tracking --checkpoint DIR --tensorboard OUT`` writes a finished (or
  running) run's records from its checkpoint.

Either way the scalars are the same tags (:data:`TAGS`: losses, accuracies, sigmas, bytes) at
step = the round, so the two drivers' runs overlay in one TensorBoard. The event files are written
by the ``tensorboard`` package's own ``EventFileWriter`` (``pip install 'fedbpt[tracking]'``): it
imports neither TensorFlow nor torch, so a strategy process stays free of model code (tensorboardX
would import torch wherever torch is installed). It is imported only when a writer is made, so a
Flower run without ``tensorboard-dir`` needs none of it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

# record field -> TensorBoard tag. test_accuracy / val_loss of round r are of state r (its start).
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/validation",
    "test_accuracy": "accuracy/test",
    "final_test_accuracy": "accuracy/final_test",
    "sigma_before": "sigma/clients",
    "sigma_after": "sigma/clients_next",
    "server_sigma": "sigma/server",
    "mean_norm": "state/mean_norm",
    "bytes_in": "bytes/in",
    "bytes_out": "bytes/out",
}


class RoundLike(Protocol):
    """What both drivers' round records have: ``RoundRecord`` (coordinator), ``RoundSummary`` (Flower)."""

    round: int


def scalars(record: RoundLike) -> dict[str, float]:
    """The record's values under :data:`TAGS` (absent or None values left out)."""
    out: dict[str, float] = {}
    for field, tag in TAGS.items():
        value = getattr(record, field, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class EventWriter:
    """One TensorBoard event file in ``logdir`` (created), scalars appended and flushed per step, so
    TensorBoard (or a reader) sees each round as soon as it closes."""

    def __init__(self, *, logdir: Path, suffix: str = "fedbpt") -> None:
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:  # the extra is optional: say how to get it
            raise ImportError(
                "TensorBoard export needs the tensorboard package: pip install 'fedbpt[tracking]'"
            ) from exc
        logdir.mkdir(parents=True, exist_ok=True)
        self._writer = EventFileWriter(str(logdir), filename_suffix=f".{suffix}")

    def add(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        if not values:
            return
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()]
        )
        when = time.time() if wall_time is None else wall_time
        self._writer.add_event(event_pb2.Event(wall_time=when, step=step, summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


EXPORT_SUFFIX = "fedbpt-export"


def export(records: Iterable[RoundLike], logdir: Path) -> int:
    """Write ``records`` as one event file in ``logdir``, replacing the one an earlier export wrote
    there (so a repeated export shows each round once); returns how many rounds were written."""
    for old in logdir.glob(f"events.out.tfevents.*.{EXPORT_SUFFIX}"):
        old.unlink()
    writer = EventWriter(logdir=logdir, suffix=EXPORT_SUFFIX)
    count = 0
    try:
        for record in records:
            writer.add(record.round, scalars(record))
            count += 1
    finally:
        writer.close()
    return count


# ----- the command -----
def _records(args: argparse.Namespace) -> Sequence[RoundLike]:
    if args.checkpoint is not None:
        from flower_app.checkpoint import CHECKPOINT_FILE, CheckpointFile

        stored = CheckpointFile.model_validate_json((Path(args.checkpoint) / CHECKPOINT_FILE).read_bytes())
        return stored.rounds
    import httpx

    from protos import RoundRecord

    token = os.environ.get("FEDBPT_ADMIN_TOKEN")
    if not token:
        raise SystemExit("error: set FEDBPT_ADMIN_TOKEN to the coordinator's admin token")
    url = f"{args.coordinator.rstrip('/')}/v1/runs/{args.run}/rounds"
    response = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    if response.status_code != 200:
        raise SystemExit(f"error: GET {url}: HTTP {response.status_code}: {response.text[:300]}")
    return [r for r in (RoundRecord.model_validate(x) for x in response.json()) if r.state == "closed"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flower_app.tracking",
        description="Write a fedbpt run's round records (coordinator or Flower) as TensorBoard scalars.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a Flower run's checkpoint-dir")
    source.add_argument("--coordinator", help="fedbpt coordinator URL (with --run)")
    parser.add_argument("--run", help="the coordinator's run id")
    parser.add_argument("--tensorboard", required=True, type=Path, help="TensorBoard log folder to write")
    args = parser.parse_args(argv)
    if args.coordinator is not None and not args.run:
        parser.error("--coordinator needs --run RUN_ID")
    count = export(_records(args), args.tensorboard)
    sys.stdout.write(f"wrote {count} round(s) to {args.tensorboard}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
