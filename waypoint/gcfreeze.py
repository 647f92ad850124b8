"""Keeping CPython's collector off the waypoint's long-lived objects.

A waypoint holds its config (the converted resources, routes, clusters),
its modules and its pools for as long as it runs. CPython's oldest-generation
collections scan all of that: under load each one paused the event loop for
40-50 ms in the middle of requests, and those pauses were the waypoint's p99
(``python -m bench.waypoint_bench``). After each config is applied,
:func:`freeze_after_config` moves everything alive into the permanent
generation (:func:`gc.freeze`), so later collections scan only what is
newer. Frozen objects are still freed by reference counting when a later
config replaces them; only reference cycles among them are never collected,
hence a freeze per applied config (rare), never per request. The first
freeze follows one full collection, at startup, before any traffic.
"""

from __future__ import annotations

import gc


class ConfigFreezer:
    """Call :meth:`applied` after each config is in place."""

    def __init__(self) -> None:
        self.freezes = 0

    def applied(self) -> None:
        if self.freezes == 0:
            gc.collect()
        gc.freeze()
        self.freezes += 1
