"""Keeping Python's garbage collector from pausing meshd mid-update.

meshd holds a large, long-lived object graph (10,000 workloads, their
packed entries, every subscriber's view). CPython's full collections scan
all of it: at that scale each took 100-180 ms, and they fired in the middle
of updates, so they *were* the p99 of change propagation.

After each publication :class:`QuietCollector` moves everything alive into
the permanent generation (:func:`gc.freeze`): later collections scan only
what is newer. Frozen objects are still freed by reference counting; only
garbage *cycles* among them wait, until meshd has been quiet for
``quiet_s`` (no update) or ``max_updates`` updates have gone by since the
last full collection, whichever comes first. Then one full collection runs,
between updates, and is timed for the status document. (Counting the
frozen objects walks all of them, so it is done for the status only.)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger("meshd")


class QuietCollector:
    """Freeze after updates; collect fully only when quiet (or when garbage may pile up)."""

    def __init__(self, *, quiet_s: float = 30.0, max_updates: int = 1000) -> None:
        self.quiet_s = quiet_s
        self.max_updates = max_updates
        self.collections = 0
        self.last_collection_ms = 0.0
        self._updates = 0
        self._handle: asyncio.TimerHandle | None = None

    def after_update(self) -> None:
        """Call after each publication, on the event loop."""
        gc.freeze()
        self._updates += 1
        if self._updates >= self.max_updates:
            self.collect()
            return
        if self._handle is not None:
            self._handle.cancel()
        self._handle = asyncio.get_running_loop().call_later(self.quiet_s, self.collect)

    def collect(self) -> None:
        """One full collection of everything, then freeze again."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        started = time.perf_counter()
        gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        self._updates = 0
        self.collections += 1
        self.last_collection_ms = (time.perf_counter() - started) * 1000
        log.debug(
            "meshd: full garbage collection: %d unreachable objects, %.1f ms",
            found,
            self.last_collection_ms,
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        gc.unfreeze()

    def status(self) -> dict[str, object]:
        return {
            "frozenObjects": gc.get_freeze_count(),
            "fullCollections": self.collections,
            "lastFullCollectionMs": round(self.last_collection_ms, 1),
        }
