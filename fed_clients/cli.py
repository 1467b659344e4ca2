"""``fedbpt client``, ``fedbpt evaluate`` and ``fedbpt partition``.

Imported by the ``fedbpt`` entry point on every install, so only typer (and the standard library)
is imported at module level; everything else is imported inside the commands.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from fed_clients.settings import ClientSettings
    from fed_clients.transport import JsonService

EXIT_FATAL = 2  # a 4xx, bad data or configuration: retrying will not help
EXIT_UNAVAILABLE = 3  # a service stayed unreachable for the whole retry budget

log = logging.getLogger("fed_clients")


def _settings(**given: Any) -> ClientSettings:
    from pydantic import ValidationError

    from fed_clients.settings import ClientSettings

    try:
        return ClientSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _setup_logging(level: str) -> None:
    """Rich output on a terminal; one plain line per record otherwise (log files, CI)."""
    import sys

    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _service(
    settings: ClientSettings, name: str, url: str, token: str | None, alternates: Sequence[str] = ()
) -> JsonService:
    from fed_clients.transport import JsonService, RetryPolicy

    return JsonService(
        name=name,
        base_url=url,
        alternates=tuple(alternates),
        token=token,
        timeout_s=settings.request_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        retry=RetryPolicy(
            total_s=settings.retry_total_s,
            initial_s=settings.retry_initial_s,
            max_backoff_s=settings.retry_max_s,
        ),
        verify=settings.ca_file or True,
    )


def _model_service(settings: ClientSettings) -> JsonService:
    urls = settings.model_endpoints()
    if not urls:
        raise _fail("--model-endpoint names no URL (give one, or several separated by commas)")
    first, *alternates = urls
    return _service(settings, "model service", first, _secret(settings.api_key), alternates)


def _secret(value: Any) -> str | None:
    return None if value is None else str(value.get_secret_value())


def _fail(message: str, code: int = EXIT_FATAL) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _install_sigterm() -> None:
    import signal
    import sys

    # A clean exit (finally blocks, closed connections) when a supervisor stops us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def _require(*flags: tuple[str, Any]) -> None:
    """Exit 2 naming every required flag that has neither a value nor its environment variable."""
    missing = [flag for flag, value in flags if not value]
    if missing:
        raise _fail(f"missing {', '.join(missing)} (or their FEDBPT_* environment variables)")


def _client_data(settings: ClientSettings) -> tuple[Any, Any]:
    """(train, test or None) from the settings' files; bad data exits 2 before any service is called."""
    from fed_clients.data import DataError, load_labeled_texts

    assert settings.data
    try:
        train = load_labeled_texts(settings.data, settings.text_column, settings.label_column)
        test = (
            load_labeled_texts(settings.test_data, settings.text_column, settings.label_column)
            if settings.test_data
            else None
        )
    except DataError as exc:
        raise _fail(str(exc)) from None
    log.info("loaded %d training examples from %s", len(train), train.source)
    return train, test


def _model_api(settings: ClientSettings, model_http: JsonService) -> Any:
    from fed_clients.model_api import ModelService

    return ModelService(
        model_http,
        max_ids_per_call=settings.max_ids_per_call,
        input_handles=settings.input_handles,
        compact_answers=settings.compact_answers,
    )


def _site_client(
    settings: ClientSettings, coordinator_http: JsonService, model_http: JsonService, train: Any, test: Any
) -> Any:
    from fed_clients.client import SiteClient
    from fed_clients.coordinator_api import CoordinatorService

    return SiteClient(
        CoordinatorService(coordinator_http),
        _model_api(settings, model_http),
        train,
        test,
        run_id=settings.run_id,
        poll_wait_s=settings.poll_wait_s,
        label_names=settings.label_names,
    )


