"""The waypoint keeps CPython's cycle collector idle: requests leave no cycles, config is frozen.

Under load, collections of per-request cycles and full scans of the config were
the waypoint's p99 (``python -m bench.waypoint_bench``); these pin both fixes.
"""

from __future__ import annotations

import asyncio
import collections
import gc

from tests.support.l7world import CANARY, world
from tests.support.waypoint_harness import config_for, reviews_backends, waypoint, with_backends
from tests.unit.hbone.conftest import run
from tests.unit.waypoint.test_data_path import REVIEWS
from waypoint.gcfreeze import ConfigFreezer


async def _keepalive(address: tuple[str, int], n: int) -> None:
    reader, writer = await asyncio.open_connection(*address)
    try:
        for _ in range(n):
            writer.write(b"GET / HTTP/1.1\r\nhost: reviews.shop.svc.cluster.local:9080\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
    finally:
        writer.close()


def test_a_served_request_leaves_no_reference_cycle_behind() -> None:
    async def body() -> collections.Counter[str]:
        bs = await reviews_backends()
        config = config_for(with_backends(world(CANARY), bs))
        try:
            async with waypoint(config, REVIEWS) as wp:
                await _keepalive(wp.address, 5)  # pools and connections made
                gc.collect()
                gc.set_debug(gc.DEBUG_SAVEALL)
                try:
                    await _keepalive(wp.address, 50)
                    gc.collect()
                    return collections.Counter(type(o).__name__ for o in gc.garbage)
                finally:
                    gc.set_debug(0)
                    gc.garbage.clear()
        finally:
            for b in bs.values():
                await b.stop()

    garbage = run(body)
    # What one connection leaves (its codec and transport) may be a cycle; nothing a
    # request makes may be: 50 requests, not one of their states among the garbage.
    per_request = {"_Life", "_Attempt", "ServerExchange", "Body", "RequestHead", "ResponseHead"}
    assert not per_request & set(garbage), garbage


def test_the_config_is_frozen_out_of_the_collectors_way() -> None:
    freezer = ConfigFreezer()
    before = gc.get_freeze_count()
    try:
        freezer.applied()  # the first config: a full collection, then the freeze
        frozen = gc.get_freeze_count()
        assert frozen > before
        objs = [[i] for i in range(1000)]  # what the next config brings
        freezer.applied()
        assert gc.get_freeze_count() >= frozen + len(objs)
    finally:
        gc.unfreeze()
