"""The results grid: FedBPT and its baselines on real data, several seeds, one command.

- ``grid``: the grid file (YAML) and the cells it expands into.
- ``cells``: running one cell: black-box methods through the real services (``Simulation``),
  zero-shot through the service, the white-box baseline in process (``whitebox``).
- ``records``: the compact result record of a cell, and reading them back.
- ``tables`` / ``document``: mean +- std tables, communication and memory tables, plots and
  ``docs/results.md``.
- ``runner``: the order, resume (finished cells are skipped), concurrency and progress.
"""