def client(
    coordinator: str | None = typer.Option(None, help="coordinator URL (env FEDBPT_COORDINATOR)"),
    token: str | None = typer.Option(None, help="this client's coordinator token (env FEDBPT_TOKEN)"),
    model_endpoint: str | None = typer.Option(None, help="inference service URL (env FEDBPT_MODEL_ENDPOINT)"),
    data: str | None = typer.Option(None, help="training data: .jsonl/.csv/.tsv or hf:NAME/CONFIG:SPLIT"),
    test_data: str | None = typer.Option(None, help="held-out data for evaluation"),
    text_column: str | None = typer.Option(None, help="text column (default: text)"),
    label_column: str | None = typer.Option(None, help="label column (default: label)"),
    label_names: list[str] | None = typer.Option(
        None, "--label-name", help="order of string labels (repeat)"
    ),
    model_api_key: str | None = typer.Option(None, help="inference service key (env FEDBPT_API_KEY)"),
    run_id: str | None = typer.Option(None, help="run id (default: GET /v1/whoami) (env FEDBPT_RUN_ID)"),
    poll_wait: float | None = typer.Option(None, help="long-poll seconds of GET task (default 30)"),
    retry_total: float | None = typer.Option(None, help="seconds one request is retried (default 600)"),
    log_level: str | None = typer.Option(None, help="debug | info | warning"),
    ca_file: str | None = typer.Option(None, help="PEM bundle to verify the services' TLS certificates"),
) -> None:
    """Join a federated run as one site: train locally each round, upload, evaluate at the end."""
    settings = _settings(
        coordinator=coordinator,
        token=token,
        model_endpoint=model_endpoint,
        data=data,
        test_data=test_data,
        text_column=text_column,
        label_column=label_column,
        label_names=label_names or None,
        api_key=model_api_key,
        run_id=run_id,
        poll_wait_s=poll_wait,
        retry_total_s=retry_total,
        log_level=log_level,
        ca_file=ca_file,
    )
    _require(
        ("--coordinator", settings.coordinator),
        ("--token", settings.token),
        ("--model-endpoint", settings.model_endpoint),
        ("--data", settings.data),
    )
    _setup_logging(settings.log_level)
    _install_sigterm()

    from fed_clients.client import ClientError
    from fed_clients.data import DataError
    from fed_clients.presets import PresetError
    from fed_clients.transport import FatalServiceError, ServiceError, ServiceUnavailable

    train, test = _client_data(settings)
    coordinator_http = _service(settings, "coordinator", str(settings.coordinator), _secret(settings.token))
    model_http = _model_service(settings)
    site = _site_client(settings, coordinator_http, model_http, train, test)
    try:
        result = site.run()
    except ServiceUnavailable as exc:
        raise _fail(str(exc), EXIT_UNAVAILABLE) from None
    except (FatalServiceError, ServiceError, ClientError, DataError, PresetError) as exc:
        raise _fail(str(exc)) from None
    finally:
        coordinator_http.close()
        model_http.close()
    if result is not None:
        typer.echo(f"final test accuracy: {result.accuracy:.4f} ({result.correct}/{result.n})")
    typer.echo(f"done: trained {len(site.rounds_trained)} round(s)")


