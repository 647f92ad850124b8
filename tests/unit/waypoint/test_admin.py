"""The waypoint's admin, metrics and readiness listeners, over real sockets."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from tests.support.l7world import CANARY, world
from tests.support.waypoint_harness import config_for, reviews_backends, waypoint, with_backends
from tests.unit.hbone.conftest import run
from tests.unit.waypoint.test_data_path import REVIEWS
from waypoint.admin import AdminServers
from waypoint.config.snapshot import WaypointConfig
from waypoint.telemetry import Telemetry
from waypoint.upstream.pool import Upstreams


@dataclass
class _Runtime:
    """What the admin reads of a WaypointRuntime."""

    config: WaypointConfig
    upstreams: Upstreams
    telemetry: Telemetry = field(default_factory=Telemetry)
    node_id: str = "waypoint~10.244.0.9~waypoint.shop~shop.svc.cluster.local"
    metadata: dict[str, Any] = field(default_factory=lambda: {"NAMESPACE": "shop"})
    is_ready: tuple[bool, str] = (False, "waiting for the first xDS state from meshd")

    def ready(self) -> tuple[bool, str]:
        return self.is_ready


async def _get(address: tuple[str, int], method: str, target: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_admin_metrics_and_readiness_answer_as_an_envoy_waypoints_do() -> None:
    async def body() -> dict[str, Any]:
        bs = await reviews_backends()
        config = config_for(with_backends(world(CANARY), bs))
        quits: list[bool] = []
        try:
            async with waypoint(config, REVIEWS) as wp:
                runtime = _Runtime(config, wp.upstreams)
                servers = AdminServers(runtime, quit=lambda: quits.append(True))  # type: ignore[arg-type]
                loopback = ("127.0.0.1", 0)
                await servers.start(admin=loopback, metrics=loopback, readiness=loopback)
                admin, metrics, ready = (
                    servers.bound[n] for n in ("admin", "metrics", "readiness")
                )
                try:
                    out: dict[str, Any] = {
                        "not ready": await _get(ready, "GET", "/healthz/ready"),
                    }
                    runtime.is_ready = (True, "ready")
                    out["ready"] = await _get(ready, "GET", "/healthz/ready")
                    out["dump"] = await _get(admin, "GET", "/config_dump?include_eds")
                    out["clusters"] = await _get(admin, "GET", "/clusters?format=json")
                    out["metrics"] = await _get(metrics, "GET", "/stats/prometheus")
                    out["bad level"] = await _get(admin, "POST", "/logging?level=loud")
                    out["quit by GET"] = await _get(admin, "GET", "/quitquitquit")
                    out["quit"] = await _get(admin, "POST", "/quitquitquit")
                    out["missing"] = await _get(metrics, "GET", "/config_dump")
                    out["quits"] = list(quits)
                    return out
                finally:
                    await servers.close()
        finally:
            for b in bs.values():
                await b.stop()

    out = run(body)
    assert out["not ready"] == (503, b"waiting for the first xDS state from meshd\n")
    assert out["ready"] == (200, b"LIVE\n")
    status, dump = out["dump"]
    kinds = [c["@type"].rsplit(".", 1)[-1] for c in json.loads(dump)["configs"]]
    assert status == 200 and "EndpointsConfigDump" in kinds and "ListenersConfigDump" in kinds
    status, clusters = out["clusters"]
    assert status == 200 and json.loads(clusters)["cluster_statuses"]
    status, metrics = out["metrics"]
    assert status == 200 and b"# TYPE istio_requests_total counter" in metrics
    assert out["bad level"][0] == 400 and b"unknown level 'loud'" in out["bad level"][1]
    assert out["quit by GET"][0] == 405  # Envoy's admin takes POST only, and so do we
    assert out["quit"] == (200, b"OK\n") and out["quits"] == [True]
    assert out["missing"][0] == 404  # the metrics listener serves metrics only
