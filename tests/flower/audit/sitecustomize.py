"""Loaded at interpreter start-up by every Python process of the Flower deployment test (its folder
is on their PYTHONPATH): records, through an audit hook, which process imported a tensor library or
opened a file in the model's folder. Inherited by every child (SuperExec, ClientApp and ServerApp
processes), so the test sees all of them, including short-lived ones, without timing anything.

Each record is one line appended to ``FEDBPT_AUDIT_LOG``: ``pid<TAB>event<TAB>detail<TAB>argv``;
``start`` is written once per process (the proof that the hook ran there).
"""

from __future__ import annotations

import os
import sys

_LOG = os.environ.get("FEDBPT_AUDIT_LOG")
_MODEL_DIR = os.environ.get("FEDBPT_AUDIT_MODEL_DIR")
_WATCHED = ("torch", "transformers", "safetensors", "sentence_transformers")


def _write(event: str, detail: str) -> None:
    assert _LOG is not None
    argv = " ".join(sys.orig_argv)[:300].replace("\t", " ").replace("\n", " ")
    line = f"{os.getpid()}\t{event}\t{detail}\t{argv}\n"
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write of a short line in O_APPEND: never interleaved
    finally:
        os.close(fd)


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event == "import" and isinstance(args[0], str) and args[0] in _WATCHED:
        _write("import", args[0])
    elif event == "open" and _MODEL_DIR and isinstance(args[0], str | bytes):
        path = os.fsdecode(args[0])
        if os.path.abspath(path).startswith(_MODEL_DIR):
            _write("open", path)


if _LOG:
    _write("start", "")
    sys.addaudithook(_hook)
