"""Flower's configs onto fedbpt's settings, the generated app pyproject, and the message codec."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.config import flatten_dict

from coordinator.aggregators import make_aggregator
from flower_app.config import (
    ConfigError,
    app_settings,
    node_settings,
    run_config_from_flower,
    run_config_to_flower,
)
from flower_app.messages import (
    MessageError,
    eval_message,
    read_eval,
    read_site,
    read_task,
    read_update,
    site_answer,
    task_message,
    update_message,
)
from flower_app.template import TEMPLATE, render
from protos import ClientMetrics, EvalReport, ProjectionSpec, RunConfig, Task
from tests.coordinator.conftest import synthetic_update


def template_config() -> dict[str, object]:
    """The app's run config as Flower reads it from the pyproject (flattened with dots)."""
    project = tomllib.loads(TEMPLATE.read_text())
    return flatten_dict(project["tool"]["flwr"]["app"]["config"])


def test_the_app_pyproject_is_generated_from_run_config() -> None:
    assert TEMPLATE.read_text() == render(), (
        "stale: run `python -m flower_app.template` and commit the result"
    )


def test_the_app_pyproject_declares_every_field_with_fedbpts_defaults() -> None:
    settings = app_settings(template_config())  # type: ignore[arg-type]
    assert settings.run == RunConfig()
    assert settings.sites == 2
    declared = set(template_config())
    assert set(run_config_to_flower(RunConfig(), include_defaults=True)) <= declared


def test_a_run_config_maps_both_ways() -> None:
    config = RunConfig(
        rounds=7,
        labels=["terrible", "great"],
        projection=ProjectionSpec(intrinsic_dim=40, sigma0=0.5),
        client_seeds="per_client",
        sigma_floor=0.05,
        frac=1,
    )
    flat = run_config_to_flower(config)
    assert flat["projection.intrinsic-dim"] == 40 and flat["labels"] == '["terrible", "great"]'
    assert run_config_from_flower({k: v for k, v in flat.items() if v is not None}) == config
    # An override on top of the template's defaults, as `flwr run --run-config` produces it.
    merged = {**template_config(), **flat, "checkpoint-dir": "/tmp/x"}
    assert app_settings(merged).run == config  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"local-iter": 3}, "local_iter"),
        ({"rounds": "many"}, "rounds"),
        ({"labels": "bad, great"}, "JSON list"),
        ({"projection": 3, "projection.seed": 1}, "nests under"),
    ],
)
def test_a_wrong_run_config_says_which_key(values: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_config_from_flower(values)  # type: ignore[arg-type]


def test_the_app_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="checkpoint-dir"):
        app_settings({"sites": 2})
    with pytest.raises(ConfigError, match="'sites'"):
        app_settings({"sites": 0, "checkpoint-dir": "x"})


def test_node_settings_from_node_config_then_environment(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    node = node_settings(
        {
            "site-name": "lab-a",
            "model-endpoint": "http://m:8000",
            "data": "/d/train.jsonl",
            "api-key-file": str(key),
        },
        {"FEDBPT_API_KEY": "ignored", "FEDBPT_TEST_DATA": "/d/test.jsonl"},
    )
    assert (node.site_name, node.model_endpoint, node.data) == ("lab-a", "http://m:8000", "/d/train.jsonl")
    assert (node.api_key, node.test_data) == ("s3cret", "/d/test.jsonl")
    # A runtime that starts the SuperNode itself (NVIDIA FLARE): everything from the environment.
    env = {"FEDBPT_SITE_NAME": "lab-b", "FEDBPT_MODEL_ENDPOINT": "http://m", "FEDBPT_DATA": "x.jsonl"}
    assert node_settings({}, {**env, "FEDBPT_API_KEY": "k"}).api_key == "k"
    with pytest.raises(ConfigError, match="site-name"):
        node_settings({"model-endpoint": "http://m", "data": "x"}, {})
    with pytest.raises(ConfigError, match="unknown key"):
        node_settings({"site_name": "x"}, env)


def test_messages_carry_fedbpts_schemas_unchanged() -> None:
    config = RunConfig(projection=ProjectionSpec(intrinsic_dim=8), local_iters=2)
    aggregator = make_aggregator(config)
    task = Task(
        kind="train",
        round=3,
        state=aggregator.payload(aggregator.initial_state()),
        config=config,
        client_seed=9,
    )
    assert read_task(task_message(task)).model_dump_json() == task.model_dump_json()
    update = synthetic_update(task, 1, metrics=ClientMetrics(train_loss=0.5, val_loss=0.7, n_val=2))
    back, size = read_update(update_message(update))
    assert back.model_dump_json() == update.model_dump_json() and size == len(update.model_dump_json())
    report = EvalReport(test_accuracy=0.75, n_test=4)
    assert read_eval(eval_message(report)) == report
    assert read_eval(eval_message(None)) is None
    assert read_site(site_answer("lab-a")) == "lab-a"
    with pytest.raises(MessageError, match="not a valid ClientUpdate"):
        read_update(RecordDict({"fedbpt": ConfigRecord({"update": "{}"})}))
    with pytest.raises(MessageError, match="not sent by fedbpt"):
        read_task(RecordDict({"other": ConfigRecord({"task": "{}"})}))


def test_each_app_imports_only_its_role() -> None:
    """The ClientApp is a site (no coordinator, no torch), the ServerApp the federation (no torch)."""
    probe = (
        "import importlib, sys; importlib.import_module(sys.argv[1]); "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', "
        "'coordinator', 'inference_service', 'fed_clients', 'fastapi'})))"
    )
    found = {}
    for module in ("flower_app.client_app", "flower_app.server_app"):
        out = subprocess.run(
            [sys.executable, "-c", probe, module], capture_output=True, text=True, check=True
        )
        found[module] = out.stdout.split()
    assert found["flower_app.client_app"] == ["fed_clients"]
    assert (
        "torch" not in found["flower_app.server_app"] and "transformers" not in found["flower_app.server_app"]
    )
    assert "coordinator" in found["flower_app.server_app"]
