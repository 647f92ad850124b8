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

import asyncio
import functools
import json
import logging
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from waypoint.config.dump import config_dump
from waypoint.http.h1server import Http1Server, ServerExchange
from waypoint.http.messages import ResponseHead

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
log = logging.getLogger(__name__)


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


Reply = tuple[int, str, bytes]  # status, content type, body
Query = dict[str, str]
TEXT, JSON = "text/plain; charset=utf-8", "application/json"


class AdminServers:
    """The three listeners, served by the waypoint's own HTTP/1.1 codec.

    Not aiohttp: importing it cost the waypoint 11 MB of its ~90 MB resident
    (``python -m bench.waypoint_bench`` measures its peak RSS beside Envoy's),
    for three small GET endpoints the codec already serves."""

    def __init__(self, runtime: WaypointRuntime, quit: Callable[[], None] = lambda: None) -> None:
        self.runtime = runtime
        self.quit = quit
        self._servers: list[asyncio.Server] = []
        self.bound: dict[str, Address] = {}

    def _config_dump(self, query: Query) -> Reply:
        rt = self.runtime
        doc = config_dump(
            rt.config, node_id=rt.node_id, metadata=rt.metadata, include_eds="include_eds" in query
        )
        return 200, JSON, json.dumps(doc, indent=1).encode()

    def _clusters(self, query: Query) -> Reply:
        if query.get("format") == "json":
            return 200, JSON, json.dumps(clusters_json(self.runtime)).encode()
        return 200, TEXT, clusters_text(self.runtime).encode()

    def _logging(self, query: Query) -> Reply:
        level = query.get("level")
        root = logging.getLogger()
        if level is not None:
            if level.lower() not in LEVELS:
                return 400, TEXT, f"unknown level {level!r}; use {', '.join(LEVELS)}\n".encode()
            root.setLevel(LEVELS[level.lower()])
        text = f"active loggers:\n  all: {logging.getLevelName(root.level).lower()}\n"
        return 200, TEXT, text.encode()

    def _quit(self, _: Query) -> Reply:
        self.quit()
        return 200, TEXT, b"OK\n"

    def _metrics(self, _: Query) -> Reply:
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.runtime.telemetry.registry)

    def _ready(self, _: Query) -> Reply:
        ok, why = self.runtime.ready()
        return (200 if ok else 503), TEXT, (("LIVE" if ok else why) + "\n").encode()

    def tables(self) -> dict[str, dict[str, tuple[frozenset[str], Callable[[Query], Reply]]]]:
        """Each listener's paths: the methods they take and their handler."""
        get, post = frozenset({"GET", "HEAD"}), frozenset({"POST"})
        any_: frozenset[str] = frozenset()
        return {
            "admin": {
                "/config_dump": (get, self._config_dump),
                "/clusters": (get, self._clusters),
                "/stats/prometheus": (get, self._metrics),
                "/logging": (any_, self._logging),
                "/quitquitquit": (post, self._quit),
                "/ready": (get, self._ready),
            },
            "metrics": {
                "/stats/prometheus": (get, self._metrics),
                "/metrics": (get, self._metrics),
            },
            "readiness": {"/healthz/ready": (get, self._ready)},
        }

    @staticmethod
    def _serve(
        table: dict[str, tuple[frozenset[str], Callable[[Query], Reply]]], exchange: ServerExchange
    ) -> None:
        head = exchange.head
        path, _, raw_query = head.target.partition("?")
        entry = table.get(path)
        if entry is None:
            status, ctype, body = 404, TEXT, f"no such path {path!r}\n".encode()
        elif entry[0] and head.method not in entry[0]:
            allowed = ", ".join(sorted(entry[0]))
            status, ctype, body = 405, TEXT, f"{path} takes {allowed}\n".encode()
        else:
            query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
            try:
                status, ctype, body = entry[1](query)
            except Exception:
                log.exception("waypoint admin: %s %s failed", head.method, head.target)
                status, ctype, body = 500, TEXT, b"internal error\n"
        headers = [("content-type", ctype), ("content-length", str(len(body)))]
        exchange.respond(ResponseHead(status=status, headers=headers), end=False)
        exchange.write(body, end=True)

    async def start(
        self, *, admin: Address | None, metrics: Address | None, readiness: Address | None
    ) -> None:
        loop = asyncio.get_running_loop()
        tables = self.tables()
        for name, address in (("admin", admin), ("metrics", metrics), ("readiness", readiness)):
            if address is None:
                continue
            factory = functools.partial(Http1Server, functools.partial(self._serve, tables[name]))
            server = await loop.create_server(factory, address[0], address[1], reuse_address=True)
            self._servers.append(server)
            self.bound[name] = server.sockets[0].getsockname()[:2] if server.sockets else address

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
