"""The node agent's health endpoint, as istio-cni's: ``:8000``, ``/readyz`` and ``/healthz``.

* ``/readyz``: 200 once the agent can enroll pods (:meth:`NodeAgent.ready`:
  its sockets listen, it has listed what it follows and reconciled the pods
  recorded on the node), 503 with the reason before; the DaemonSet's
  readiness probe.
* ``/healthz``: 200 while the process serves at all (istio-cni's liveness
  endpoint; its chart, and ours, probe readiness only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

log = logging.getLogger("ztunnel.nodeagent")
DEFAULT_ADDRESS = ("0.0.0.0", 8000)  # istio-cni's readiness port
READY_PATH = "/readyz"
LIVE_PATH = "/healthz"


class HealthServer:
    def __init__(self, ready: Callable[[], tuple[bool, str]]) -> None:
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] | None = None

    async def _readyz(self, _: web.Request) -> web.Response:
        ready, why = self._ready()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one: :attr:`bound` says which)."""
        app = web.Application()
        app.add_routes([web.get(READY_PATH, self._readyz), web.get(LIVE_PATH, self._healthz)])
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        self._runner = runner
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await self.close()
            raise
        sockets = getattr(site._server, "sockets", None) or []
        self.bound = (host, sockets[0].getsockname()[1] if sockets else port)
        log.info("node agent: health on %s:%d (%s, %s)", *self.bound, READY_PATH, LIVE_PATH)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
