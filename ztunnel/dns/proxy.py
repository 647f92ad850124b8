"""The asyncio shell: UDP and TCP on the pod's 15053 sockets, upstreams through a factory."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from mesh import netio
from ztunnel.dns.decide import Action, Drop, Forward, Outcome, Reply, answer, is_answer_to
from ztunnel.dns.table import U16, Snapshot, SocketFactory, TableCache, domain_labels

log = logging.getLogger("ztunnel.dns")


# -- the asyncio shell ----------------------------------------------------------------------


async def _plain_socket(family: int, kind: int) -> socket.socket:
    return socket.socket(family, kind | socket.SOCK_CLOEXEC)


def upstreams_from_resolv_conf(
    path: str | Path = "/etc/resolv.conf", port: int = 53
) -> list[tuple[str, int]]:
    """The ``nameserver`` addresses of a resolv.conf, in order, with ``port``."""
    upstreams = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            ipaddress.ip_address(fields[1].split("%", 1)[0])  # fe80::1%eth0 is allowed
        except ValueError:
            log.info("dns: %s: ignoring nameserver %r: not an IP address", path, fields[1])
            continue
        upstreams.append((fields[1], port))
    return upstreams


class DnsProxy:
    """One pod's DNS proxy: serve :meth:`serve_udp` and :meth:`serve_tcp` on the pod's
    15053 sockets, each until cancelled.

    ``state`` returns the node's current snapshot; the names table follows it.
    ``socket_factory(family, type)`` makes the sockets to the upstreams (ztunnel
    makes them in the pod's namespace with its mark, so the capture rules let
    them out); by default, ordinary sockets.

    Counters: ``answered`` (from the mesh's names), ``forwarded`` (an upstream
    answer relayed), ``failed`` (no upstream answered: SERVFAIL) and ``refused``
    (FORMERR, NOTIMP, or dropped).
    """

    def __init__(
        self,
        *,
        state: Snapshot,
        pod_namespace: str,
        upstreams: Sequence[tuple[str, int]],
        cluster_domain: str = "cluster.local",
        timeout_s: float = 2.0,
        socket_factory: SocketFactory | None = None,
        tcp_idle_timeout_s: float = 5.0,
        max_tcp_connections: int = 64,
        max_tcp_pipelined: int = 16,
        max_udp_forwards: int = 256,
        tables: TableCache | None = None,
    ) -> None:
        domain_labels(cluster_domain)  # refuse a bad domain now, not on the first query
        if tables is not None and tables.cluster_domain != cluster_domain:
            raise ValueError(
                f"table cache is for {tables.cluster_domain!r}, not {cluster_domain!r}"
            )
        self._state = state
        self.pod_namespace = pod_namespace
        self.upstreams = tuple(upstreams)
        self.cluster_domain = cluster_domain
        self.timeout_s = timeout_s
        self._socket_factory = socket_factory or _plain_socket
        self.tcp_idle_timeout_s = tcp_idle_timeout_s
        self.max_tcp_connections = max_tcp_connections
        self.max_tcp_pipelined = max_tcp_pipelined
        self.max_udp_forwards = max_udp_forwards
        self.tables = tables or TableCache(cluster_domain)
        self.answered = self.forwarded = self.failed = self.refused = 0

    def decide(self, query: bytes, *, tcp: bool = False) -> Action:
        """:func:`answer` against the current snapshot."""
        try:
            table = self.tables.get(self._state())
            return answer(
                query, table, self.pod_namespace, cluster_domain=self.cluster_domain, tcp=tcp
            )
        except Exception as e:  # a bug here must cost one query, never the proxy
            log.exception("dns: cannot decide a query")
            return Drop(f"internal error: {e}")

    def _settle(self, action: Reply | Drop, peer: object) -> bytes | None:
        """Count and log a local decision; the bytes to send, if any."""
        if isinstance(action, Drop):
            self.refused += 1
            log.debug("dns: src=%s result=dropped reason=%s", peer, action.reason)
            return None
        if action.outcome is Outcome.ANSWERED:
            self.answered += 1
        else:
            self.refused += 1
        log.debug("dns: src=%s result=%s reason=%s", peer, action.outcome.value, action.reason)
        return action.wire

    async def _resolve(self, forward: Forward, peer: object, *, tcp: bool) -> bytes:
        """Ask the upstreams in turn; their answer under the client's id, or SERVFAIL."""
        exchange = self._exchange_tcp if tcp else self._exchange_udp
        for upstream in self.upstreams:
            upstream_id = secrets.randbits(16)  # not the client's: harder to spoof
            out = U16.pack(upstream_id) + forward.wire[2:]
            family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
            try:
                sock = await self._socket_factory(
                    family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
                )
            except OSError as e:
                log.warning("dns: cannot make a socket to upstream %s: %s", upstream, e)
                continue
            try:
                sock.setblocking(False)
                async with asyncio.timeout(self.timeout_s):
                    wire = await exchange(sock, upstream, out, forward.query, upstream_id)
            except TimeoutError:
                log.debug("dns: upstream %s: no answer within %ss", upstream, self.timeout_s)
                continue
            except OSError as e:
                log.debug("dns: upstream %s: %s", upstream, e)
                continue
            finally:
                sock.close()
            if wire is None:
                log.debug("dns: upstream %s: answered something else", upstream)
                continue
            self.forwarded += 1
            log.debug(
                "dns: src=%s result=forwarded via=%s reason=%s", peer, upstream, forward.reason
            )
            return U16.pack(forward.query.id) + wire[2:]
        self.failed += 1
        log.info(
            "dns: src=%s result=SERVFAIL reason=%s; no upstream of %s answered",
            peer,
            forward.reason,
            list(self.upstreams),
        )
        return forward.servfail

    @staticmethod
    async def _exchange_udp(
        sock: socket.socket,
        upstream: tuple[str, int],
        out: bytes,
        query: dns.message.Message,
        upstream_id: int,
    ) -> bytes | None:
        loop = asyncio.get_running_loop()
        await netio.connect(sock, upstream)  # a connected socket hears only the upstream
        await loop.sock_sendall(sock, out)
        while True:
            wire = await loop.sock_recv(sock, 65535)
            if is_answer_to(query, upstream_id, wire):
                return wire
            log.debug("dns: upstream %s: ignoring a datagram that answers nothing", upstream)

    @staticmethod
    async def _exchange_tcp(
        sock: socket.socket,
        upstream: tuple[str, int],
        out: bytes,
        query: dns.message.Message,
        upstream_id: int,
    ) -> bytes | None:
        loop = asyncio.get_running_loop()
        await netio.connect(sock, upstream)
        await loop.sock_sendall(sock, U16.pack(len(out)) + out)
        (length,) = U16.unpack(await _recv_exactly(loop, sock, 2))
        wire = await _recv_exactly(loop, sock, length)
        return wire if is_answer_to(query, upstream_id, wire) else None

    # -- UDP --------------------------------------------------------------------------------

    async def serve_udp(self, sock: socket.socket) -> None:
        """Answer the datagrams of ``sock`` (bound, non-blocking) until cancelled.
        ``sock`` stays open: the transport owns a duplicate of it."""
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[Exception | None] = loop.create_future()
        tasks: set[asyncio.Task[None]] = set()
        own = sock.dup()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UdpServer(self, tasks, lost), sock=own
            )
        except BaseException:
            own.close()
            raise
        try:
            error = await lost
            if error is not None:
                raise error
        finally:
            transport.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _datagram(
        self,
        transport: asyncio.DatagramTransport,
        data: bytes,
        peer: tuple[str, int],
        tasks: set[asyncio.Task[None]],
    ) -> None:
        action = self.decide(data)
        if not isinstance(action, Forward):
            wire = self._settle(action, peer)
            if wire is not None:
                transport.sendto(wire, peer)
            return
        if len(tasks) >= self.max_udp_forwards:
            self.refused += 1
            log.debug(
                "dns: src=%s result=dropped reason=%s; %d forwards already waiting",
                peer,
                action.reason,
                len(tasks),
            )
            return
        task = asyncio.ensure_future(self._forward_udp(transport, action, peer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _forward_udp(
        self, transport: asyncio.DatagramTransport, forward: Forward, peer: tuple[str, int]
    ) -> None:
        try:
            wire = await self._resolve(forward, peer, tcp=False)
        except Exception:
            log.exception("dns: forwarding for %s failed", peer)
            return
        if not transport.is_closing():
            transport.sendto(wire, peer)

    # -- TCP --------------------------------------------------------------------------------

    async def serve_tcp(self, listener: socket.socket) -> None:
        """Serve the connections ``listener`` (listening, non-blocking) accepts, until
        cancelled; at most ``max_tcp_connections`` at once (the rest wait in the
        backlog). ``listener`` stays open; accepted connections are closed."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.max_tcp_connections)
        connections: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            connections.discard(task)
            slots.release()

        try:
            while True:
                await slots.acquire()
                try:
                    conn, peer = await loop.sock_accept(listener)
                except OSError as e:
                    slots.release()
                    log.warning("dns: accept failed: %s", e)
                    await asyncio.sleep(0.1)
                    continue
                except BaseException:
                    slots.release()
                    raise
                task = asyncio.ensure_future(self._tcp_connection(conn, peer))
                connections.add(task)
                task.add_done_callback(done)
        finally:
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    async def _tcp_connection(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """Queries in, answers out (RFC 7766): pipelined, answered as each is ready,
        closed after ``tcp_idle_timeout_s`` without a query, once all are answered."""
        try:
            reader, writer = await asyncio.open_connection(sock=conn)
        except BaseException:
            conn.close()
            raise
        slots = asyncio.Semaphore(self.max_tcp_pipelined)
        queries: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.tcp_idle_timeout_s):
                        (length,) = U16.unpack(await reader.readexactly(2))
                        query = await reader.readexactly(length)
                except TimeoutError:
                    log.debug("dns: src=%s: TCP connection idle, closing", peer)
                    break
                except (asyncio.IncompleteReadError, OSError):
                    break
                await slots.acquire()
                task = asyncio.ensure_future(self._tcp_query(query, peer, writer, slots))
                queries.add(task)
                task.add_done_callback(queries.discard)
            await asyncio.gather(*queries, return_exceptions=True)
        finally:
            for task in queries:
                task.cancel()
            await asyncio.gather(*queries, return_exceptions=True)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _tcp_query(
        self,
        query: bytes,
        peer: tuple[str, int],
        writer: asyncio.StreamWriter,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            action = self.decide(query, tcp=True)
            if isinstance(action, Forward):
                wire: bytes | None = await self._resolve(action, peer, tcp=True)
            else:
                wire = self._settle(action, peer)
            if wire is not None and not writer.is_closing():
                writer.write(U16.pack(len(wire)) + wire)  # one write: answers never interleave
                await writer.drain()
        except OSError:
            pass  # the client went away; nothing to tell it
        except Exception:
            log.exception("dns: answering %s over TCP failed", peer)
        finally:
            slots.release()


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(
        self,
        proxy: DnsProxy,
        tasks: set[asyncio.Task[None]],
        lost: asyncio.Future[Exception | None],
    ) -> None:
        self.proxy = proxy
        self.tasks = tasks
        self.lost = lost
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.proxy._datagram(self.transport, data, addr, self.tasks)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for answers to clients that left: nothing to do.
        log.debug("dns: UDP error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionResetError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