def evaluate(
    data: str = typer.Option(..., help="labelled data: .jsonl/.csv/.tsv or hf:NAME/CONFIG:SPLIT"),
    model_endpoint: str | None = typer.Option(None, help="inference service URL (env FEDBPT_MODEL_ENDPOINT)"),
    run_prompt: str | None = typer.Option(
        None,
        help="a saved PromptResponse JSON file, or a coordinator /v1/runs/{id}/prompt URL (none: zero-shot)",
    ),
    token: str | None = typer.Option(None, help="bearer token for a coordinator URL (env FEDBPT_TOKEN)"),
    task: str | None = typer.Option(None, help="task preset (default: the prompt's, else sst2)"),
    template: str | None = typer.Option(None, help="template override, with {input} (and {mask})"),
    labels: list[str] | None = typer.Option(None, "--labels", help="label words/anchors override (repeat)"),
    text_column: str | None = typer.Option(None, help="text column (default: text)"),
    label_column: str | None = typer.Option(None, help="label column (default: label)"),
    label_names: list[str] | None = typer.Option(
        None, "--label-name", help="order of string labels (repeat)"
    ),
    model_api_key: str | None = typer.Option(None, help="inference service key (env FEDBPT_API_KEY)"),
    max_input_tokens: int = typer.Option(256, help="inputs are truncated to this many tokens"),
    batch_size: int = typer.Option(256, min=1, help="inputs per score call (progress granularity)"),
    limit: int | None = typer.Option(None, min=1, help="evaluate only the first N examples"),
    state: list[str] | None = typer.Option(
        None,
        "--state",
        help="with a coordinator /prompt URL: which state(s), side by side (repeat): selected (the "
        "default: lowest validation loss), final, N, or best (every state scored on THIS data: hindsight)",
    ),
) -> None:
    """Accuracy (and a confusion table) of a prompt, or of no prompt (zero-shot), on a dataset."""
    settings = _settings(
        model_endpoint=model_endpoint,
        api_key=model_api_key,
        token=token,
        text_column=text_column,
        label_column=label_column,
        label_names=label_names or None,
    )
    if not settings.model_endpoint:
        raise _fail("missing --model-endpoint (or FEDBPT_MODEL_ENDPOINT)")
    _setup_logging("warning")

    from fed_clients.data import DataError
    from fed_clients.presets import PresetError
    from fed_clients.transport import ServiceError, ServiceUnavailable

    if state and not (run_prompt or "").startswith(("http://", "https://")):
        raise _fail("--state needs --run-prompt as a coordinator /v1/runs/{id}/prompt URL")
    wanted = _EvaluationRequest(
        data, run_prompt, state or [], task, template, labels, max_input_tokens, limit
    )
    model_http = _model_service(settings)
    try:
        scored = _score_prompts(settings, _model_api(settings, model_http), wanted, batch_size)
    except ServiceUnavailable as exc:
        raise _fail(str(exc), EXIT_UNAVAILABLE) from None
    except (ServiceError, DataError, PresetError, ValueError) as exc:
        raise _fail(str(exc)) from None
    finally:
        model_http.close()
    _print_results(scored, data)


@dataclass(frozen=True)
class _EvaluationRequest:
    """What ``fedbpt evaluate`` was asked to score."""

    data: str
    run_prompt: str | None
    states: list[str]
    task: str | None
    template: str | None
    labels: list[str] | None
    max_input_tokens: int
    limit: int | None


@dataclass
class _Scored:
    """{which: result} and {which: prompt} in the order asked, with the task they were scored under."""

    results: dict[str, Any]
    prompts: dict[str, Any]
    resolved: Any
    head: str


def _score_prompts(
    settings: ClientSettings, model: Any, wanted: _EvaluationRequest, batch_size: int
) -> _Scored:
    """Every prompt asked for (or no prompt: zero-shot) scored on the whole dataset."""
    from fed_clients.data import load_labeled_texts
    from fed_clients.inputs import encode_split, input_budget
    from fed_clients.presets import resolve_task

    run_prompt = wanted.run_prompt
    prompts = _load_prompts(run_prompt, settings, wanted.states) if run_prompt else {}
    prompt = next(iter(prompts.values()), None)
    head = model.info().head
    resolved = resolve_task(
        wanted.task or (prompt.task if prompt else "sst2"),
        head,
        wanted.template if wanted.template is not None else (prompt.template if prompt else None),
        list(wanted.labels) if wanted.labels else (prompt.labels if prompt else None),
    )
    prompt_length = prompt.projection.prompt_length if prompt else 0
    budget = input_budget(model, resolved, prompt_length, wanted.max_input_tokens)
    raw = load_labeled_texts(wanted.data, settings.text_column, settings.label_column)
    if wanted.limit is not None:
        raw = raw.subset(range(min(wanted.limit, len(raw))))
    split = encode_split(model, raw, resolved, budget, settings.label_names)
    results = {
        which: _run_evaluation(model, resolved.spec, split, p, batch_size) for which, p in prompts.items()
    }
    if "best" in wanted.states:
        results["best"], prompts["best"] = _best_state(
            run_prompt or "", settings, model, resolved, split, batch_size
        )
    if not prompts:
        results["zero-shot"] = _run_evaluation(model, resolved.spec, split, None, batch_size)
    return _Scored(results, prompts, resolved, head)


