"""ztunnel's three HTTP servers, as Istio's ztunnel has them.

* admin, ``127.0.0.1:15000`` (the node's loopback only): ``GET /config_dump``,
  ``GET /connections``, ``GET /logging`` (the level) and ``/logging?level=LEVEL``
  (GET or POST: sets it),
  ``POST /quitquitquit`` (a graceful stop);
* metrics, ``:15020``: ``/metrics`` and ``/stats/prometheus``, Prometheus text;
* readiness, ``:15021``: ``/healthz/ready``, 200 once the xDS feed is synced
  and the node agent's ZDS snapshot is taken, 503 with the reason before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ztunnel.admin.dump import config_dump

if TYPE_CHECKING:
    from ztunnel.runtime import Ztunnel

log = logging.getLogger("ztunnel.admin")
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
Address = tuple[str, int]


def _level_name(level: int) -> str:
    return logging.getLevelName(level).lower()


class AdminServers:
    def __init__(
        self,
        ztunnel: Ztunnel,
        *,
        node: str = "",
        xds_address: str = "",
        quit: Callable[[], None] = lambda: None,
    ) -> None:
        self.ztunnel = ztunnel
        self.node = node
        self.xds_address = xds_address
        self.quit = quit
        self._runners: list[web.AppRunner] = []
        self.bound: dict[str, Address] = {}

    # -- handlers --------------------------------------------------------------------------

    async def _config_dump(self, _: web.Request) -> web.Response:
        doc = config_dump(self.ztunnel, node=self.node, xds_address=self.xds_address)
        return web.json_response(doc, dumps=lambda d: json.dumps(d, indent=2))

    async def _connections(self, _: web.Request) -> web.Response:
        live = sorted(self.ztunnel.telemetry.live, key=lambda c: c.started)
        return web.json_response({"connections": [c.as_dict() for c in live]})

    async def _get_logging(self, request: web.Request) -> web.Response:
        if "level" in request.query:  # GET /logging?level=debug sets it too, as Envoy's
            return await self._set_logging(request)
        level = _level_name(logging.getLogger().getEffectiveLevel())
        return web.Response(text=f"current log level is {level}\n")

    async def _set_logging(self, request: web.Request) -> web.Response:
        wanted = request.query.get("level", "").lower()
        if wanted not in LEVELS:
            return web.Response(
                status=400,
                text=f"unknown level {wanted!r}; use one of {', '.join(sorted(LEVELS))}\n",
            )
        logging.getLogger().setLevel(LEVELS[wanted])
        log.warning("admin: log level set to %s", wanted)
        return web.Response(text=f"current log level is {_level_name(LEVELS[wanted])}\n")

    async def _quit(self, _: web.Request) -> web.Response:
        log.warning("admin: /quitquitquit: stopping")
        self.quit()
        return web.Response(text="OK\n")

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.ztunnel.telemetry.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _ready(self, _: web.Request) -> web.Response:
        ready, why = self.ztunnel.ready()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(
        self,
        *,
        admin: Address | None = ("127.0.0.1", 15000),
        metrics: Address | None = ("0.0.0.0", 15020),
        readiness: Address | None = ("0.0.0.0", 15021),
    ) -> None:
        """Listen; a None address leaves that server off. Port 0 picks a free one
        (:attr:`bound` says which)."""
        apps: list[tuple[str, Address | None, list[web.RouteDef]]] = [
            (
                "admin",
                admin,
                [
                    web.get("/config_dump", self._config_dump),
                    web.get("/connections", self._connections),
                    web.get("/logging", self._get_logging),
                    web.post("/logging", self._set_logging),
                    web.post("/quitquitquit", self._quit),
                ],
            ),
            (
                "metrics",
                metrics,
                [web.get("/metrics", self._metrics), web.get("/stats/prometheus", self._metrics)],
            ),
            ("readiness", readiness, [web.get("/healthz/ready", self._ready)]),
        ]
        try:
            for name, address, routes in apps:
                if address is None:
                    continue
                app = web.Application()
                app.add_routes(routes)
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await runner.setup()
                self._runners.append(runner)
                site = web.TCPSite(runner, address[0], address[1], reuse_address=True)
                await site.start()
                sockets = [s.getsockname() for s in getattr(site._server, "sockets", [])]
                self.bound[name] = (address[0], sockets[0][1] if sockets else address[1])
        except BaseException:
            await self.close()
            raise
        log.info("ztunnel: %s", ", ".join(f"{k} on {h}:{p}" for k, (h, p) in self.bound.items()))

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
