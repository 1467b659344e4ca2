"""Child processes on 127.0.0.1: start a service, wait until it answers, stop it cleanly.

Used by ``fedbpt simulate``, the experiment runner and the integration tests, which all run the
real services as separate processes and talk HTTP to them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def fedbpt_command(*args: str, python: str | None = None) -> list[str]:
    """The ``fedbpt`` CLI run by this interpreter, or by ``python`` (another environment, e.g. a
    client-only install); works without the console script on PATH."""
    return [python or sys.executable, "-m", "fedbpt_cli.main", *args]


def python_module_command(module: str, *args: str, python: str | None = None) -> list[str]:
    """``python -m module args`` with this interpreter (or ``python``)."""
    return [python or sys.executable, "-m", module, *args]


class ManagedProcess:
    """One child process with its output in a log file.

    ``stop()`` sends SIGTERM (so uvicorn shuts down gracefully), then SIGKILL after ``grace`` s;
    ``kill()`` sends SIGKILL at once (fault-injection tests).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            # Own process group: Ctrl-C in a terminal reaches the parent only, which then stops
            # its children in order instead of all of them dying at once.
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_http(self, url: str, timeout: float = 120.0, headers: Mapping[str, str] | None = None) -> None:
        """Block until ``GET url`` answers 200; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with code {self.returncode()} before {url} answered:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(url, timeout=2.0, headers=dict(headers or {}), verify=False)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.name}: {url} did not answer 200 within {timeout}s ({last}):\n{self.log_tail()}"
        )

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL now (no cleanup in the child): used to test crash safety."""
        if self.alive():
            assert self.proc is not None
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._close_log()

    def stop(self, grace: float = 10.0) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@contextlib.contextmanager
def running(
    process: ManagedProcess, ready_url: str | None = None, timeout: float = 120.0
) -> Iterator[ManagedProcess]:
    """Start ``process``, optionally wait for ``ready_url``, and always stop it on exit."""
    process.start()
    try:
        if ready_url is not None:
            process.wait_http(ready_url, timeout=timeout)
        yield process
    finally:
        process.stop()