def _print_results(scored: _Scored, data: str) -> None:
    first = next(iter(scored.results))
    _print_result(scored.results[first], scored.resolved, scored.prompts.get(first), data, scored.head)
    if len(scored.results) > 1:
        typer.echo("side by side:")
        for which, result in scored.results.items():
            typer.echo(
                f"  {which:>8}: state {scored.prompts[which].round:>4}  "
                f"accuracy {result.accuracy:.4f}  loss {result.loss:.4f}"
            )


def _load_prompts(source: str, settings: ClientSettings, states: list[str]) -> dict[str, Any]:
    """{state asked for: PromptResponse}; one prompt as given when no state is asked for."""
    wanted = [s for s in states if s != "best"]
    if not wanted:
        return {} if states else {"prompt": _load_prompt(source, settings)}
    return {which: _load_prompt(source, settings, which) for which in wanted}


def _best_state(
    source: str, settings: ClientSettings, model: Any, resolved: Any, split: Any, batch_size: int
) -> Any:
    """(result, prompt) of the state that scores best on ``split``, scanning every stored state:
    a hindsight figure (the data chose it), printed beside the selected one, never handed out."""
    final = _load_prompt(source, settings, "final")
    best: tuple[Any, Any] | None = None
    for idx in range(final.round + 1):
        prompt = final if idx == final.round else _load_prompt(source, settings, str(idx))
        result = _run_evaluation(model, resolved.spec, split, prompt, batch_size)
        if best is None or result.accuracy > best[0].accuracy:
            best = (result, prompt)
    assert best is not None
    return best


def _load_prompt(source: str, settings: ClientSettings, state: str | None = None) -> Any:
    from pydantic import ValidationError

    from protos import PromptResponse

    if source.startswith(("http://", "https://")):
        import httpx

        parsed = httpx.URL(source)
        base = str(parsed.copy_with(path="/", query=None)).rstrip("/")
        http = _service(settings, "coordinator", base, _secret(settings.token))
        params = dict(parsed.params) | ({"state": state} if state is not None else {})
        try:
            return http.get(parsed.path, PromptResponse, params=params)
        finally:
            http.close()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{source}: no such prompt file (give a PromptResponse JSON file or a /prompt URL)")
    try:
        return PromptResponse.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ValueError(f"{source}: not a PromptResponse: {exc.errors(include_url=False)}") from None


def _run_evaluation(model: Any, spec: Any, split: Any, prompt: Any, batch_size: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from fed_clients.evaluate import evaluate_prompt

    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    ) as bar:
        job = bar.add_task("scoring", total=len(split))
        return evaluate_prompt(
            model,
            spec,
            split,
            z=prompt.z.numpy() if prompt else None,
            projection=prompt.projection if prompt else None,
            batch_size=batch_size,
            progress=lambda done: bar.update(job, completed=done),
        )


