"""Flower's configs mapped onto fedbpt's settings. No Flower import: plain mappings in, typed settings out.

**Run config** (``[tool.flwr.app.config]`` of the app's pyproject.toml, overridden with
``flwr run --run-config 'rounds=20 local-iters=8'``): every key is a ``RunConfig`` field, written
with dashes instead of underscores and dots for nesting (``projection.intrinsic-dim = 50``),
except the app's own keys in :data:`APP_KEYS`. An empty string means the field's default (TOML has
no null; the app's pyproject declares the fields whose default is null as ``""``). ``labels`` (the
one list field; Flower's config values are scalars) is a JSON list in a string:
``labels = '["terrible", "great"]'``. The result is validated by ``RunConfig`` itself (strict,
unknown keys refused), so a wrong type fails the run at once with pydantic's message naming the
key. (Flower itself refuses overrides of keys the app's pyproject does not declare.)

**Node config** (``flower-supernode --node-config 'site-name="lab-a" model-endpoint="https://..."
data="/data/train.jsonl"'``): what one site knows and nobody else does: its stable name (the key of
its seeds and its place in the contribution order, as a coordinator's enrolment name is), the model
endpoint, its data. The inference service's key is never put on the command line (``ps`` shows it):
``api-key-file`` names a file holding it, or the node's environment has ``FEDBPT_API_KEY``.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from protos import RunConfig

ConfigValue = bool | int | float | str

# Keys of the run config that are the Flower app's own, not RunConfig fields.
APP_KEYS = frozenset({"sites", "checkpoint-dir", "join-timeout", "tensorboard-dir"})
DEFAULT_JOIN_TIMEOUT_S = 600.0


class ConfigError(ValueError):
    """A run or node config fedbpt cannot use; the message says which key and how to fix it."""


@dataclass(frozen=True)
class AppSettings:
    """The ServerApp's settings: the fedbpt run, how many sites it waits for, where it keeps state."""

    run: RunConfig
    sites: int
    checkpoint_dir: Path
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S
    tensorboard_dir: Path | None = None  # each round's record as TensorBoard scalars (flower_app/tracking.py)


def app_settings(run_config: Mapping[str, ConfigValue]) -> AppSettings:
    """The ServerApp's settings from Flower's run config (module docstring)."""
    sites = run_config.get("sites", 2)
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise ConfigError(
            f"run config 'sites' must be a positive integer (the SuperNodes to wait for), got {sites!r}"
        )
    checkpoint = run_config.get("checkpoint-dir", "")
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise ConfigError(
            "run config 'checkpoint-dir' must name a folder for the strategy's state and the tuned prompt, "
            "e.g. flwr run . --run-config 'checkpoint-dir=\"/srv/fedbpt/run-1\"'"
        )
    join = run_config.get("join-timeout", DEFAULT_JOIN_TIMEOUT_S)
    if isinstance(join, bool) or not isinstance(join, int | float) or join <= 0:
        raise ConfigError(f"run config 'join-timeout' must be a positive number of seconds, got {join!r}")
    tensorboard = run_config.get("tensorboard-dir", "")
    if not isinstance(tensorboard, str):
        raise ConfigError(
            f"run config 'tensorboard-dir' must be a folder name in quotes (\"\": off), got {tensorboard!r}"
        )
    fields = {k: v for k, v in run_config.items() if k not in APP_KEYS}
    return AppSettings(
        run=run_config_from_flower(fields),
        sites=sites,
        checkpoint_dir=Path(checkpoint).expanduser(),
        join_timeout_s=float(join),
        tensorboard_dir=Path(tensorboard).expanduser() if tensorboard.strip() else None,
    )


