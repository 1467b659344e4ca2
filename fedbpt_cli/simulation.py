"""One simulated federation from data to report; ``fedbpt simulate`` builds and runs it."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fed_clients.data import DataError, load_labeled_texts
from fed_clients.evaluate import evaluate_prompt
from fed_clients.inputs import encode_split, input_budget
from fed_clients.model_api import ModelService
from fed_clients.presets import resolve_config
from fed_clients.transport import JsonService
from fedbpt_cli import federation_data, watch
from fedbpt_cli.estimate import describe, estimate_rows
from fedbpt_cli.peak_rss import PeakRssWatcher
from fedbpt_cli.report import write_report
from fedbpt_cli.services import LocalFederation, ModelServer, SimulationError
from protos import PromptResponse, RunConfig

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
# What a simulation writes into its folder; only these are removed by ``overwrite``.
ARTEFACTS = (
    "data",
    "logs",
    "report.json",
    "curves.png",
    "prompt.json",
    "prompt_final.json",
    "admin_token",
    "coordinator.sqlite",
)


def clear_previous(out: Path, overwrite: bool) -> None:
    """A report folder holds one run: refuse to mix two unless asked to replace the old one."""
    present = [out / name for name in ARTEFACTS if (out / name).exists()]
    present += sorted(out.glob("coordinator.sqlite-*"))
    if present and not overwrite:
        raise SimulationError(
            f"{out} already holds a simulation ({present[0].name}); pass --overwrite or another --out"
        )
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


@dataclass
class Simulation:
    config: RunConfig
    sites: int
    data: str
    out: Path
    alpha: float | None = None
    k_shot: int | None = None
    test_limit: int | None = None
    # Clients score each global state on a fixed sample of this many test examples (a cheaper curve);
    # the selected and final prompts are scored on the whole test set all the same.
    round_test_limit: int | None = None
    model: str | None = None
    head: str | None = None
    test_split: str = "test"
    text_column: str = "text"
    label_column: str = "label"
    overwrite: bool = False
    console: Console | None = None
    # A running inference service to use instead of starting one (experiments share one service).
    model_url: str | None = None
    # Score the no-prompt baseline first (experiments score it once per dataset instead).
    zero_shot: bool = True
    # The interpreter of the client processes (None: this one), e.g. a client-only environment.
    client_python: str | None = None
    # The --preset the settings started from (None: none; a long CPU run then gets a hint).
    preset: str | None = None

    def run(self) -> int:
        console = self.console or Console()
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            clear_previous(self.out, self.overwrite)
            files = self._prepare(console)
        except (DataError, SimulationError) as exc:
            console.print(f"[red]error:[/] {exc}")
            return EXIT_FAILED
        federation = LocalFederation(
            self.out, ModelServer(self.model, self.head), client_python=self.client_python
        )
        try:
            return self._run(federation, files, console, started)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping every process[/]")
            return EXIT_INTERRUPTED
        except SimulationError as exc:
            console.print(f"[red]error:[/] {exc}")
            return EXIT_FAILED
        finally:
            federation.stop()

    def _prepare(self, console: Console) -> federation_data.FederationFiles:
        sources = federation_data.find_sources(self.data, self.test_split)
        files = federation_data.prepare(
            sources,
            self.out / "data",
            self.sites,
            self.k_shot,
            self.alpha,
            self.config.seed,
            self.test_limit,
            self.text_column,
            self.label_column,
            self.round_test_limit,
        )
        table = Table(
            title=f"training examples per client ({'IID' if self.alpha is None else f'Dirichlet alpha={self.alpha}'})"
        )
        table.add_column("client")
        for name in files.classes:
            table.add_column(name, justify="right")
        for k, row in enumerate(files.counts):
            table.add_row(f"site-{k}", *(str(int(v)) for v in row))
        console.print(table)
        console.print(
            f"test set: {files.test_size} examples of {sources.test}; each round scores "
            f"{files.round_test_size} of them, one shard per client"
        )
        return files

    def _run(
        self,
        federation: LocalFederation,
        files: federation_data.FederationFiles,
        console: Console,
        started: float,
    ) -> int:
        with console.status("starting the inference service and the coordinator"):
            federation.start_services(model_url=self.model_url)
        console.print(f"inference service {federation.model_url}; coordinator {federation.coordinator_url}")
        # The fragment never reaches the server; the page keeps the token for its tab only.
        console.print(f"dashboard: {federation.coordinator_url}/#token={federation.admin_token}")
        (self.out / "admin_token").write_text(federation.admin_token + "\n")
        (self.out / "admin_token").chmod(0o600)

        zero_shot = None
        rate = None
        if self.zero_shot:
            with console.status("scoring the zero-shot baseline (no prompt)"):
                scoring = time.monotonic()
                zero_shot = self._zero_shot(federation.model_url, files)
                rate = files.test_size / max(time.monotonic() - scoring, 1e-6)
            console.print(f"zero-shot accuracy: {zero_shot:.4f}")
        self._print_estimate(console, files, rate)

        run_id, tokens = federation.create_run(self.config, self.sites)
        for k, token in enumerate(tokens):
            federation.start_client(k, token, files.train[k], files.test[k])
        federation.start_run(run_id)
        console.print(f"run {run_id}: {self.sites} clients, {self.config.rounds} rounds")

        def check() -> None:
            dead = federation.dead_services()
            if dead:
                raise SimulationError(f"{dead[0].name} exited:\n{dead[0].log_tail()}")
            if all(not c.alive() for c in federation.clients):
                codes = [c.returncode() for c in federation.clients]
                raise SimulationError(f"every client exited before the run ended (exit codes {codes})")

        client_pids = [c.pid for c in federation.clients]
        with federation.admin() as http, PeakRssWatcher(lambda: client_pids) as memory:
            info, rounds = watch.follow(http, run_id, console, check)
            self._wait_for_clients(federation, console)
            info, rounds = watch.fetch(http, run_id)
            prompts = {which: self._get_prompt(http, run_id, which) for which in ("selected", "final")}
        with console.status("scoring the selected and the final prompt on the whole test set"):
            scored = self._score_prompts(federation.model_url, files, prompts)
        summary = write_report(
            self.out,
            info,
            rounds,
            prompts["selected"],
            {
                **self._description(federation, files),
                "client_peak_rss_bytes": memory.max_bytes,
                "whole_test": scored,
            },
            zero_shot_accuracy=zero_shot,
            wall_seconds=time.monotonic() - started,
            final_prompt=prompts["final"],
        )
        self._print_summary(console, summary)
        if info.state != "finished":
            console.print(f"[red]run {info.state}[/]: {info.error or ''}")
            return EXIT_FAILED
        return EXIT_OK

    def _print_estimate(
        self, console: Console, files: federation_data.FederationFiles, rate: float | None
    ) -> None:
        per_client = [int(n) for n in files.counts.sum(axis=1)]
        rows = estimate_rows(self.config, per_client, files.round_test_size, files.test_size)
        for line in describe(rows, rate, self.preset):
            console.print(line)

    @staticmethod
    def _get_prompt(http: Any, run_id: str, which: str) -> PromptResponse | None:
        response = http.get(f"/v1/runs/{run_id}/prompt", params={"state": which})
        return PromptResponse.model_validate_json(response.content) if response.is_success else None

    def _score_prompts(
        self,
        model_url: str,
        files: federation_data.FederationFiles,
        prompts: dict[str, PromptResponse | None],
    ) -> dict[str, dict[str, float | int]]:
        """{which: {state, accuracy}} of each prompt on the whole test set (one scoring per state)."""
        by_state: dict[int, float] = {}
        out: dict[str, dict[str, float | int]] = {}
        for which, prompt in prompts.items():
            if prompt is None:
                continue
            if prompt.round not in by_state:
                by_state[prompt.round] = self._accuracy(model_url, files, prompt)
            out[which] = {"state": prompt.round, "accuracy": by_state[prompt.round]}
        return out

    def _zero_shot(self, model_url: str, files: federation_data.FederationFiles) -> float:
        """Accuracy with no prompt rows at all on the whole test set."""
        return self._accuracy(model_url, files, None)

    def _accuracy(
        self, model_url: str, files: federation_data.FederationFiles, prompt: PromptResponse | None
    ) -> float:
        """Accuracy of ``prompt`` (None: no prompt rows) on the whole test set, through the service."""
        test = load_labeled_texts(str(files.whole_test))
        with JsonService(name="model service", base_url=model_url, timeout_s=900) as http:
            model = ModelService(http)
            task = resolve_config(self.config, model.info().head)
            budget = input_budget(
                model, task, self.config.projection.prompt_length, self.config.max_input_tokens
            )
            split = encode_split(model, test, task, budget)
            z = None if prompt is None else prompt.z.numpy()
            projection = None if prompt is None else prompt.projection
            return evaluate_prompt(
                model, task.spec, split, z=z, projection=projection, batch_size=256
            ).accuracy

    @staticmethod
    def _wait_for_clients(federation: LocalFederation, console: Console, timeout_s: float = 600.0) -> None:
        """Clients evaluate the final prompt after the last round; wait for their reports."""
        deadline = time.monotonic() + timeout_s
        with console.status("clients are evaluating the final prompt"):
            while any(c.alive() for c in federation.clients) and time.monotonic() < deadline:
                time.sleep(0.5)
        failed = [c.name for c in federation.clients if c.returncode() not in (0, None)]
        if failed:
            console.print(
                f"[yellow]client(s) exited with an error: {failed}; see {federation.workdir / 'logs'}[/]"
            )

    def _description(
        self, federation: LocalFederation, files: federation_data.FederationFiles
    ) -> dict[str, Any]:
        return {
            "clients": self.sites,
            "data": self.data,
            "alpha": self.alpha,
            "k_shot": self.k_shot,
            "test_size": files.test_size,
            "classes": files.classes,
            "label_counts": files.counts.tolist(),
            "mean_label_entropy": files.entropy,
            "model": self.model or "embedded all-MiniLM-L6-v2",
            "head": self.head,
            "model_url": federation.model_url,
            "coordinator_url": federation.coordinator_url,
        }

    @staticmethod
    def _print_summary(console: Console, summary: dict[str, Any]) -> None:
        def pct(x: Any) -> str:
            return "-" if x is None else f"{100 * x:.2f}%"

        table = Table(title="result")
        table.add_column("")
        table.add_column("value", justify="right")
        table.add_row("zero-shot accuracy", pct(summary["zero_shot_accuracy"]))
        table.add_row("initial prompt (state 0)", pct(summary["initial_accuracy"]))
        table.add_row(
            f"[bold]selected prompt[/] (state {summary['selected_state']}, lowest validation loss)",
            pct(summary["selected_accuracy"]),
        )
        table.add_row(f"final prompt (state {summary['final_state']})", pct(summary["final_accuracy"]))
        table.add_row(
            f"best by test, hindsight (state {summary['best_state']})", pct(summary["best_accuracy"])
        )
        table.add_row("rounds completed", str(summary["rounds_completed"]))
        for link, value in summary["bytes_per_client_per_round"].items():
            table.add_row(f"bytes/client/round {link.replace('_', ' ')}", f"{value:,.0f}")
        console.print(table)