def _print_result(result: Any, resolved: Any, prompt: Any, data: str, head: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    names = list(resolved.class_names or resolved.spec.labels)
    chosen = f", {prompt.chosen}" if prompt is not None and prompt.chosen != "final" else ""
    what = f"prompt of round {prompt.round}{chosen}" if prompt else "zero-shot (no prompt)"
    table = Table(title="confusion (rows: true label)")
    table.add_column("true \\ predicted")
    for name in names:
        table.add_column(name, justify="right")
    for i, name in enumerate(names):
        table.add_row(name, *(str(int(v)) for v in result.confusion[i]))
    console.print(table)
    typer.echo(f"data: {data}; task {resolved.name} ({head} head); {what}")
    typer.echo(f"accuracy: {result.accuracy:.4f} ({result.correct}/{result.n})")
    typer.echo(f"loss: {result.loss:.4f}")


def partition(
    data: str = typer.Option(..., help="the dataset to split: .jsonl/.csv/.tsv or hf:NAME/CONFIG:SPLIT"),
    clients: int = typer.Option(..., min=1, help="number of clients"),
    out: Path = typer.Option(..., help="folder for client_<k>.jsonl and partition.json"),
    alpha: float | None = typer.Option(None, help="Dirichlet label skew (smaller: more skew)"),
    iid: bool = typer.Option(False, "--iid", help="IID split instead of Dirichlet"),
    k_shot: int | None = typer.Option(
        None, min=1, help="first sample K examples per class (whole federation)"
    ),
    seed: int = typer.Option(1234, help="seed of the sampling and the split"),
    text_column: str = typer.Option("text", help="text column"),
    label_column: str = typer.Option("label", help="label column"),
) -> None:
    """Split one dataset into N client files (JSON Lines), IID or Dirichlet label skew."""
    if iid == (alpha is not None):
        raise _fail("give exactly one of --iid or --alpha A")
    if alpha is not None and alpha <= 0:
        raise _fail("--alpha must be positive")

    import json

    from fed_clients.data import DataError, encode_labels, load_labeled_texts
    from fed_clients.fewshot import k_shot as sample_k_shot
    from fed_clients.partition import dirichlet_partition, iid_partition

    try:
        raw = load_labeled_texts(data, text_column, label_column)
        labels = encode_labels(raw.labels)
    except DataError as exc:
        raise _fail(str(exc)) from None
    # Class names for the table: the raw label values in index order.
    names: dict[int, str] = {}
    for value, index in zip(raw.labels, labels.tolist(), strict=True):
        names.setdefault(int(index), str(value))
    num_classes = int(labels.max()) + 1

    pool = raw
    if k_shot is not None:
        pick = sample_k_shot(labels, k_shot, seed)
        for c, n in sorted(pick.short_classes.items()):
            typer.secho(
                f"warning: class {names.get(c, c)} has only {n} examples (< {k_shot})", fg="yellow", err=True
            )
        pool = raw.subset(pick.train)
        labels = labels[pick.train]
    try:
        parts = (
            iid_partition(len(pool), clients, seed)
            if iid
            else dirichlet_partition(labels, clients, float(alpha or 0), seed)
        )
    except ValueError as exc:
        raise _fail(str(exc)) from None

    scheme = "iid" if iid else "dirichlet-per-class"
    written = _write_partition(out, pool, labels, parts, names, num_classes)
    manifest = {"source": raw.source, "clients": clients, "scheme": scheme, "alpha": alpha}
    manifest |= {"k_shot": k_shot, "seed": seed, **written}
    (out / "partition.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _print_partition(manifest, f"{len(pool)} examples of {raw.source} over {clients} clients")
    typer.echo(f"mean label entropy per client: {manifest['mean_label_entropy']:.3f} nats; wrote {out}")


def _write_partition(
    out: Path, pool: Any, labels: Any, parts: list[Any], names: dict[int, str], num_classes: int
) -> dict[str, Any]:
    """One client_<k>.jsonl per part; returns the manifest's files, classes and label counts."""
    from fed_clients.data import write_jsonl
    from fed_clients.partition import label_counts, mean_label_entropy

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, part in enumerate(parts):
        path = out / f"client_{k}.jsonl"
        subset = pool.subset(part)
        write_jsonl(path, subset.texts, subset.labels)
        files.append(path.name)
    counts = label_counts(labels, parts, num_classes)
    return {
        "files": files,
        "classes": [names.get(c, str(c)) for c in range(num_classes)],
        "label_counts": counts.tolist(),
        "mean_label_entropy": mean_label_entropy(counts),
    }


def _print_partition(manifest: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title} ({manifest['scheme']})")
    table.add_column("client")
    for name in manifest["classes"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for name, row in zip(manifest["files"], manifest["label_counts"], strict=True):
        table.add_row(name, *(str(int(v)) for v in row), str(int(sum(row))))
    Console().print(table)
