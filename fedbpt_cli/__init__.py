"""The ``fedbpt`` command: one subcommand per role, plus simulate, evaluate, partition, experiment.

This is the only package that imports more than one role; the roles never import each other.
"""