def run_config_from_flower(values: Mapping[str, ConfigValue]) -> RunConfig:
    """``RunConfig`` from flat Flower keys (``local-iters``, ``projection.intrinsic-dim``)."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if value == "":
            continue  # the field's default
        path = [part.replace("-", "_") for part in key.split(".")]
        node = nested
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"run config key {key!r} nests under {part!r}, which is a value")
            node = child
        node[path[-1]] = _labels(value) if path == ["labels"] else value
    try:
        return RunConfig.model_validate(nested)
    except ValidationError as exc:
        raise ConfigError(
            "the Flower run config is not a valid fedbpt RunConfig (keys use dashes, e.g. local-iters; "
            f"every field and its default: docs/coordinator.md): {exc.errors(include_url=False)}"
        ) from None


def run_config_to_flower(
    config: RunConfig, *, include_defaults: bool = False
) -> dict[str, ConfigValue | None]:
    """The inverse of :func:`run_config_from_flower`: the fields that differ from the defaults
    (what to put under ``--run-config``), or every field (None: a field whose value is null)."""
    flat: dict[str, ConfigValue | None] = {}
    dumped = config.model_dump(mode="json", exclude_defaults=not include_defaults)
    for key, value in dumped.items():
        _flatten(flat, key.replace("_", "-"), value)
    return flat


def _flatten(out: dict[str, ConfigValue | None], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(out, f"{key}.{k.replace('_', '-')}", v)
    else:
        out[key] = json.dumps(value) if isinstance(value, list) else value


def _labels(value: ConfigValue) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ConfigError(
            f"run config 'labels' must be a JSON list in a string, e.g. '[\"bad\", \"great\"]'; got {value!r}"
        ) from None


@dataclass(frozen=True)
class NodeSettings:
    """One SuperNode's site: its name, the inference service it queries and its data."""

    site_name: str
    model_endpoint: str
    data: str
    test_data: str | None = None
    api_key: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    ca_file: str | None = None


NODE_KEYS = frozenset(
    {
        "site-name",
        "model-endpoint",
        "data",
        "test-data",
        "api-key-file",
        "text-column",
        "label-column",
        "ca-file",
    }
)


def node_settings(node_config: Mapping[str, ConfigValue], environ: Mapping[str, str]) -> NodeSettings:
    """The site's settings from the SuperNode's node config (module docstring). A key the node
    config lacks is read from ``environ`` as ``FEDBPT_<KEY>`` (``FEDBPT_SITE_NAME``,
    ``FEDBPT_MODEL_ENDPOINT``, ``FEDBPT_DATA``, ...: the names ``fedbpt client`` reads), for
    runtimes that start the SuperNode themselves (NVIDIA FLARE); the API key comes from
    ``api-key-file`` or ``FEDBPT_API_KEY``."""
    unknown = sorted(set(node_config) - NODE_KEYS)
    if unknown:
        raise ConfigError(f"node config has unknown key(s) {unknown}; known: {sorted(NODE_KEYS)}")

    def get(key: str) -> str:
        return _text(node_config, key) or environ.get(_env_name(key), "").strip()

    missing = [k for k in ("site-name", "model-endpoint", "data") if not get(k)]
    if missing:
        raise ConfigError(
            f"node config lacks {missing} (nor are {[_env_name(k) for k in missing]} set); start the SuperNode "
            'with e.g. --node-config \'site-name="lab-a" model-endpoint="https://model.example:8000" '
            'data="/data/train.jsonl"\''
        )
    key_file = get("api-key-file")
    if key_file:
        try:
            api_key: str | None = Path(key_file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"node config api-key-file {key_file!r} cannot be read: {exc}") from None
    else:
        api_key = environ.get("FEDBPT_API_KEY") or None
    return NodeSettings(
        site_name=get("site-name"),
        model_endpoint=get("model-endpoint"),
        data=get("data"),
        test_data=get("test-data") or None,
        api_key=api_key,
        text_column=get("text-column") or "text",
        label_column=get("label-column") or "label",
        ca_file=get("ca-file") or None,
    )


def _env_name(key: str) -> str:
    return "FEDBPT_" + key.upper().replace("-", "_")


def _text(config: Mapping[str, ConfigValue], key: str) -> str:
    value = config.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(
            f'node config {key!r} must be a string in double quotes, e.g. {key}="..."; got {value!r}'
        )
    return value.strip()


def log_to_stderr(*names: str) -> None:
    """INFO records of our loggers to stderr, which Flower forwards (``flwr log``, the SuperNode's
    output); not the root logger, which would print Flower's own records a second time."""
    for name in names:
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
