"""fedbpt driven by Flower's deployment engine (the ``flower`` extra: ``pip install -e ".[flower]"``).

The same FedBPT as fedbpt's own coordinator, with Flower's SuperLink and SuperNodes carrying the
messages (docs/flower.md):

- ``flower_app.server_app`` (the ServerApp) runs :class:`flower_app.strategy.FedBPTStrategy`, whose
  round logic is the coordinator's own code: client sampling and per-client seeds
  (``coordinator.sampling``), update admission (``coordinator.admission``), the server step through
  the ``Aggregator`` interface (``coordinator.aggregators.server_step``) and prompt selection
  (``coordinator.store.select_state``). It imports no torch.
- ``flower_app.client_app`` (the ClientApp) runs a site's step, ``fed_clients.client.SiteClient``,
  against a remote fedbpt inference service named in the SuperNode's node config. It imports
  ``fed_clients`` and ``protos`` only: no torch, no coordinator.
- The model owner runs ``fedbpt serve-model`` as always; no other party holds the weights.

Messages carry fedbpt's own wire schemas (``protos``: ``Task``, ``ClientUpdate``, ``EvalReport``) as
JSON, so both drivers exchange exactly the same validated objects (flower_app/messages.py).
"""
