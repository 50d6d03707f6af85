"""Rendered RE-AIM answers, kept until their hospital's facts change. Pure.

Every fact row the projection writes bumps its hospital's version (``scope_versions``, in
the same transaction), and a query reads the version in the same snapshot as the facts it
would compute from. An answer is kept under the version it was computed at and served only
while that is still the version, so it can never be stale: a new event of the hospital, a
rebuild, anything that writes a fact, and the next query computes afresh. The region's
version is the sum of every hospital's, which rises whenever any of them does.

The gauge refresh, which computes every scope's all-time figures anyway, renders those
answers into the cache too, so the common question (a hospital or department, no period)
is a lookup. Answers are kept as their JSON bytes: a few kilobytes each, and nothing the
garbage collector has to walk. The cache is bounded in bytes and evicts the least recently
used answer first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from datetime import date
from threading import Lock

from prometheus_client import Counter, Gauge

# (hospital, department, from, to): None where the scope or period has none.
Key = tuple[str | None, str | None, date | None, date | None]

LOOKUPS = Counter(
    "post_analytics_answer_lookups_total",
    "RE-AIM answers asked of the answer cache, by result (hit: served as kept; miss: computed).",
    ["result"],
    registry=None,  # registered when the service starts (gauges.export)
)
CACHED_BYTES = Gauge(
    "post_analytics_answer_cache_bytes",
    "Bytes of rendered RE-AIM answers kept in memory.",
    registry=None,
)

DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Entry:
    version: int
    body: bytes


class AnswerCache:
    """Answers by scope and period, each valid at one version. Thread-safe: the gauge refresh
    fills it from a worker thread while requests read it on the event loop."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._lock = Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key, version: int) -> bytes | None:
        """The answer kept for `key` if it was computed at `version`, else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.version != version:
                LOOKUPS.labels("miss").inc()
                return None
            self._entries.move_to_end(key)
        LOOKUPS.labels("hit").inc()
        return entry.body

    def put(self, key: Key, version: int, body: bytes) -> None:
        """Keep an answer computed at `version`; an answer of a newer version is never
        replaced by an older one (a slow refresh finishing after a query)."""
        if len(body) > self.max_bytes:
            return
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                if old.version > version:
                    return
                self.bytes -= len(old.body)
            self._entries[key] = Entry(version, body)
            self._entries.move_to_end(key)
            self.bytes += len(body)
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= len(evicted.body)
        CACHED_BYTES.set(self.bytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
        CACHED_BYTES.set(0)


_CACHES: dict[str, AnswerCache] = {}


def cache_for(schema: str) -> AnswerCache:
    """The cache of one analytics service (its schema: tests run several in one process)."""
    return _CACHES.setdefault(schema, AnswerCache())
