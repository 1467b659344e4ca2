"""``fedbpt simulate``: a whole federation on this machine, every role a real process on 127.0.0.1.

1. Split the data into one training file and one test shard per client (``federation_data``).
2. Start the inference service and the coordinator; score the zero-shot baseline.
3. Create the run over REST, enrol the clients, start one ``fedbpt client`` process each, start it.
4. Follow the rounds with a progress display; write ``report.json``, ``curves.png``, ``prompt.json``.

Settings: ``RunConfig`` defaults < ``--preset`` < ``--config FILE`` < flags. Ctrl-C stops every child.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from fedbpt_cli.plans import PLANS


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _flags_to_run(**flags: Any) -> dict[str, Any]:
    """The ``RunConfig`` fields set on the command line (None: not given)."""
    projection = {k: flags.pop(k) for k in ("intrinsic_dim", "prompt_length") if flags.get(k) is not None}
    for k in ("intrinsic_dim", "prompt_length"):
        flags.pop(k, None)
    run = {k: v for k, v in flags.items() if v is not None}
    if projection:
        run["projection"] = projection
    return run


def simulate(
    clients: int | None = typer.Option(None, min=1, help="number of sites (default: the preset's, else 10)"),
    rounds: int | None = typer.Option(None, min=1, help="federated rounds"),
    data: str = typer.Option(..., help="folder with train.jsonl and test.jsonl (or .csv/.tsv), or hf:NAME"),
    out: Path = typer.Option(..., help="report folder (report.json, curves.png, prompt.json, logs/)"),
    non_iid: float | None = typer.Option(None, help="Dirichlet label skew alpha (default: IID)"),
    preset: str | None = typer.Option(None, help=f"starting settings: {' | '.join(PLANS)}"),
    config: Path | None = typer.Option(None, help="a RunConfig JSON file to start from"),
    k_shot: int | None = typer.Option(None, min=1, help="training examples per class, whole federation"),
    test_limit: int | None = typer.Option(None, min=1, help="score the prompt on this many test examples"),
    task: str | None = typer.Option(None, help="task preset: sst2 | yelp_polarity | ag_news"),
    model: str | None = typer.Option(None, help="model id or path for the service (default: MiniLM)"),
    head: str | None = typer.Option(None, help="mlm | causal | embedding (default: inferred)"),
    local_popsize: int | None = typer.Option(None, help="CMA-ES candidates per local generation"),
    local_iters: int | None = typer.Option(None, help="local generations per round"),
    intrinsic_dim: int | None = typer.Option(None, help="d, the dimension of z"),
    prompt_length: int | None = typer.Option(None, help="L, soft prompt tokens"),
    perturb: bool | None = typer.Option(None, "--perturb/--no-perturb", help="input perturbation"),
    perturb_rate: float | None = typer.Option(None, help="share of input tokens replaced"),
    aggregator: str | None = typer.Option(
        None, help="cmaes (FedBPT) | fedavg | shared_es (one server ES; --rounds counts generations)"
    ),
    eval_every: int | None = typer.Option(None, help="evaluate the global prompt every N rounds"),
    max_input_tokens: int | None = typer.Option(None, help="inputs are truncated to this"),
    seed: int | None = typer.Option(None, help="seed of the run, the few-shot sample and the split"),
    test_split: str = typer.Option("test", help="name of the test split (file stem or hf split)"),
    text_column: str = typer.Option("text", help="text column of the data"),
    label_column: str = typer.Option("label", help="label column of the data"),
    overwrite: bool = typer.Option(False, help="replace a previous simulation's files in --out"),
) -> None:
    """Run a federation on this machine as real processes and write a report folder."""
    from pydantic import ValidationError

    from protos import RunConfig

    plan: dict[str, Any] = {"clients": 10, "rounds": None, "k_shot": 200, "test_limit": None, "run": {}}
    if preset is not None:
        if preset not in PLANS:
            raise typer.BadParameter(f"unknown preset {preset!r}; known: {', '.join(PLANS)}")
        plan = _merge(plan, PLANS[preset])
    run: dict[str, Any] = dict(plan["run"])
    if config is not None:
        run = _merge(run, json.loads(config.read_text()))
    run = _merge(
        run,
        _flags_to_run(
            rounds=rounds or plan["rounds"],
            task=task,
            local_popsize=local_popsize,
            local_iters=local_iters,
            intrinsic_dim=intrinsic_dim,
            prompt_length=prompt_length,
            perturb=perturb,
            perturb_rate=perturb_rate,
            aggregator=aggregator,
            eval_every=eval_every,
            max_input_tokens=max_input_tokens,
            seed=seed,
        ),
    )
    sites = clients or int(plan["clients"])
    run.setdefault("name", f"simulate-{sites}-clients")
    run["min_clients"] = min(int(run.get("min_clients", 1)), sites)
    try:
        run_config = RunConfig.model_validate(run)
    except ValidationError as exc:
        raise typer.BadParameter(f"invalid run settings: {exc.errors(include_url=False)}") from None

    from fedbpt_cli.simulation import Simulation

    sim = Simulation(
        config=run_config,
        sites=sites,
        data=data,
        out=out,
        alpha=non_iid,
        k_shot=k_shot if k_shot is not None else plan["k_shot"],
        test_limit=test_limit if test_limit is not None else plan["test_limit"],
        model=model,
        head=head,
        test_split=test_split,
        text_column=text_column,
        label_column=label_column,
        overwrite=overwrite,
        preset=preset,
    )
    started = time.monotonic()
    code = sim.run()
    typer.echo(f"wall time {time.monotonic() - started:.0f}s; report in {out}")
    raise typer.Exit(code)
