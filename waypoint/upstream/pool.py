"""Connections to endpoints, and the limits on them: the I/O side of a cluster.

A :class:`ClusterRuntime` owns one cluster's hosts (their counters survive
config updates that keep them), its load balancer, its circuit-breaker
counters and one :class:`EndpointPool` of kept-alive HTTP/1.1 connections
per endpoint. Acquiring a connection takes an idle one, opens a new one if
the cluster is under ``max_connections``, or waits (a *pending* request) if
under ``max_pending_requests``; past that the request overflows (503 ``UO``).
Connections open through a :class:`Connector`: HBONE to the endpoint's
ztunnel, or plain TCP to endpoints outside the mesh.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, TypeVar

from waypoint.config.model import Cluster, Endpoint, LoadAssignment
from waypoint.http.exchange import Upstream
from waypoint.http.h1client import Http1Client
from waypoint.http.h2client import H2ClientConnection
from waypoint.upstream import outlier
from waypoint.upstream.lb import Balancer, Host, new_balancer

log = logging.getLogger("waypoint.upstream")


class ConnectFailed(Exception):
    """The endpoint could not be reached; ``reason`` in Envoy's words, ``detail`` why."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class Overflow(Exception):
    """A circuit breaker is at its limit."""


P = TypeVar("P", bound=asyncio.Protocol)


class Connector(Protocol):
    async def open(self, endpoint: Endpoint, timeout_s: float, factory: Callable[[], P]) -> P:
        """A connected protocol for ``endpoint``, or :class:`ConnectFailed`."""
        ...


class TcpConnector:
    """Plain TCP to the endpoint's address (endpoints outside the mesh; tests)."""

    async def open(self, endpoint: Endpoint, timeout_s: float, factory: Callable[[], P]) -> P:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s or None):
                _, client = await loop.create_connection(factory, endpoint.ip, endpoint.port)
        except TimeoutError as e:
            raise ConnectFailed("connection timeout", f"{endpoint.address}") from e
        except OSError as e:
            raise ConnectFailed(
                "remote connection failure", f"delayed connect error: {e.strerror or e}"
            ) from e
        return client


class EndpointPool:
    """Idle and busy connections to one endpoint."""

    def __init__(self, runtime: ClusterRuntime, host: Host) -> None:
        self.runtime = runtime
        self.host = host
        self.idle: deque[Http1Client] = deque()
        self.busy: set[Http1Client] = set()
        self.h2: list[H2ClientConnection] = []
        self.connecting = 0
        self._idle_timers: dict[Http1Client, asyncio.TimerHandle] = {}
        self._h2_timers: dict[H2ClientConnection, asyncio.TimerHandle] = {}

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.h2)

    @property
    def empty(self) -> bool:
        return not self.idle and not self.busy and not self.connecting and not self.h2

    def h2_stream(self) -> Upstream | None:
        for conn in self.h2:
            if conn.usable:
                return conn.stream()
        return None

    def h2_lost(self, conn: H2ClientConnection) -> None:
        if conn in self.h2:
            self.h2.remove(conn)
            timer = self._h2_timers.pop(conn, None)
            if timer is not None:
                timer.cancel()
            self.runtime.connections -= 1
            self.runtime.wake()

    def h2_idle(self, conn: H2ClientConnection) -> None:
        self.runtime.wake()
        if conn.goaway:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        old = self._h2_timers.pop(conn, None)
        if old is not None:
            old.cancel()

        def expire() -> None:
            self._h2_timers.pop(conn, None)
            if not conn.streams:
                conn.close()

        self._h2_timers[conn] = loop.call_later(self.runtime.cluster.idle_timeout_s, expire)

    def take_idle(self) -> Http1Client | None:
        while self.idle:
            client = self.idle.popleft()
            timer = self._idle_timers.pop(client, None)
            if timer is not None:
                timer.cancel()
            if not client.lost:
                self.busy.add(client)
                return client
            self.runtime.connections -= 1
        return None

    def release(self, client: Http1Client, reusable: bool) -> None:
        if client not in self.busy and client not in self.idle:
            return  # released already (a response completed, then the connection went)
        self.busy.discard(client)
        limit = self.runtime.cluster.max_requests_per_connection
        if reusable and not client.lost and not (limit and client.requests >= limit):
            self.idle.append(client)
            loop = asyncio.get_running_loop()
            self._idle_timers[client] = loop.call_later(
                self.runtime.cluster.idle_timeout_s, self._expire, client
            )
        else:
            if client in self.idle:
                self.idle.remove(client)
            self.runtime.connections -= 1
            if not client.lost:
                client.close()
        self.runtime.wake()

    def drop_one(self) -> None:
        client = self.idle.popleft()
        timer = self._idle_timers.pop(client, None)
        if timer is not None:
            timer.cancel()
        self.runtime.connections -= 1
        client.close()

    def _expire(self, client: Http1Client) -> None:
        self._idle_timers.pop(client, None)
        if client in self.idle:
            self.idle.remove(client)
            self.runtime.connections -= 1
            client.close()

    def close(self) -> None:
        for conn in list(self.h2):
            conn.close()
        for timer in [*self._idle_timers.values(), *self._h2_timers.values()]:
            timer.cancel()
        self._idle_timers.clear()
        for client in list(self.idle):
            client.close()
        self.runtime.connections -= len(self.idle)
        self.idle.clear()


