"""The Flower ClientApp: ``flower_app.client_app:app`` (run by each site's SuperNode).

- ``query``: the site's name (node config ``site-name``); the strategy keys seeds and the
  contribution order on it.
- ``train``: a fedbpt ``train`` task in, a ``ClientUpdate`` out, computed by
  ``fed_clients.client.SiteClient.train_round``: the very step a ``fedbpt client`` runs for the
  coordinator (validation of the received state, evaluation when asked, the round's perturbed copy,
  the local CMA-ES), against the remote inference service the node config names.
- ``evaluate``: the ``done`` task: the final state scored on the site's test split and validation
  split (what ``SiteClient.handle_done`` reports to the coordinator), an ``EvalReport`` out.

Imports ``fed_clients`` and ``protos`` only: no torch, no coordinator, no model. The SuperNode
starts one ClientApp process per message, so every call reads the site's data again and asks the
service again for what it caches (the inputs' handles); both are deterministic, so results do not
depend on it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fed_clients.client import SiteClient, eval_report
from fed_clients.coordinator_api import CoordinatorService
from fed_clients.data import load_labeled_texts
from fed_clients.evaluate import evaluate_prompt
from fed_clients.model_api import ModelService
from fed_clients.transport import JsonService
from flower_app.config import NodeSettings, log_to_stderr, node_settings
from flower_app.messages import eval_message, read_task, site_answer, update_message
from protos import EvalReport, Task

log = logging.getLogger("flower_app.client_app")

# A plain assignment: Flower finds the app by reading this module's syntax tree.
app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(site_answer(_node(context).site_name), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    task = read_task(msg.content)
    if task.kind != "train":
        raise ValueError(f"a train message must carry a train task, got {task.kind!r}")
    with site_client(_node(context)) as site:
        update = site.train_round(task)
    return Message(update_message(update), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    task = read_task(msg.content)
    with site_client(_node(context)) as site:
        report = final_report(site, task)
    return Message(eval_message(report), reply_to=msg)


def final_report(site: SiteClient, task: Task) -> EvalReport | None:
    """The ``done`` task's state scored on the site's test and validation splits (None: the site
    has neither), as ``SiteClient.handle_done`` reports it to a coordinator."""
    if task.state is None or task.config is None:
        raise ValueError("a done task without state or config cannot be evaluated")
    prepared = site.prepare(task.config)
    z = task.state.mean.numpy()
    projection = task.config.projection
    spec = prepared.task.spec
    test = (
        evaluate_prompt(site.model, spec, prepared.test, z=z, projection=projection)
        if prepared.test
        else None
    )
    val = (
        evaluate_prompt(site.model, spec, prepared.val, z=z, projection=projection) if prepared.val else None
    )
    return eval_report(test, val)


class _NoCoordinator:
    """Stands in for the coordinator a ``SiteClient`` normally talks to: under Flower the tasks come
    in messages and the results go back in replies, so any call to it is a bug."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"the Flower ClientApp has no coordinator (SiteClient tried coordinator.{name})")


@contextmanager
def site_client(node: NodeSettings) -> Iterator[SiteClient]:
    """A ``SiteClient`` for this node's data and model endpoint, keyed on its site name."""
    train = load_labeled_texts(node.data, node.text_column, node.label_column)
    test = load_labeled_texts(node.test_data, node.text_column, node.label_column) if node.test_data else None
    http = JsonService(
        name="model service", base_url=node.model_endpoint, token=node.api_key, verify=node.ca_file or True
    )
    try:
        site = SiteClient(cast(CoordinatorService, _NoCoordinator()), ModelService(http), train, test)
        # What SiteClient.identify sets from the coordinator's enrolment: the name seeds the
        # site's validation hold-out and its perturbation.
        site.client_key = node.site_name
        yield site
    finally:
        http.close()


def _node(context: Context) -> NodeSettings:
    log_to_stderr("flower_app", "fed_clients")
    return node_settings(context.node_config, os.environ)
