"""Task presets and their resolution (preset name + model head + overrides)."""

from __future__ import annotations

import pytest

from fed_clients.presets import PRESETS, PresetError, resolve_config, resolve_task
from protos import RunConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("head", ["mlm", "causal", "embedding"])
def test_every_preset_resolves_for_every_head(name: str, head: str) -> None:
    task = resolve_task(name, head)
    assert task.num_classes == len(PRESETS[name].class_names)
    template = task.spec.template
    if head == "mlm":
        assert "{mask}" in template and template.startswith(". ")  # ". " follows the prompt rows
    elif head == "causal":
        assert "{mask}" not in template and template.startswith(". ")
    else:
        assert "{mask}" not in template


def test_bbt_templates_and_words() -> None:
    assert resolve_task("sst2", "mlm").spec.template == ". {input} . It was {mask} ."
    assert resolve_task("sst2", "mlm").spec.labels == ["bad", "great"]
    assert resolve_task("ag_news", "mlm").spec.template == ". {mask} News: {input}"
    assert resolve_task("ag_news", "mlm").spec.labels == ["World", "Sports", "Business", "Tech"]
    assert resolve_task("sst2", "causal").spec.template == ". {input} . The sentiment is"
    assert resolve_task("yelp_polarity", "causal").spec.template == ". {input} . It is"
    assert resolve_task("ag_news", "causal").spec.labels == ["world", "sports", "business", "tech"]
    assert resolve_task("yelp_polarity", "mlm").cleaning == "yelp"
    assert resolve_task("sst2", "embedding").spec.labels == ["It was terrible.", "It was great."]


def test_overrides_and_aliases() -> None:
    config = RunConfig(task="SST-2", template="{input} It was {mask}.", labels=["awful", "lovely"])
    task = resolve_config(config, "mlm")
    assert task.name == "sst2"
    assert task.spec.template == "{input} It was {mask}."
    assert task.spec.labels == ["awful", "lovely"]
    assert task.class_names == ("negative", "positive")
    assert resolve_config(RunConfig(), "embedding").spec == resolve_task("sst2", "embedding").spec


def test_custom_tasks_and_errors() -> None:
    custom = resolve_task("spam", "embedding", "{input}", ["ham", "spam"])
    assert custom.class_names is None and custom.num_classes == 2
    with pytest.raises(PresetError, match="unknown task preset 'spam'"):
        resolve_task("spam", "mlm")
    with pytest.raises(PresetError, match="2 classes"):
        resolve_task("sst2", "mlm", labels=["a", "b", "c"])
    with pytest.raises(PresetError, match="invalid task"):
        resolve_task("sst2", "mlm", template="no slot here")
