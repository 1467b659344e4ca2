"""The Flower ServerApp: ``flower_app.server_app:app`` (run by the SuperLink for ``flwr run``).

It reads the run config (flower_app/config.py), builds :class:`flower_app.strategy.FedBPTStrategy`
on its checkpoint folder (continuing a run that a previous ServerApp left there) and runs the rounds
still to do. Imports the coordinator's aggregation and ``protos``; no torch, no model.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flower_app.config import app_settings, log_to_stderr
from flower_app.strategy import FedBPTStrategy
from flower_app.tracking import EventWriter

# A plain assignment: Flower finds the app by reading this module's syntax tree.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    log_to_stderr("flower_app")
    settings = app_settings(context.run_config)
    tracker = EventWriter(logdir=settings.tensorboard_dir) if settings.tensorboard_dir else None
    strategy = FedBPTStrategy(
        config=settings.run,
        sites=settings.sites,
        checkpoint_dir=settings.checkpoint_dir,
        join_timeout_s=settings.join_timeout_s,
        tracker=tracker,
    )
    try:
        strategy.run(grid)
    finally:
        if tracker is not None:
            tracker.close()
