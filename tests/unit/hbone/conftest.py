"""Certificates and loopback servers for the HBONE tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import uvloop

from mesh.hbone import TlsIdentity
from mesh.identity import CertificateAuthority, SpiffeId, generate_key_and_csr

T = TypeVar("T")
NOW = datetime.now(UTC)


def issue(
    ca: CertificateAuthority,
    spiffe: str,
    *,
    now: datetime = NOW,
    ttl: timedelta = timedelta(hours=24),
) -> TlsIdentity:
    identity = SpiffeId.parse(spiffe)
    key, csr = generate_key_and_csr(identity)
    issued = ca.sign_csr(csr, identity, ttl, now=now)
    return TlsIdentity(chain_pem=issued.chain_pem, key_pem=key, roots_pem=ca.root_pem)


@dataclass
class Pki:
    ca: CertificateAuthority
    server: TlsIdentity
    client: TlsIdentity
    other_sa: TlsIdentity
    expired: TlsIdentity
    foreign_ca: TlsIdentity  # same trust domain, another root
    other_domain: TlsIdentity  # another trust domain
    server_trusting_both: TlsIdentity  # our server, also trusting other.local's root

    @staticmethod
    def build() -> Pki:
        ca = CertificateAuthority.create("cluster.local", now=NOW - timedelta(days=2))
        foreign = CertificateAuthority.create("cluster.local", now=NOW - timedelta(days=2))
        other = CertificateAuthority.create("other.local", now=NOW - timedelta(days=2))
        server = issue(ca, "spiffe://cluster.local/ns/server/sa/server")
        both = ca.root_pem + other.root_pem
        return Pki(
            ca=ca,
            server=server,
            client=issue(ca, "spiffe://cluster.local/ns/client/sa/client"),
            other_sa=issue(ca, "spiffe://cluster.local/ns/server/sa/impostor"),
            expired=issue(
                ca, "spiffe://cluster.local/ns/client/sa/client", now=NOW - timedelta(hours=30)
            ),
            # Signed by another CA, though it trusts ours (so only the server refuses).
            foreign_ca=_with_roots(
                issue(foreign, "spiffe://cluster.local/ns/client/sa/client"), ca.root_pem
            ),
            other_domain=_with_roots(
                issue(other, "spiffe://other.local/ns/default/sa/client"), both
            ),
            server_trusting_both=TlsIdentity(
                chain_pem=server.chain_pem, key_pem=server.key_pem, roots_pem=both
            ),
        )


def _with_roots(identity: TlsIdentity, roots: bytes) -> TlsIdentity:
    return TlsIdentity(chain_pem=identity.chain_pem, key_pem=identity.key_pem, roots_pem=roots)


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki.build()


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 30) -> T:
    """Run a test body on uvloop (what the programs use), with a deadline."""

    async def guarded() -> T:
        async with asyncio.timeout(timeout_s):
            return await coro_fn()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(guarded())


class Upstream:
    """A loopback TCP server the tunnels lead to; its behaviour is a coroutine per client."""

    def __init__(
        self, behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> None:
        self.behaviour = behaviour
        self.server: asyncio.Server | None = None
        self.peers: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Upstream:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.peers.append(writer.get_extra_info("peername"))
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self.behaviour(reader, writer)
            except (ConnectionError, OSError) as e:
                self.errors.append(e)
            except asyncio.CancelledError:
                pass
            finally:
                self._tasks.discard(task)
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then say how many bytes came and half-close."""
    total = 0
    while chunk := await reader.read(65536):
        total += len(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write(f"bye {total}".encode())
    await writer.drain()
    writer.write_eof()
    await asyncio.sleep(0.05)
