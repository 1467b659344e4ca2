"""Entry point of ``fedbpt``. Each role's command lives in that role's ``cli`` module, which imports
only light modules at import time, so ``fedbpt client`` works on an install without torch."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="fedbpt",
    help="Federated black-box prompt tuning: serve a model, coordinate a run, train as a site.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# (command name, module, function). The module's import must not pull torch or a web framework.
COMMANDS: list[tuple[str, str, str]] = [
    ("serve-model", "inference_service.cli", "serve_model"),
    ("serve-coordinator", "coordinator.cli", "serve_coordinator"),
    ("client", "fed_clients.cli", "client"),
    ("evaluate", "fed_clients.cli", "evaluate"),
    ("partition", "fed_clients.cli", "partition"),
    ("simulate", "fedbpt_cli.simulate", "simulate"),
    ("experiment", "fedbpt_cli.experiment", "experiment"),
    ("make-random-model", "inference_service.random_models", "make_random_model"),
]


def _register() -> None:
    for name, module_name, attr in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a role module that does not exist yet is skipped; a missing dependency inside
            # an existing module is a real error and propagates.
            if exc.name == module_name:
                continue
            raise
        app.command(name)(getattr(module, attr))


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
