"""The in-pod DNS proxy, over real UDP and TCP sockets on loopback, with a fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import cast

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest

from mesh.model import Port, Service
from mesh.xds import XdsState
from tests.unit.hbone.conftest import run
from tests.unit.ztunnel.conftest import index, service, workload
from ztunnel.dns import (
    DnsProxy,
    Drop,
    Forward,
    Reply,
    TableCache,
    answer,
    build_table,
    upstreams_from_resolv_conf,
)
from ztunnel.index import StateIndex

LOOPBACK = "127.0.0.1"
ECHO = service("echo", "10.96.0.20", namespace="server")
WEB = service("web", "10.96.0.30", namespace="client")
DUAL = replace(
    service("dual", "10.96.0.40", namespace="server"),
    addresses=(ipaddress.ip_address("10.96.0.40"), ipaddress.ip_address("fd00::40")),
)
V6ONLY = replace(
    service("six", "fd00::60", namespace="server"),
    addresses=(ipaddress.ip_address("fd00::60"),),
)
ECHO_FQDN = "echo.server.svc.cluster.local."
MESH = index(services=(ECHO, WEB, DUAL, V6ONLY))
UPSTREAM_ANSWER = "192.0.2.1"
_LEN = struct.Struct("!H")


# -- the fake upstream resolver -------------------------------------------------------------


class FakeResolver:
    """A resolver on loopback, UDP and TCP on one port, made with dnspython: ``A``
    192.0.2.1 for names under example.com., NXDOMAIN for the rest. ``silent``: it
    listens but never answers. It records what it was asked, and over which transport."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.asked: list[tuple[str, dns.message.Message]] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._udp is not None
        return LOOPBACK, int(self._udp.getsockname()[1])

    @property
    def names(self) -> list[str]:
        return [m.question[0].name.to_text() for _, m in self.asked]

    def respond(self, wire: bytes) -> bytes:
        query = dns.message.from_wire(wire)
        response = dns.message.make_response(query)
        question = query.question[0]
        if question.name.is_subdomain(dns.name.from_text("example.com.")):
            if question.rdtype == dns.rdatatype.A:
                response.answer.append(
                    dns.rrset.from_text(question.name, 60, "IN", "A", UPSTREAM_ANSWER)
                )
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response.to_wire()

    async def __aenter__(self) -> FakeResolver:
        self._udp, self._tcp = same_port_pair()
        if self.silent:
            return self
        loop = asyncio.get_running_loop()
        resolver = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                resolver.asked.append(("udp", dns.message.from_wire(data)))
                self.transport.sendto(resolver.respond(data), addr)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while True:
                    (length,) = _LEN.unpack(await reader.readexactly(2))
                    data = await reader.readexactly(length)
                    resolver.asked.append(("tcp", dns.message.from_wire(data)))
                    wire = resolver.respond(data)
                    writer.write(_LEN.pack(len(wire)) + wire)
                    await writer.drain()
            writer.close()

        self._transport, _ = await loop.create_datagram_endpoint(Udp, sock=self._udp)
        self._server = await asyncio.start_server(tcp, sock=self._tcp)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._transport is not None:
            self._transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()


def same_port_pair() -> tuple[socket.socket, socket.socket]:
    """A bound UDP socket and a listening TCP socket on the same loopback port."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((LOOPBACK, 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind((LOOPBACK, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise RuntimeError("no free port for both UDP and TCP")


def closed_port() -> tuple[str, int]:
    """An address where nothing listens (UDP gets ICMP unreachable, TCP a reset)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return LOOPBACK, int(s.getsockname()[1])


# -- the proxy under test, and a client -----------------------------------------------------


class Snapshots:
    """What ztunnel hands the proxy: a callable returning the node's current snapshot."""

    def __init__(self, current: StateIndex) -> None:
        self.current = current

    def __call__(self) -> StateIndex:
        return self.current


