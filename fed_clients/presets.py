"""Task presets: per dataset and model head, the template and the label words (or anchor sentences).

Resolution: ``RunConfig.task`` names the preset, the head comes from the inference service's
``/v1/model``, and ``RunConfig.template`` / ``RunConfig.labels`` override the preset's. A task name
that is no preset needs both overrides (a custom task).

- ``mlm``: BBT's RoBERTa templates and label words. BBT writes ``<P> . <text> . It was <mask> .``;
  the soft prompt rows sit right after the first special token, so the template begins with the
  ". " that follows the prompt.
- ``causal``: BBT's GPT-2 recipe: the template ends right before the label word.
- ``embedding``: the input alone, and one anchor sentence per label; the anchors were chosen by
  zero-shot accuracy of all-MiniLM-L6-v2 on samples of the TRAIN splits (docs/clients.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protos import Head, RunConfig, TaskSpec


@dataclass(frozen=True)
class HeadTask:
    template: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Preset:
    name: str
    # Class names in label-index order: used to map string labels in data files to indices.
    class_names: tuple[str, ...]
    heads: dict[str, HeadTask]
    # Dataset-specific text cleaning the reference applies (see data.clean_texts).
    cleaning: str | None = None
    hf_dataset: str = ""
    aliases: tuple[str, ...] = field(default=())


PRESETS: dict[str, Preset] = {
    "sst2": Preset(
        name="sst2",
        class_names=("negative", "positive"),
        heads={
            "mlm": HeadTask(". {input} . It was {mask} .", ("bad", "great")),
            "causal": HeadTask(". {input} . The sentiment is", ("negative", "positive")),
            "embedding": HeadTask("{input}", ("It was terrible.", "It was great.")),
        },
        hf_dataset="glue/sst2 (text column: sentence; test = validation)",
        aliases=("sst-2", "glue/sst2"),
    ),
    "yelp_polarity": Preset(
        name="yelp_polarity",
        class_names=("negative", "positive"),
        heads={
            "mlm": HeadTask(". {input} . It was {mask} .", ("bad", "great")),
            "causal": HeadTask(". {input} . It is", ("negative", "positive")),
            "embedding": HeadTask("{input}", ("A terrible experience.", "A great experience.")),
        },
        cleaning="yelp",
        hf_dataset="yelp_polarity",
        aliases=("yelp", "yelpp"),
    ),
    "ag_news": Preset(
        name="ag_news",
        class_names=("World", "Sports", "Business", "Sci/Tech"),
        heads={
            "mlm": HeadTask(". {mask} News: {input}", ("World", "Sports", "Business", "Tech")),
            "causal": HeadTask(". {input} The news above is about", ("world", "sports", "business", "tech")),
            "embedding": HeadTask(
                "{input}",
                (
                    "International news about politics and conflicts.",
                    "Sports news about games and athletes.",
                    "Business news about companies and markets.",
                    "Science and technology news about computers and the internet.",
                ),
            ),
        },
        hf_dataset="ag_news",
        aliases=("agnews", "ag-news"),
    ),
}


class PresetError(ValueError):
    """A task that cannot be resolved (unknown preset without overrides, wrong label count)."""


@dataclass(frozen=True)
class ResolvedTask:
    """What the client needs to score: the wire task, how to read labels, how to clean texts."""

    name: str
    spec: TaskSpec
    class_names: tuple[str, ...] | None
    cleaning: str | None

    @property
    def num_classes(self) -> int:
        return len(self.spec.labels)


def find_preset(name: str) -> Preset | None:
    key = name.strip().lower()
    for preset in PRESETS.values():
        if key == preset.name or key in preset.aliases:
            return preset
    return None


def resolve_task(
    task: str, head: Head | str, template: str | None = None, labels: list[str] | None = None
) -> ResolvedTask:
    """The preset ``task`` for ``head``, with ``template``/``labels`` overriding it."""
    preset = find_preset(task)
    if preset is None:
        if template is None or labels is None:
            known = ", ".join(sorted(PRESETS))
            raise PresetError(
                f"unknown task preset {task!r} (known: {known}); a custom task needs both a template and labels"
            )
        return ResolvedTask(task, _spec(template, labels), None, None)
    if head not in preset.heads:
        raise PresetError(f"preset {preset.name!r} has no entry for the {head!r} head")
    default = preset.heads[head]
    chosen_labels = list(labels) if labels is not None else list(default.labels)
    if len(chosen_labels) != len(preset.class_names):
        raise PresetError(
            f"preset {preset.name!r} has {len(preset.class_names)} classes {list(preset.class_names)}, "
            f"but {len(chosen_labels)} labels were given: {chosen_labels}"
        )
    return ResolvedTask(
        preset.name, _spec(template or default.template, chosen_labels), preset.class_names, preset.cleaning
    )


def resolve_config(config: RunConfig, head: Head | str) -> ResolvedTask:
    return resolve_task(config.task, head, config.template, config.labels)


def _spec(template: str, labels: list[str]) -> TaskSpec:
    try:
        return TaskSpec(template=template, labels=list(labels))
    except ValueError as exc:
        raise PresetError(f"invalid task: {exc}") from None
