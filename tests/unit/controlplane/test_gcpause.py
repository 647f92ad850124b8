"""meshd's collector policy: freeze after updates, collect fully only between them."""

from __future__ import annotations

import asyncio
import gc
import weakref

from controlplane.gcpause import QuietCollector


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_frozen_cycles_wait_for_the_quiet_collection_and_are_then_freed() -> None:
    async def body() -> None:
        collector = QuietCollector(quiet_s=0.2)
        try:
            cycle = Cycle()
            gone = asyncio.Event()
            weakref.finalize(cycle, gone.set)
            del cycle
            collector.after_update()
            assert gc.get_freeze_count() > 0
            gc.collect()  # a collection mid-update scans none of the frozen objects
            assert not gone.is_set()
            await asyncio.wait_for(gone.wait(), 5)  # freed by the quiet collection
            assert collector.collections == 1
            assert collector.status()["fullCollections"] == 1
        finally:
            collector.close()
        assert gc.get_freeze_count() == 0

    asyncio.run(body())


def test_a_steady_stream_of_updates_still_gets_collected() -> None:
    async def body() -> None:
        collector = QuietCollector(quiet_s=60, max_updates=5)
        try:
            for _ in range(4):
                collector.after_update()
            assert collector.collections == 0
            collector.after_update()
            assert collector.collections == 1
            assert gc.get_freeze_count() > 0  # frozen again after collecting
        finally:
            collector.close()

    asyncio.run(body())