def proxy_for(
    upstreams: list[tuple[str, int]],
    state: StateIndex = MESH,
    *,
    timeout_s: float = 2.0,
    tcp_idle_timeout_s: float = 5.0,
    max_tcp_connections: int = 64,
) -> DnsProxy:
    """The proxy of a pod in namespace ``client``."""
    return DnsProxy(
        state=Snapshots(state),
        pod_namespace="client",
        upstreams=upstreams,
        timeout_s=timeout_s,
        tcp_idle_timeout_s=tcp_idle_timeout_s,
        max_tcp_connections=max_tcp_connections,
    )


@contextlib.asynccontextmanager
async def serving(proxy: DnsProxy) -> AsyncIterator[int]:
    """Run the proxy on a UDP and a TCP socket of one port, as ztunnel hands them over."""
    udp, tcp = same_port_pair()
    tasks = [
        asyncio.ensure_future(proxy.serve_udp(udp)),
        asyncio.ensure_future(proxy.serve_tcp(tcp)),
    ]
    try:
        await asyncio.sleep(0)
        yield int(udp.getsockname()[1])
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The proxy never closes the sockets it was given.
        assert udp.fileno() != -1 and tcp.fileno() != -1
        udp.close()
        tcp.close()


def query(name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.message.make_query(name, rdtype)


async def ask_udp_raw(port: int, wire: bytes, timeout_s: float = 3.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (LOOPBACK, port))
        await loop.sock_sendall(s, wire)
        try:
            async with asyncio.timeout(timeout_s):
                return await loop.sock_recv(s, 65535)
        except TimeoutError:
            return None


async def ask_udp(port: int, message: dns.message.Message) -> dns.message.Message:
    wire = await ask_udp_raw(port, message.to_wire())
    assert wire is not None, "no answer"
    return dns.message.from_wire(wire)


async def ask_tcp(port: int, *wires: bytes, expect: int | None = None) -> list[dns.message.Message]:
    """Send ``wires`` pipelined on one connection; ``expect`` answers (one a query by
    default), in arrival order."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(b"".join(_LEN.pack(len(w)) + w for w in wires))
        await writer.drain()
        answers = []
        for _ in range(len(wires) if expect is None else expect):
            (length,) = _LEN.unpack(await reader.readexactly(2))
            answers.append(dns.message.from_wire(await reader.readexactly(length)))
        return answers
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def addresses(response: dns.message.Message) -> list[str]:
    return [
        r.to_text()
        for rrset in response.answer
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
        for r in rrset
    ]


def authoritative(response: dns.message.Message) -> bool:
    return bool(response.flags & dns.flags.AA)


# -- answers from the mesh ------------------------------------------------------------------


def test_a_service_fqdn_is_answered_authoritatively_with_its_vip_for_30s() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            proxy = proxy_for([upstream.address])
            async with serving(proxy) as port:
                q = query("echo.server.svc.cluster.local.")
                r = await ask_udp(port, q)
                assert r.id == q.id and r.rcode() == dns.rcode.NOERROR
                assert authoritative(r) and r.flags & dns.flags.RA
                assert r.question == q.question
                [rrset] = r.answer
                assert rrset.name == dns.name.from_text("echo.server.svc.cluster.local.")
                assert (rrset.rdtype, rrset.ttl) == (dns.rdatatype.A, 30)
                assert addresses(r) == ["10.96.0.20"]
            assert upstream.asked == []
            assert (proxy.answered, proxy.forwarded, proxy.refused) == (1, 0, 0)

    run(body, timeout_s=10)


@pytest.mark.parametrize(
    ("asked", "cname", "vip"),
    [
        # What the resolver of a pod in `client` sends for `web`: its first search domain.
        ("web.client.svc.cluster.local.", None, "10.96.0.30"),
        ("web.", None, "10.96.0.30"),  # a bare name: the pod's own namespace
        # `echo.server` from a client pod: the pod's search suffix is taken off.
        ("echo.server.client.svc.cluster.local.", "echo.server.", "10.96.0.20"),
        ("echo.server.", None, "10.96.0.20"),
        ("echo.server.svc.", None, "10.96.0.20"),
        ("echo.server.svc.client.svc.cluster.local.", "echo.server.svc.", "10.96.0.20"),
        # A full name the resolver still tried with a search domain (ndots:5).
        (f"{ECHO_FQDN}client.svc.cluster.local.", ECHO_FQDN, "10.96.0.20"),
        (f"{ECHO_FQDN}cluster.local.", ECHO_FQDN, "10.96.0.20"),
    ],
)
def test_names_built_by_the_pods_search_list_are_answered(
    asked: str, cname: str | None, vip: str
) -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            async with serving(proxy_for([upstream.address])) as port:
                r = await ask_udp(port, query(asked))
            assert upstream.asked == []
        assert r.rcode() == dns.rcode.NOERROR and authoritative(r)
        assert addresses(r) == [vip]
        owner = dns.name.from_text(asked)
        if cname is not None:  # as Istio: a CNAME to the name without the search suffix
            alias, a = r.answer
            assert alias.rdtype == dns.rdatatype.CNAME and alias.name == owner
            assert [c.to_text() for c in alias] == [cname]
            owner = dns.name.from_text(cname)
        else:
            [a] = r.answer
        assert a.name == owner

    run(body, timeout_s=10)


def test_a_short_name_never_means_a_service_of_another_namespace() -> None:
    asked = [
        "echo.client.svc.cluster.local.",  # `echo` from a client pod; echo lives in server
        "echo.svc.cluster.local.",
        "echo.cluster.local.",
        "echo.",
    ]

    async def body() -> None:
        async with FakeResolver() as upstream:
            async with serving(proxy_for([upstream.address])) as port:
                for name in asked:
                    r = await ask_udp(port, query(name))
                    assert r.rcode() == dns.rcode.NXDOMAIN, name  # the upstream's word
                    assert not authoritative(r) and r.answer == []
            assert upstream.names == asked
            # Once client has an echo of its own, `echo` is that one.
            own = service("echo", "10.96.0.50", namespace="client")
            mesh = index(services=(ECHO, own))
            async with serving(proxy_for([upstream.address], mesh)) as port:
                for name in ("echo.client.svc.cluster.local.", "echo."):
                    assert addresses(await ask_udp(port, query(name))) == ["10.96.0.50"]
                r = await ask_udp(port, query("echo.server.svc.cluster.local."))
                assert addresses(r) == ["10.96.0.20"]

    run(body, timeout_s=10)


def test_aaaa_gives_ipv6_vips_and_a_known_name_without_one_gets_nodata() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            async with serving(proxy_for([upstream.address])) as port:
                r = await ask_udp(port, query("dual.server.svc.cluster.local.", "AAAA"))
                assert addresses(r) == ["fd00::40"] and r.answer[0].ttl == 30
                r = await ask_udp(port, query("dual.server.svc.cluster.local.", "A"))
                assert addresses(r) == ["10.96.0.40"]
                for name, rdtype in [
                    ("echo.server.svc.cluster.local.", "AAAA"),
                    ("echo.server.client.svc.cluster.local.", "AAAA"),  # no CNAME either
                    ("six.server.svc.cluster.local.", "A"),
                ]:
                    r = await ask_udp(port, query(name, rdtype))
                    assert r.rcode() == dns.rcode.NOERROR, name  # NODATA, not NXDOMAIN
                    assert authoritative(r) and r.answer == [], name
                r = await ask_udp(port, query("six.server.svc.cluster.local.", "AAAA"))
                assert addresses(r) == ["fd00::60"]
            assert upstream.asked == []

    run(body, timeout_s=10)


def test_names_are_matched_whatever_their_case_and_answered_as_asked() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            async with serving(proxy_for([upstream.address])) as port:
                q = query("EcHo.SeRvEr.SVC.Cluster.LOCAL.")
                r = await ask_udp(port, q)
                # dnspython compares names case-insensitively: compare the text.
                assert r.question[0].name.to_text() == "EcHo.SeRvEr.SVC.Cluster.LOCAL."
                assert r.answer[0].name.to_text() == "EcHo.SeRvEr.SVC.Cluster.LOCAL."
                assert addresses(r) == ["10.96.0.20"] and authoritative(r)
                r = await ask_udp(port, query("WEB."))
                assert addresses(r) == ["10.96.0.30"]
            assert upstream.asked == []

    run(body, timeout_s=10)


# -- forwarding -----------------------------------------------------------------------------


def test_other_names_and_types_go_upstream_over_udp_and_come_back_with_the_clients_id() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            proxy = proxy_for([upstream.address])
            async with serving(proxy) as port:
                q = query("www.example.com.")
                r = await ask_udp(port, q)
                assert r.id == q.id and r.question == q.question
                assert addresses(r) == [UPSTREAM_ANSWER] and r.answer[0].ttl == 60
                assert not authoritative(r)
                # A mesh name, but not a type the mesh answers: the upstream's, as Istio.
                r = await ask_udp(port, query("echo.server.svc.cluster.local.", "TXT"))
                assert r.rcode() == dns.rcode.NXDOMAIN
            assert [t for t, _ in upstream.asked] == ["udp", "udp"]
            assert upstream.names == ["www.example.com.", "echo.server.svc.cluster.local."]
            assert proxy.forwarded == 2 and proxy.answered == 0

    run(body, timeout_s=10)


def test_tcp_carries_several_pipelined_queries_and_forwards_over_tcp() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            proxy = proxy_for([upstream.address])
            async with serving(proxy) as port:
                asked = [
                    query("www.example.com."),
                    query("echo.server.svc.cluster.local."),
                    query("nowhere.test."),
                ]
                answers = await ask_tcp(port, *(q.to_wire() for q in asked))
            by_id = {r.id: r for r in answers}
            assert sorted(by_id) == sorted(q.id for q in asked)
            assert addresses(by_id[asked[0].id]) == [UPSTREAM_ANSWER]
            assert addresses(by_id[asked[1].id]) == ["10.96.0.20"]
            assert authoritative(by_id[asked[1].id])
            assert by_id[asked[2].id].rcode() == dns.rcode.NXDOMAIN
            assert [t for t, _ in upstream.asked] == ["tcp", "tcp"]
            assert (proxy.answered, proxy.forwarded) == (1, 2)

    run(body, timeout_s=10)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_an_upstream_that_does_not_answer_is_passed_over_for_the_next(transport: str) -> None:
    async def body() -> None:
        async with FakeResolver(silent=True) as mute, FakeResolver() as upstream:
            proxy = proxy_for([mute.address, closed_port(), upstream.address], timeout_s=0.3)
            async with serving(proxy) as port:
                q = query("www.example.com.")
                started = time.monotonic()
                if transport == "udp":
                    r = await ask_udp(port, q)
                else:
                    [r] = await ask_tcp(port, q.to_wire())
                elapsed = time.monotonic() - started
            assert r.id == q.id and addresses(r) == [UPSTREAM_ANSWER]
            assert 0.3 <= elapsed < 2.0  # one timeout for the mute one; the closed port fails fast
            assert [t for t, _ in upstream.asked] == [transport]

    run(body, timeout_s=10)


def test_without_an_upstream_answer_the_client_gets_servfail() -> None:
    async def body() -> None:
        async with FakeResolver(silent=True) as mute:
            for upstreams in ([mute.address], []):
                proxy = proxy_for(upstreams, timeout_s=0.2)
                async with serving(proxy) as port:
                    q = query("www.example.com.")
                    r = await ask_udp(port, q)
                    assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL
                    assert r.question == q.question
                    [r] = await ask_tcp(port, q.to_wire())
                    assert r.id == q.id and r.rcode() == dns.rcode.SERVFAIL
                assert proxy.failed == 2

    run(body, timeout_s=10)


# -- what is refused ------------------------------------------------------------------------


def two_questions() -> bytes:
    q = query("a.example.com.")
    name = dns.name.from_text("b.example.com.")
    q.find_rrset(q.question, name, dns.rdataclass.IN, dns.rdatatype.A, create=True)
    return q.to_wire()


def no_question() -> bytes:
    return dns.message.Message(id=4321).to_wire()


@pytest.mark.parametrize(
    "wire",
    [
        query("echo.server.svc.cluster.local.").to_wire()[:20],  # question cut short
        query("echo.server.svc.cluster.local.").to_wire() + b"junk",
        two_questions(),
        no_question(),
    ],
    ids=["truncated", "trailing-junk", "two-questions", "no-question"],
)
def test_a_malformed_query_gets_formerr_with_its_id(wire: bytes) -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            proxy = proxy_for([upstream.address])
            async with serving(proxy) as port:
                raw = await ask_udp_raw(port, wire)
                assert raw is not None
                r = dns.message.from_wire(raw)
                assert r.id == struct.unpack("!H", wire[:2])[0]
                assert r.rcode() == dns.rcode.FORMERR and r.flags & dns.flags.QR
                [r] = await ask_tcp(port, wire)
                assert r.rcode() == dns.rcode.FORMERR
            assert upstream.asked == [] and proxy.refused == 2

    run(body, timeout_s=10)


def test_an_opcode_other_than_query_gets_notimp() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            async with serving(proxy_for([upstream.address])) as port:
                update = dns.update.UpdateMessage("example.com.")
                update.add("www", 300, "A", "192.0.2.9")
                notify = query("example.com.", "SOA")
                notify.set_opcode(dns.opcode.NOTIFY)
                for sent in (update, notify):
                    r = await ask_udp(port, sent)
                    assert r.id == sent.id and r.rcode() == dns.rcode.NOTIMP
                    assert r.opcode() == sent.opcode()
            assert upstream.asked == []

    run(body, timeout_s=10)


def test_garbage_and_responses_are_dropped_and_the_proxy_keeps_answering() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            proxy = proxy_for([upstream.address])
            async with serving(proxy) as port:
                response = dns.message.make_response(query("echo.server.svc.cluster.local."))
                for junk in (b"\x00", b"\x12\x34\x01", b"\xff" * 11, response.to_wire()):
                    assert await ask_udp_raw(port, junk, timeout_s=0.2) is None
                r = await ask_udp(port, query("echo.server.svc.cluster.local."))
                assert addresses(r) == ["10.96.0.20"]
                # Over TCP the framing survives a garbage message: the next is answered.
                q = query("web.client.svc.cluster.local.")
                [r] = await ask_tcp(port, b"\x00\x01\x02", q.to_wire(), expect=1)
                assert r.id == q.id and addresses(r) == ["10.96.0.30"]
            assert proxy.refused == 5 and proxy.answered == 2

    run(body, timeout_s=10)


# -- the snapshot ---------------------------------------------------------------------------


def test_a_new_snapshot_is_picked_up_and_the_table_is_built_once_per_snapshot() -> None:
    async def body() -> None:
        async with FakeResolver() as upstream:
            snapshots = Snapshots(index(services=(ECHO,)))
            tables = TableCache()
            proxy = DnsProxy(
                state=snapshots,
                pod_namespace="client",
                upstreams=[upstream.address],
                tables=tables,
            )
            async with serving(proxy) as port:
                r = await ask_udp(port, query("web."))
                assert r.rcode() == dns.rcode.NXDOMAIN and not authoritative(r)
                snapshots.current = index(services=(ECHO, WEB))
                for _ in range(3):
                    assert addresses(await ask_udp(port, query("web."))) == ["10.96.0.30"]
                # The same snapshot again, in a new index: no rebuild.
                snapshots.current = StateIndex.build(snapshots.current.state)
                assert addresses(await ask_udp(port, query("web."))) == ["10.96.0.30"]
                snapshots.current = index(services=(ECHO,))
                r = await ask_udp(port, query("web."))
                assert r.rcode() == dns.rcode.NXDOMAIN
            assert upstream.names == ["web.", "web."]
            assert tables.builds == 3

    run(body, timeout_s=10)


# -- TCP connections ------------------------------------------------------------------------


def test_an_idle_tcp_connection_is_closed() -> None:
    async def body() -> None:
        proxy = proxy_for([], tcp_idle_timeout_s=0.2)
        async with serving(proxy) as port:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            started = time.monotonic()
            assert await reader.read(100) == b""
            assert time.monotonic() - started < 2
            writer.close()

    run(body, timeout_s=10)


def test_tcp_connections_beyond_the_limit_wait_for_a_free_slot() -> None:
    async def body() -> None:
        async with serving(proxy_for([], max_tcp_connections=1)) as port:
            _, first = await asyncio.open_connection(LOOPBACK, port)
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(ask_tcp(port, query(ECHO_FQDN).to_wire()))
            await asyncio.sleep(0.3)
            assert not second.done()  # the only slot is taken
            first.close()
            [r] = await asyncio.wait_for(second, 2)
            assert addresses(r) == ["10.96.0.20"]

    run(body, timeout_s=10)


# -- the pure core --------------------------------------------------------------------------


def test_a_headless_kubernetes_service_answers_with_its_endpoints_others_go_upstream() -> None:
    members = {"db/pg.db.svc.cluster.local": (Port(service_port=5432, target_port=5432),)}
    pods = (
        workload("pg-1", "10.244.0.7", namespace="db", services=members),
        workload("pg-0", "10.244.0.6", namespace="db", services=members),
        workload("other", "10.244.0.8", namespace="db"),
    )
    headless = replace(service("pg", "10.0.0.1", namespace="db"), addresses=())
    external = Service(name="ext", namespace="db", hostname="api.partner.test")
    table = build_table(index(pods, (headless, external)))
    [host] = table.get("PG.db.svc.cluster.local")
    assert host.v4 == ("10.244.0.6", "10.244.0.7")  # ordered by workload
    assert table.get("api.partner.test") == ()
    action = answer(query("api.partner.test.").to_wire(), table, "db")
    assert isinstance(action, Forward) and "not a mesh name" in action.reason


def test_a_hostname_in_two_namespaces_means_the_pods_own_and_wildcards_match() -> None:
    shared = [
        Service(
            name="wiki",
            namespace=ns,
            hostname="wiki.example.org",
            addresses=(ipaddress.ip_address(vip),),
        )
        for ns, vip in (("a", "240.240.0.1"), ("b", "240.240.0.2"))
    ]
    wildcard = Service(
        name="any",
        namespace="a",
        hostname="*.wiki.example.org",
        addresses=(ipaddress.ip_address("240.240.0.9"),),
    )
    table = build_table(
        XdsState(services=MappingProxyType({s.resource_name: s for s in [*shared, wildcard]}))
    )

    def resolved(name: str, namespace: str) -> list[str]:
        action = answer(query(name).to_wire(), table, namespace)
        assert isinstance(action, Reply), action
        return addresses(dns.message.from_wire(action.wire))

    assert resolved("wiki.example.org.", "a") == ["240.240.0.1"]
    assert resolved("wiki.example.org.", "b") == ["240.240.0.2"]
    assert resolved("wiki.example.org.", "c") == ["240.240.0.1"]  # neither: the first
    assert resolved("en.wiki.example.org.", "c") == ["240.240.0.9"]
    # Found through a wildcard after taking the search suffix off: no CNAME (as Istio).
    action = answer(query("en.wiki.example.org.c.svc.cluster.local.").to_wire(), table, "c")
    assert isinstance(action, Reply)
    r = dns.message.from_wire(action.wire)
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.A]


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() -> None:
    many = replace(
        ECHO, addresses=tuple(ipaddress.ip_address(f"10.96.1.{i}") for i in range(1, 101))
    )
    table = build_table(index(services=(many,)))
    wire = query("echo.server.svc.cluster.local.").to_wire()
    udp, tcp = answer(wire, table, "client"), answer(wire, table, "client", tcp=True)
    assert isinstance(udp, Reply) and isinstance(tcp, Reply)
    assert len(udp.wire) <= 512
    assert dns.message.from_wire(udp.wire).flags & dns.flags.TC
    assert len(addresses(dns.message.from_wire(tcp.wire))) == 100


def test_too_short_for_a_header_is_dropped_with_the_reason() -> None:
    action = answer(b"\x00" * 11, build_table(MESH), "client")
    assert isinstance(action, Drop) and "too short" in action.reason


def test_upstreams_come_from_the_nameserver_lines_of_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\n"
        "search client.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\n"
        "nameserver fd00::10\n"
        "nameserver not-an-ip\n"
        "; nameserver 10.0.0.1\n"
        "options ndots:5\n"
    )
    assert upstreams_from_resolv_conf(conf) == [("10.96.0.10", 53), ("fd00::10", 53)]
