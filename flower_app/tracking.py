"""Round records as TensorBoard scalars, from either driver, with no dependency.

- fedbpt's coordinator: ``python -m flower_app.tracking --coordinator URL --run RUN_ID --tensorboard DIR``
  reads the run's ``RoundRecord``s (``GET /v1/runs/{id}/rounds``, admin token from
  ``FEDBPT_ADMIN_TOKEN``); run it again to add the rounds closed since (the export's event file is
  rewritten whole each time).
- Flower: the run config key ``tensorboard-dir`` makes the strategy write each round as it closes;
  ``python -m flower_app.tracking --checkpoint DIR --tensorboard OUT`` writes a finished (or
  running) run's records from its checkpoint.

Either way the scalars are the same tags (:data:`TAGS`: losses, accuracies, sigmas, bytes) at
step = the round, so the two drivers' runs overlay in one TensorBoard. The event file format
(TFRecord framing with masked CRC-32C around ``Event`` protocol buffers, each holding one
``Summary`` of ``simple_value``s) is written here directly: a TensorBoard writer library would pull
in TensorFlow or (tensorboardX) import torch into a process that must not hold a model.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
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
    """One TensorBoard event file in ``logdir`` (created), scalars appended and flushed per step."""

    def __init__(self, *, logdir: Path, suffix: str = "fedbpt") -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{suffix}"
        self.path = logdir / name
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._write(_event(now, 0, file_version="brain.Event:2"))

    def add(self, step: int, values: Mapping[str, float], wall_time: float | None = None) -> None:
        if values:
            self._write(_event(time.time() if wall_time is None else wall_time, step, values=values))
            self._file.flush()

    def close(self) -> None:
        self._file.close()

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)))
        self._file.write(data + struct.pack("<I", masked_crc32c(data)))


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


# ----- the wire format: protocol buffers by hand (fields of tensorflow's Event and Summary) -----
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 fields: two's complement, as protobuf encodes negatives
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(
    wall_time: float, step: int, *, file_version: str = "", values: Mapping[str, float] | None = None
) -> bytes:
    """Event{1: double wall_time, 2: int64 step, 3: string file_version, 5: Summary summary};
    Summary{1: repeated Value}; Value{1: string tag, 2: float simple_value}."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        out += _bytes_field(3, file_version.encode())
    if values:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", v)))
            for tag, v in values.items()
        )
        out += _bytes_field(5, summary)
    return out


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # CRC-32C (Castagnoli), reflected
        table.append(crc)
    return table


_TABLE = _crc_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated right by 15 bits plus a constant."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


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
