"""The coordinator: runs, enrolment, rounds and server-level CMA-ES aggregation, in SQLite."""
