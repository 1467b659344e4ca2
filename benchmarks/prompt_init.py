"""Where should the prompt start? State-0 accuracy (z = 0, so the prompt is p0 alone) of candidate
``projection.init_text`` values against zero-shot, on TRAIN samples only (the test splits choose
nothing: docs/results.md, "Prompt initialisation").

    python benchmarks/prompt_init.py [--rows 1000] [--length 5] [--tasks sst2 ag_news yelp_polarity]

Prints one table per task (accuracy and mean cross-entropy of each candidate) and, last, each
candidate's worst margin over zero-shot across the tasks: the default is the candidate whose worst
margin is largest. Runs the service's own Scorer in process (the embedded MiniLM by default;
``FEDBPT_MODEL``/``FEDBPT_HEAD`` choose another model, as for ``fedbpt serve-model``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from fed_clients.data import load_labeled_texts
from fed_clients.inputs import encode_split, input_budget
from fed_clients.losses import accuracy, cross_entropy
from fed_clients.presets import find_preset, resolve_task
from fedbpt_cli.experiments.whitebox import InProcessModel, load_scorer
from protos import Array, ProjectionSpec, ScoreRequest
from protos.scoring import DEFAULT_INIT_TEXT

# BBT's placeholders (None) and task-neutral phrases; a default must suit every task preset.
CANDIDATES: list[str | None] = [
    None,
    "the",
    ".",
    ". . . . .",
    "Classify the following text.",
    "Read the text and answer.",
    "This is a text.",
    "Here is a sentence.",
    "Sentence:",
    "Text:",
    "Consider the following.",
    "In a few words:",
    "The following is written in English.",
]


def _data_dir() -> Path:
    return Path(os.environ.get("FEDBPT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def _score(scorer, spec, ids, projection: ProjectionSpec | None) -> np.ndarray:  # type: ignore[no-untyped-def]
    parts = []
    for start in range(0, len(ids), 256):
        chunk = ids[start : start + 256]
        z = (
            None
            if projection is None
            else Array.from_numpy(np.zeros((1, projection.intrinsic_dim), np.float32))
        )
        request = ScoreRequest(projection=projection, z=z, task=spec, input_ids=chunk)
        parts.append(scorer.score(request).logits.numpy())
    return np.concatenate(parts, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000, help="train rows per task (a seeded sample)")
    parser.add_argument("--length", type=int, default=5, help="prompt length L")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--tasks", nargs="+", default=["sst2", "ag_news", "yelp_polarity"])
    args = parser.parse_args()

    scorer = load_scorer()
    api = InProcessModel(scorer)
    head = scorer.info.head
    margins: dict[str | None, list[float]] = {c: [] for c in CANDIDATES}
    for name in args.tasks:
        preset = find_preset(name)
        assert preset is not None
        data = load_labeled_texts(str(_data_dir() / name / "train.jsonl"))
        rng = np.random.default_rng(0)
        data = data.subset(np.sort(rng.permutation(len(data))[: args.rows]))
        task = resolve_task(name, head)
        budget = input_budget(api, task, args.length, 64)  # type: ignore[arg-type]
        split = encode_split(api, data, task, budget)  # type: ignore[arg-type]
        zero = _score(scorer, task.spec, split.input_ids, None)
        zero_acc = float(accuracy(zero, split.labels)[0])
        print(f"\n{name} ({len(split)} train rows, {head} head, L={args.length}): zero-shot {zero_acc:.4f}")
        for text in CANDIDATES:
            spec = ProjectionSpec(
                intrinsic_dim=args.dim,
                prompt_length=args.length,
                init="placeholder" if text is None else "text",
                init_text=text or DEFAULT_INIT_TEXT,
            )
            logits = _score(scorer, task.spec, split.input_ids, spec)
            acc = float(accuracy(logits, split.labels)[0])
            loss = float(cross_entropy(logits, split.labels)[0])
            margins[text].append(acc - zero_acc)
            label = "placeholder ids (BBT)" if text is None else repr(text)
            print(f"  {label:34s} acc {acc:.4f} ({acc - zero_acc:+.4f})  CE {loss:.4f}")
    print("\nworst margin over zero-shot across tasks:")
    for text, values in sorted(margins.items(), key=lambda kv: -min(kv[1])):
        label = "placeholder ids (BBT)" if text is None else repr(text)
        print(f"  {label:34s} {min(values):+.4f}  (mean {np.mean(values):+.4f})")


if __name__ == "__main__":
    main()
