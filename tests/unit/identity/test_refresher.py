"""The asyncio driver of the store, on a fake clock: fetch, renew at half life, retry.

Time only moves when a test moves it, so the renewal a day from now takes
microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

import pytest

from mesh.identity import (
    CertificateAuthority,
    CertificateRefresher,
    CertificateStore,
    CertificateUnavailable,
    CertState,
    RenewalPolicy,
    SpiffeId,
    WorkloadCertificate,
    generate_key_and_csr,
)
from tests.unit.identity.conftest import T0


class FakeClock:
    """A clock that stands still until :meth:`advance_to` moves it."""

    def __init__(self, now: datetime) -> None:
        self._now = now
        self._sleepers: list[tuple[datetime, asyncio.Future[None]]] = []

    def now(self) -> datetime:
        return self._now

    @property
    def sleeping_until(self) -> list[datetime]:
        """Deadlines of everything currently asleep on this clock."""
        return sorted(deadline for deadline, fut in self._sleepers if not fut.done())

    async def sleep_until(self, deadline: datetime) -> None:
        if deadline <= self._now:
            return
        entry = (deadline, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    async def advance_to(self, t: datetime) -> None:
        self._now = t
        for deadline, fut in self._sleepers:
            if deadline <= t and not fut.done():
                fut.set_result(None)
        await settle()


async def settle() -> None:
    """Let every ready task run until the loop is quiet (no timers are involved)."""
    for _ in range(20):
        await asyncio.sleep(0)


class FakeCa:
    """A fetch function backed by a real CA, that can be told to fail."""

    def __init__(self, ca: CertificateAuthority, clock: FakeClock) -> None:
        self.ca = ca
        self.clock = clock
        self.calls: list[tuple[SpiffeId, datetime]] = []
        self.failing = False
        self.gate: asyncio.Event | None = None

    async def fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        self.calls.append((identity, self.clock.now()))
        if self.gate is not None:
            await self.gate.wait()
        if self.failing:
            raise ConnectionRefusedError("meshd CA unreachable")
        key_pem, csr = generate_key_and_csr(identity)
        issued = self.ca.sign_csr(csr, identity, now=self.clock.now())
        return WorkloadCertificate.from_issued(issued, key_pem)


@contextlib.asynccontextmanager
async def running(
    fetch: Callable[[SpiffeId], Awaitable[WorkloadCertificate]], clock: FakeClock
) -> AsyncIterator[CertificateRefresher]:
    store = CertificateStore(RenewalPolicy(jitter=0.0), random.Random(0))
    refresher = CertificateRefresher(store, fetch, clock)
    task = asyncio.create_task(refresher.run())
    try:
        yield refresher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def scenario(body: Callable[[], Awaitable[None]]) -> None:
    """Run an async test body; a hang fails fast instead of waiting for pytest-timeout."""

    async def main() -> None:
        await asyncio.wait_for(body(), timeout=5)

    asyncio.run(main())


def test_a_requested_certificate_is_fetched_at_once(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    async def body() -> None:
        clock = FakeClock(T0)
        fake = FakeCa(ca, clock)
        async with running(fake.fetch, clock) as refresher:
            cert = await refresher.certificate(identity)
            assert cert.identity == identity
            assert fake.calls == [(identity, T0)]
            assert refresher.get(identity) == cert
            await settle()
            # Nothing more to do until half life: it sleeps exactly until then.
            assert clock.sleeping_until == [cert.renew_at()]
            assert len(fake.calls) == 1

    scenario(body)


def test_the_certificate_is_renewed_at_half_life(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    async def body() -> None:
        clock = FakeClock(T0)
        fake = FakeCa(ca, clock)
        async with running(fake.fetch, clock) as refresher:
            first = await refresher.certificate(identity)
            await settle()
            await clock.advance_to(first.renew_at() - timedelta(seconds=1))
            assert len(fake.calls) == 1
            await clock.advance_to(first.renew_at())
            assert fake.calls[1] == (identity, first.renew_at())
            second = refresher.get(identity)
            assert second is not None and second != first
            assert second.not_after == first.renew_at() + timedelta(hours=24)
            assert clock.sleeping_until == [second.renew_at()]

    scenario(body)


def test_a_failed_fetch_is_retried_with_backoff(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    async def body() -> None:
        clock = FakeClock(T0)
        fake = FakeCa(ca, clock)
        fake.failing = True
        async with running(fake.fetch, clock) as refresher:
            with pytest.raises(CertificateUnavailable, match="meshd CA unreachable"):
                await refresher.certificate(identity)  # fails closed, does not hang
            await settle()
            assert clock.sleeping_until == [T0 + timedelta(seconds=1)]
            await clock.advance_to(T0 + timedelta(seconds=1))
            assert clock.sleeping_until == [T0 + timedelta(seconds=3)]  # 1 s, then 2 s
            fake.failing = False
            await clock.advance_to(T0 + timedelta(seconds=3))
            assert [t for _, t in fake.calls] == [
                T0,
                T0 + timedelta(seconds=1),
                T0 + timedelta(seconds=3),
            ]
            cert = refresher.get(identity)
            assert cert is not None and cert.identity == identity
            assert refresher.store.state(identity, clock.now()) is CertState.AVAILABLE

    scenario(body)


def test_a_failed_renewal_keeps_serving_the_old_certificate(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    async def body() -> None:
        clock = FakeClock(T0)
        fake = FakeCa(ca, clock)
        async with running(fake.fetch, clock) as refresher:
            first = await refresher.certificate(identity)
            await settle()
            fake.failing = True
            await clock.advance_to(first.renew_at())
            assert len(fake.calls) == 2
            assert refresher.get(identity) == first
            assert await refresher.certificate(identity) == first
            await clock.advance_to(first.not_after + timedelta(seconds=1))
            assert refresher.get(identity) is None  # fail closed once it expires
            with pytest.raises(CertificateUnavailable):
                await refresher.certificate(identity)

    scenario(body)


def test_forget_stops_renewals(ca: CertificateAuthority, identity: SpiffeId) -> None:
    async def body() -> None:
        clock = FakeClock(T0)
        fake = FakeCa(ca, clock)
        async with running(fake.fetch, clock) as refresher:
            first = await refresher.certificate(identity)
            await settle()
            assert clock.sleeping_until == [first.renew_at()]
            refresher.forget(identity)
            await settle()
            assert clock.sleeping_until == []  # woke up and found nothing left to renew
            await clock.advance_to(first.not_after)
            assert len(fake.calls) == 1
            assert refresher.get(identity) is None

    scenario(body)


def test_identities_are_fetched_concurrently(ca: CertificateAuthority) -> None:
    async def body() -> None:
        clock = FakeClock(T0)
        fake = FakeCa(ca, clock)
        fake.gate = asyncio.Event()
        a = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/a")
        b = SpiffeId.parse("spiffe://cluster.local/ns/b/sa/b")
        async with running(fake.fetch, clock) as refresher:
            refresher.request(a)
            await settle()
            refresher.request(b)
            await settle()
            # Both fetches started though neither has finished: one slow CA call does
            # not hold up every other workload on the node.
            assert [ident for ident, _ in fake.calls] == [a, b]
            fake.gate.set()
            got = await asyncio.gather(refresher.certificate(a), refresher.certificate(b))
            assert [c.identity for c in got] == [a, b]

    scenario(body)


def test_stopping_the_refresher_cancels_fetches_and_they_resume_on_restart(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    async def body() -> None:
        clock = FakeClock(T0)
        fake = FakeCa(ca, clock)
        fake.gate = asyncio.Event()
        store = CertificateStore(RenewalPolicy(jitter=0.0), random.Random(0))
        refresher = CertificateRefresher(store, fake.fetch, clock)
        task = asyncio.create_task(refresher.run())
        refresher.request(identity)
        await settle()
        assert len(fake.calls) == 1  # stuck at the gate
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()

        fake.gate.set()
        task = asyncio.create_task(refresher.run())
        try:
            cert = await refresher.certificate(identity)
            assert cert.identity == identity
            assert len(fake.calls) == 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    scenario(body)
