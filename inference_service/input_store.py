"""Registered inputs (``POST /v1/inputs``): a cache bounded in bytes, keyed by (tenant, handle).

An entry holds one input set as a flat id array in the smallest dtype its ids fit (uint16 for
vocabularies up to 65,536, else int32) and the offsets of its inputs. Its size is those arrays'
bytes plus a fixed per-entry overhead; the total never exceeds ``max_bytes``: a new entry first
drops expired entries (unused for ``ttl_s``), then the least recently used ones. An entry larger
than the whole cache is refused. The tenant (a digest of the caller's API key) is part of the key,
so a handle registered under one key is not found under another: the same 404 as an unknown
handle, so a caller cannot tell "someone else has these inputs" from "nobody has".
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from inference_service.metrics import ServiceMetrics

# Python objects around the two arrays (key strings, the entry, dict slot): counted so that many
# tiny entries cannot hold more memory than the bound says.
ENTRY_OVERHEAD_BYTES = 512


class InputsTooLarge(Exception):
    def __init__(self, nbytes: int, limit: int) -> None:
        super().__init__(f"the inputs take {nbytes} bytes; this service keeps at most {limit}")
        self.nbytes = nbytes
        self.limit = limit


@dataclass
class StoredInputs:
    ids: np.ndarray  # [N] uint16 or int32
    offsets: np.ndarray  # [B + 1] int64
    last_used: float

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.offsets.nbytes) + ENTRY_OVERHEAD_BYTES

    @property
    def num_inputs(self) -> int:
        return len(self.offsets) - 1

    def rows(self) -> list[list[int]]:
        flat = self.ids.tolist()
        bounds = self.offsets.tolist()
        return [flat[a:b] for a, b in itertools.pairwise(bounds)]


def compact(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids in the smallest dtype that holds them, offsets [B+1] int64); ids must be >= 0."""
    dtype = np.uint16 if ids.size == 0 or int(ids.max()) < 2**16 else np.int32
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.ascontiguousarray(ids, dtype=dtype), offsets


class InputStore:
    def __init__(
        self,
        max_bytes: int,
        ttl_s: float,
        metrics: ServiceMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.metrics = metrics
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], StoredInputs] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tenant: str, handle: str, ids: np.ndarray, lengths: np.ndarray) -> StoredInputs:
        """Store (or refresh) one input set; raises :class:`InputsTooLarge` beyond the whole cache."""
        with self._lock:
            now = self.clock()
            key = (tenant, handle)
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = now
                self._entries.move_to_end(key)
                return entry
            flat, offsets = compact(ids, lengths)
            entry = StoredInputs(flat, offsets, now)
            if entry.nbytes > self.max_bytes:
                raise InputsTooLarge(entry.nbytes, self.max_bytes)
            self._expire(now)
            while self._entries and self._bytes + entry.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)), "capacity")
            self._entries[key] = entry
            self._bytes += entry.nbytes
            self._observe()
            return entry

    def get(self, tenant: str, handle: str) -> StoredInputs | None:
        """The entry of this tenant's handle, marked used; None if unknown, expired or evicted."""
        with self._lock:
            now = self.clock()
            self._expire(now)
            key = (tenant, handle)
            entry = self._entries.get(key)
            if entry is None:
                return None
            entry.last_used = now
            self._entries.move_to_end(key)
            return entry

    def _expire(self, now: float) -> None:
        # Least recently used first: the first unexpired entry ends the scan.
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.last_used < self.ttl_s:
                break
            self._drop(key, "expired")
        self._observe()

    def _drop(self, key: tuple[str, str], reason: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        if self.metrics is not None:
            self.metrics.input_cache_evictions.labels(reason).inc()

    def _observe(self) -> None:
        if self.metrics is not None:
            self.metrics.input_cache_bytes.set(self._bytes)
            self.metrics.input_cache_entries.set(len(self._entries))
