"""The waypoint's HTTP servers, as an Istio waypoint (Envoy) has them.

* admin, ``127.0.0.1:15000``: ``/config_dump`` (Envoy's ``ConfigDump`` JSON;
  ``?include_eds`` adds the endpoints), ``/clusters`` (Envoy's text form:
  ``cluster::host::field::value``, with health flags and outlier ejections;
  ``?format=json``), ``/stats/prometheus``, ``/logging?level=``,
  ``POST /quitquitquit``, ``/ready``;
* metrics, ``:15020``: ``/stats/prometheus`` and ``/metrics``;
* readiness, ``:15021``: ``/healthz/ready``: 200 only once the waypoint has
  its certificate, meshd's first state and its listener; 503 with why before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from waypoint.config.dump import config_dump

if TYPE_CHECKING:
    from waypoint.runtime import WaypointRuntime

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
Address = tuple[str, int]


def clusters_text(runtime: WaypointRuntime) -> str:
    lines = []
    for name, rt in sorted(runtime.upstreams.clusters.items()):
        c = rt.cluster
        t = c.thresholds
        lines.append(f"{name}::default_priority::max_connections::{t.max_connections}")
        lines.append(f"{name}::default_priority::max_pending_requests::{t.max_pending_requests}")
        lines.append(f"{name}::default_priority::max_requests::{t.max_requests}")
        lines.append(f"{name}::default_priority::max_retries::{t.max_retries}")
        lines.append(f"{name}::outlier::ejections_active::{sum(h.ejected for h in rt.hosts())}")
        for host in rt.hosts():
            pool = rt.pools.get(host.address)
            flags = "healthy"
            if not host.endpoint.healthy:
                flags = "/failed_eds_health"
            if host.ejected:
                flags = (
                    "/failed_outlier_check"
                    if flags == "healthy"
                    else flags + "/failed_outlier_check"
                )
            base = f"{name}::{host.address}"
            lines += [
                f"{base}::cx_active::{pool.size if pool else 0}",
                f"{base}::rq_active::{host.active}",
                f"{base}::rq_total::{host.total}",
                f"{base}::rq_error::{host.failures}",
                f"{base}::health_flags::{flags}",
                f"{base}::hbone::{str(host.endpoint.hbone).lower()}",
            ]
    return "\n".join(lines) + "\n"


def clusters_json(runtime: WaypointRuntime) -> dict[str, Any]:
    out = []
    for name, rt in sorted(runtime.upstreams.clusters.items()):
        out.append(
            {
                "name": name,
                "host_statuses": [
                    {
                        "address": {
                            "socket_address": {
                                "address": h.endpoint.ip,
                                "port_value": h.endpoint.port,
                            }
                        },
                        "health_status": {
                            "eds_health_status": "HEALTHY" if h.endpoint.healthy else "UNHEALTHY",
                            "failed_outlier_check": h.ejected,
                        },
                        "stats": [
                            {"name": "rq_active", "value": h.active},
                            {"name": "rq_total", "value": h.total},
                            {"name": "rq_error", "value": h.failures},
                        ],
                    }
                    for h in rt.hosts()
                ],
            }
        )
    return {"cluster_statuses": out}


class AdminServers:
    def __init__(self, runtime: WaypointRuntime, quit: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.quit = quit
        self._runners: list[web.AppRunner] = []
        self.bound: dict[str, Address] = {}

    async def _config_dump(self, request: web.Request) -> web.Response:
        rt = self.runtime
        doc = config_dump(
            rt.config,
            node_id=rt.node_id,
            metadata=rt.metadata,
            include_eds="include_eds" in request.query,
        )
        return web.json_response(doc, dumps=lambda d: json.dumps(d, indent=1))

    async def _clusters(self, request: web.Request) -> web.Response:
        if request.query.get("format") == "json":
            return web.json_response(clusters_json(self.runtime))
        return web.Response(text=clusters_text(self.runtime))

    async def _logging(self, request: web.Request) -> web.Response:
        level = request.query.get("level")
        root = logging.getLogger()
        if level is not None:
            if level.lower() not in LEVELS:
                return web.Response(
                    status=400, text=f"unknown level {level!r}; use {', '.join(LEVELS)}\n"
                )
            root.setLevel(LEVELS[level.lower()])
        return web.Response(
            text=f"active loggers:\n  all: {logging.getLevelName(root.level).lower()}\n"
        )

    async def _quit(self, _: web.Request) -> web.Response:
        self.quit()
        return web.Response(text="OK\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.runtime.telemetry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, _: web.Request) -> web.Response:
        ok, why = self.runtime.ready()
        return web.Response(status=200 if ok else 503, text=("LIVE" if ok else why) + "\n")

    async def start(
        self, *, admin: Address | None, metrics: Address | None, readiness: Address | None
    ) -> None:
        apps: list[tuple[str, Address | None, web.Application]] = []
        a = web.Application()
        a.router.add_get("/config_dump", self._config_dump)
        a.router.add_get("/clusters", self._clusters)
        a.router.add_get("/stats/prometheus", self._metrics)
        a.router.add_route("*", "/logging", self._logging)
        a.router.add_post("/quitquitquit", self._quit)
        a.router.add_get("/ready", self._ready)
        apps.append(("admin", admin, a))
        m = web.Application()
        m.router.add_get("/stats/prometheus", self._metrics)
        m.router.add_get("/metrics", self._metrics)
        apps.append(("metrics", metrics, m))
        r = web.Application()
        r.router.add_get("/healthz/ready", self._ready)
        apps.append(("readiness", readiness, r))
        for name, address, app in apps:
            if address is None:
                continue
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, address[0], address[1], reuse_address=True)
            await site.start()
            self._runners.append(runner)
            server = site._server
            sockets = getattr(server, "sockets", None) or []
            self.bound[name] = sockets[0].getsockname()[:2] if sockets else address

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