class ClusterRuntime:
    """One cluster: config, hosts, balancer, breaker counters, pools."""

    def __init__(self, cluster: Cluster, connector: Connector, rng: random.Random) -> None:
        self.cluster = cluster
        self.connector = connector
        self.rng = rng
        self.balancer: Balancer = new_balancer(cluster, (), rng)
        self.pools: dict[str, EndpointPool] = {}
        self.connections = 0
        self.pending = 0
        self.requests = 0
        self.retries = 0
        self.overflows = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._outlier_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------ configuration

    def update(self, cluster: Cluster, assignment: LoadAssignment | None) -> None:
        """New settings or endpoints: hosts that stay keep their counters and connections."""
        self.cluster = cluster
        endpoints = assignment.endpoints if assignment is not None else ()
        old = {h.address: h for h in self.balancer.hosts}
        hosts = []
        for e in endpoints:
            host = old.pop(e.address, None)
            if host is None:
                host = Host(endpoint=e)
            else:
                host.endpoint = e
            hosts.append(host)
        for gone in old.values():
            pool = self.pools.pop(gone.address, None)
            if pool is not None:
                pool.close()
        rr = self.balancer.rr_index
        self.balancer = Balancer(cluster=cluster, hosts=hosts, rr_index=rr)
        self._schedule_outlier()

    def _schedule_outlier(self) -> None:
        if self._outlier_timer is not None:
            self._outlier_timer.cancel()
            self._outlier_timer = None
        config = self.cluster.outlier
        if config is not None:
            loop = asyncio.get_running_loop()
            self._outlier_timer = loop.call_later(config.interval_s, self._outlier_tick)

    def _outlier_tick(self) -> None:
        config = self.cluster.outlier
        if config is None:
            return
        for host in outlier.tick(config, self.balancer.hosts, asyncio.get_running_loop().time()):
            log.info("outlier: %s back in cluster %s", host.address, self.cluster.name)
        self._schedule_outlier()

    def record(self, host: Host, status: int) -> None:
        """An attempt's outcome (0: connect failure or reset): counted, and judged by
        outlier detection when the cluster has it."""
        host.total += 1
        if status == 0 or status >= 500:
            host.failures += 1
        config = self.cluster.outlier
        if config is None:
            return
        now = asyncio.get_running_loop().time()
        if outlier.record(config, self.balancer.hosts, host, status, now):
            log.warning(
                "outlier: ejected %s from cluster %s for %.0fs (%d failures in a row)",
                host.address,
                self.cluster.name,
                host.ejected_until - now,
                config.consecutive_5xx,
            )

    def close(self) -> None:
        if self._outlier_timer is not None:
            self._outlier_timer.cancel()
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()

    # ------------------------------------------------------------ connections

    def wake(self) -> None:
        """Capacity was freed: every pending request looks again."""
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def pool(self, host: Host) -> EndpointPool:
        pool = self.pools.get(host.address)
        if pool is None:
            pool = self.pools[host.address] = EndpointPool(self, host)
        return pool

    async def acquire(self, host: Host) -> Upstream:
        """A connection to ``host``: idle, new, or after waiting as a pending request
        (for an HTTP/2 cluster, a stream on a shared connection)."""
        pool = self.pool(host)
        if self.cluster.http2:
            return await self._acquire_h2(pool)
        client = self._try(pool)
        if client is not None:
            return client
        if self.connections < self.cluster.thresholds.max_connections or pool.empty:
            # Envoy's rule: an endpoint's pool may always open its first connection,
            # whatever the cluster's limit, so that it can make progress.
            return await self._open(pool)
        if self.pending >= self.cluster.thresholds.max_pending_requests:
            self.overflows += 1
            raise Overflow("pending requests")
        self.pending += 1
        try:
            while True:
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter
                client = self._try(pool)
                if client is not None:
                    return client
                if self.connections < self.cluster.thresholds.max_connections:
                    return await self._open(pool)
        finally:
            self.pending -= 1

    async def _acquire_h2(self, pool: EndpointPool) -> Upstream:
        stream = pool.h2_stream()
        if stream is not None:
            return stream
        waited = False
        try:
            while True:
                stream = pool.h2_stream()
                if stream is not None:
                    return stream
                if self.connections < self.cluster.thresholds.max_connections or pool.empty:
                    conn = await self._open_h2(pool)
                    return conn.stream()
                if not waited:
                    if self.pending >= self.cluster.thresholds.max_pending_requests:
                        self.overflows += 1
                        raise Overflow("pending requests")
                    self.pending += 1
                    waited = True
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter
        finally:
            if waited:
                self.pending -= 1

    async def _open_h2(self, pool: EndpointPool) -> H2ClientConnection:
        self.connections += 1
        pool.connecting += 1

        def factory() -> H2ClientConnection:
            return H2ClientConnection(on_idle=pool.h2_idle, on_lost=pool.h2_lost)

        try:
            conn = await self.connector.open(
                pool.host.endpoint, self.cluster.connect_timeout_s, factory
            )
        except BaseException:
            self.connections -= 1
            self.wake()
            raise
        finally:
            pool.connecting -= 1
        pool.h2.append(conn)
        return conn

    def _try(self, pool: EndpointPool) -> Http1Client | None:
        """An idle connection of ``pool``; at the connection limit, an idle one of another
        endpoint is closed to make room, so a busy endpoint never starves behind idle ones."""
        client = pool.take_idle()
        if client is not None:
            return client
        if self.connections >= self.cluster.thresholds.max_connections:
            for other in self.pools.values():
                if other is not pool and other.idle:
                    other.drop_one()
                    break
        return None

    async def _open(self, pool: EndpointPool) -> Http1Client:
        self.connections += 1
        client: Http1Client | None = None

        def factory() -> Http1Client:
            return Http1Client(release=pool.release)

        pool.connecting += 1
        try:
            client = await self.connector.open(
                pool.host.endpoint, self.cluster.connect_timeout_s, factory
            )
        except BaseException:
            self.connections -= 1
            self.wake()
            raise
        finally:
            pool.connecting -= 1
        pool.busy.add(client)
        return client

    def hosts(self) -> Iterable[Host]:
        return self.balancer.hosts


class Upstreams:
    """Every cluster's runtime, rebuilt from each config snapshot."""

    def __init__(self, connector: Connector, rng: random.Random | None = None) -> None:
        self.connector = connector
        self.rng = rng or random.Random()
        self.clusters: dict[str, ClusterRuntime] = {}

    def update(
        self, clusters: Mapping[str, Cluster], assignments: Mapping[str, LoadAssignment]
    ) -> None:
        wanted = dict(clusters)
        for name in list(self.clusters):
            if name not in wanted:
                self.clusters.pop(name).close()
        for name, cluster in wanted.items():
            runtime = self.clusters.get(name)
            if runtime is None:
                runtime = self.clusters[name] = ClusterRuntime(cluster, self.connector, self.rng)
            runtime.update(cluster, assignments.get(name))

    def close(self) -> None:
        for runtime in self.clusters.values():
            runtime.close()
        self.clusters.clear()
