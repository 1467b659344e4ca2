"""Peak resident memory of child processes, read from the kernel's high-water mark.

``/proc/<pid>/status`` keeps ``VmHWM``, the most RAM the process ever held; it only grows, so the
last reading before the process exits is its peak, however short the peak was (sampling RSS
instead would miss spikes between samples). Linux only; elsewhere nothing is recorded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path


def high_water_mark(pid: int) -> int | None:
    """Peak RSS of ``pid`` in bytes so far, or None (gone, or not Linux)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    return None


class PeakRssWatcher:
    """Reads the high-water mark of every pid ``pids()`` names, every ``interval_s`` seconds, in
    a daemon thread; ``peaks`` keeps the last reading of each (its peak, once it has exited)."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval_s: float = 0.25) -> None:
        self._pids = pids
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self.peaks: dict[int, int] = {}

    def _read_all(self) -> None:
        for pid in list(self._pids()):
            value = high_water_mark(pid)
            if value is not None:
                self.peaks[pid] = max(value, self.peaks.get(pid, 0))

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._read_all()

    def __enter__(self) -> PeakRssWatcher:
        self._read_all()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def max_bytes(self) -> int | None:
        return max(self.peaks.values()) if self.peaks else None
