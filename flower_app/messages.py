"""What the ServerApp and the ClientApps say to each other, in Flower ``RecordDict``s.

Each message carries one fedbpt wire object as JSON in a ``ConfigRecord`` named ``fedbpt``: the
same pydantic schema the coordinator's HTTP API carries (strict types, unknown fields refused,
finite floats, arrays as base64 of little-endian bytes with dtype and shape; ``protos``), so both
drivers hand the client step and the server step identical, validated objects, and nothing is
pickled. A second codec (Flower's ``ArrayRecord``) would be one more way to get dtypes wrong.
Replies also carry a ``MetricRecord`` named ``metrics`` with the site's numeric metrics, which
Flower logs and aggregates as it does any app's.

| message type | server -> site (``fedbpt``) | site -> server |
|---|---|---|
| ``query`` | ``{"ask": "site-name"}`` | ``{"site-name": NAME}`` |
| ``train`` | ``{"task": Task}`` (kind ``train``) | ``{"update": ClientUpdate}`` + ``metrics`` |
| ``evaluate`` | ``{"task": Task}`` (kind ``done``: the final state) | ``{"eval": EvalReport}`` (absent: nothing to evaluate on) |
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ConfigRecord, MetricRecord, MetricRecordValues, RecordDict
from pydantic import BaseModel, ValidationError

from protos import ClientMetrics, ClientUpdate, EvalReport, Task

RECORD = "fedbpt"
METRICS = "metrics"
M = TypeVar("M", bound=BaseModel)


class MessageError(ValueError):
    """A message without the fedbpt record it should carry, or with one that does not validate."""


def site_query() -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({"ask": "site-name"})})


def site_answer(name: str) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({"site-name": name})})


def read_site(content: RecordDict) -> str:
    name = _field(content, "site-name")
    if not name.strip():
        raise MessageError("a SuperNode answered with an empty site name; set site-name in its --node-config")
    return name


def task_message(task: Task) -> RecordDict:
    return RecordDict({RECORD: ConfigRecord({"task": task.model_dump_json()})})


def read_task(content: RecordDict) -> Task:
    return _model(content, "task", Task)


def update_message(update: ClientUpdate) -> RecordDict:
    return RecordDict(
        {
            RECORD: ConfigRecord({"update": update.model_dump_json()}),
            METRICS: MetricRecord(metric_values(update.metrics, n_samples=update.n_samples)),
        }
    )


def read_update(content: RecordDict) -> tuple[ClientUpdate, int]:
    """The update and the size of its JSON in bytes (what the site sent, for the round's record)."""
    raw = _field(content, "update")
    return _validate(ClientUpdate, raw, "update"), len(raw.encode())


def eval_message(report: EvalReport | None) -> RecordDict:
    if report is None:
        return RecordDict({RECORD: ConfigRecord({})})
    metrics: dict[str, MetricRecordValues] = {
        k.replace("_", "-"): v for k, v in report.model_dump().items() if v is not None
    }
    return RecordDict(
        {RECORD: ConfigRecord({"eval": report.model_dump_json()}), METRICS: MetricRecord(metrics)}
    )


def read_eval(content: RecordDict) -> EvalReport | None:
    record = _record(content)
    if "eval" not in record:
        return None
    return _model(content, "eval", EvalReport)


def metric_values(metrics: ClientMetrics, *, n_samples: int) -> dict[str, MetricRecordValues]:
    """The numeric metrics (None left out), with Flower's conventional ``num-examples``."""
    values: dict[str, MetricRecordValues] = {"num-examples": n_samples}
    for key, value in metrics.model_dump().items():
        if value is not None:
            values[key.replace("_", "-")] = value
    return values


def _record(content: RecordDict) -> ConfigRecord:
    if RECORD not in content.config_records:
        raise MessageError(
            f"the message has no {RECORD!r} record: it was not sent by fedbpt's Flower app "
            "(are the ServerApp and the ClientApp the same version?)"
        )
    return content.config_records[RECORD]


def _field(content: RecordDict, key: str) -> str:
    value = _record(content).get(key)
    if not isinstance(value, str):
        raise MessageError(f"the {RECORD!r} record has no string {key!r}")
    return value


def _model(content: RecordDict, key: str, model: type[M]) -> M:
    return _validate(model, _field(content, key), key)


def _validate(model: type[M], raw: str, key: str) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise MessageError(
            f"the {key!r} is not a valid {model.__name__}: {exc.errors(include_url=False)}"
        ) from None
