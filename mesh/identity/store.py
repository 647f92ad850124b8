"""Workload certificates held by a node, and when to renew them.

:class:`CertificateStore` is the sans-I/O core: it is told what happened
(``request``, ``record_success``, ``record_failure``) and at what time, and
answers what to fetch now (``due``), when to wake up next (``next_wakeup``)
and which certificate to serve (``get``). It never reads a clock and never
sleeps, so its schedule is tested by passing times in.

The rules, as Istio's ztunnel applies them:

* renew at half of the certificate's lifetime (``RenewalPolicy.renew_fraction``);
* on failure retry with exponential backoff and jitter, and keep serving the
  previous certificate while it is valid;
* fail closed: an expired certificate is never served.

:class:`CertificateRefresher` is the thin asyncio shell that runs fetches
according to the store's schedule.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from mesh.identity.ca import IssuedCertificate
from mesh.identity.errors import CertificateUnavailable, InvalidCertificate
from mesh.identity.spiffe import SpiffeId
from mesh.identity.verify import load_pem_chain, peer_identity


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadCertificate:
    """A certificate chain for one identity together with its private key."""

    identity: SpiffeId
    chain_pem: bytes
    key_pem: bytes
    root_pem: bytes
    not_before: datetime
    not_after: datetime

    def __post_init__(self) -> None:
        if self.not_after <= self.not_before:
            raise ValueError(
                f"certificate of {self.identity} ends ({self.not_after}) before it starts "
                f"({self.not_before})"
            )

    @classmethod
    def from_issued(cls, issued: IssuedCertificate, key_pem: bytes) -> WorkloadCertificate:
        """Pair what :meth:`CertificateAuthority.sign_csr` returned with the key of the CSR."""
        return cls(
            identity=issued.identity,
            chain_pem=issued.chain_pem,
            key_pem=key_pem,
            root_pem=issued.root_pem,
            not_before=issued.not_before,
            not_after=issued.not_after,
        )

    @classmethod
    def from_pem(cls, *, chain_pem: bytes, key_pem: bytes, root_pem: bytes) -> WorkloadCertificate:
        """Build from PEM as received from a CA; identity and dates come from the leaf."""
        leaf = load_pem_chain(chain_pem)[0]
        return cls(
            identity=peer_identity(leaf),
            chain_pem=chain_pem,
            key_pem=key_pem,
            root_pem=root_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    def renew_at(self, fraction: float = 0.5) -> datetime:
        """The time when ``fraction`` of the lifetime has passed (0.5: the half life)."""
        return self.not_before + (self.not_after - self.not_before) * fraction

    def expired(self, now: datetime) -> bool:
        """True once ``now`` is past ``not_after``: from then on it must not be served."""
        return now > self.not_after


@dataclass(frozen=True, slots=True, kw_only=True)
class RenewalPolicy:
    """When to renew and how to back off; Istio's defaults for renewal at half life."""

    renew_fraction: float = 0.5
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 300.0
    jitter: float = 0.2
    """Each retry delay is multiplied by a uniform factor in [1 - jitter, 1 + jitter]."""

    def __post_init__(self) -> None:
        if not 0.0 < self.renew_fraction < 1.0:
            raise ValueError(f"renew_fraction must be in (0, 1), got {self.renew_fraction}")
        if not 0.0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 < initial_backoff_s ({self.initial_backoff_s}) <= max_backoff_s "
                f"({self.max_backoff_s})"
            )
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def backoff(self, failures: int, rng: random.Random) -> timedelta:
        """Delay before retry number ``failures`` (1 for the first failure).

        The exponential base ``initial * 2**(failures-1)`` is capped at
        ``max_backoff_s``; jitter applies after the cap, so a node's workloads
        retrying at the cap stay spread out instead of hitting the CA together.
        """
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        # The exponent is bounded so a long outage cannot overflow the float.
        base = min(self.max_backoff_s, self.initial_backoff_s * 2.0 ** min(failures - 1, 64))
        return timedelta(seconds=base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter))


class CertState(enum.Enum):
    """What the store can offer for an identity (ztunnel's ``CertState``)."""

    INITIALIZING = "initializing"
    """No certificate yet and no failure yet: the first fetch is pending."""
    AVAILABLE = "available"
    """A valid certificate is served (perhaps while its renewal is failing)."""
    UNAVAILABLE = "unavailable"
    """No valid certificate: the fetch failed, or the last certificate expired."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CertStatus:
    """A snapshot of one identity's slot, for the admin page and for waiters."""

    identity: SpiffeId
    state: CertState
    certificate: WorkloadCertificate | None
    failures: int
    last_error: Exception | None
    next_fetch: datetime | None
    """When the next fetch is due; None while one is in flight."""


@dataclass(slots=True)
class _Slot:
    next_fetch: datetime | None
    cert: WorkloadCertificate | None = None
    failures: int = 0
    last_error: Exception | None = None
    in_flight: bool = False


class CertificateStore:
    """Per-identity certificates and their fetch schedule. Not thread-safe; one owner."""

    def __init__(
        self, policy: RenewalPolicy | None = None, rng: random.Random | None = None
    ) -> None:
        self.policy = policy if policy is not None else RenewalPolicy()
        self._rng = rng if rng is not None else random.Random()
        self._slots: dict[SpiffeId, _Slot] = {}

    def identities(self) -> list[SpiffeId]:
        """Every identity the store currently keeps certificates for."""
        return list(self._slots)

    def request(self, identity: SpiffeId, now: datetime) -> bool:
        """Start keeping a certificate for ``identity``; a first fetch is due at ``now``.

        Returns False if the identity was already known (nothing changes).
        """
        if identity in self._slots:
            return False
        self._slots[identity] = _Slot(next_fetch=now)
        return True

    def forget(self, identity: SpiffeId) -> None:
        """Drop ``identity``: no more renewals; a fetch in flight is ignored when it ends."""
        self._slots.pop(identity, None)

    def due(self, now: datetime) -> list[SpiffeId]:
        """Identities to fetch now, earliest first; they are marked in flight.

        The caller must answer each with ``record_success``, ``record_failure``
        or ``record_abandoned``; until then the identity is not due again.
        """
        ready = [
            (slot.next_fetch, identity)
            for identity, slot in self._slots.items()
            if not slot.in_flight and slot.next_fetch is not None and slot.next_fetch <= now
        ]
        ready.sort(key=lambda pair: pair[0])
        for _, identity in ready:
            slot = self._slots[identity]
            slot.in_flight = True
            slot.next_fetch = None
        return [identity for _, identity in ready]

    def record_success(
        self, identity: SpiffeId, cert: WorkloadCertificate, now: datetime
    ) -> datetime | None:
        """Store a fetched certificate; return when it will be renewed (None if forgotten)."""
        if cert.identity != identity:
            raise ValueError(f"certificate is for {cert.identity}, not {identity}")
        slot = self._slots.get(identity)
        if slot is None:
            return None
        slot.cert = cert
        slot.failures = 0
        slot.last_error = None
        slot.in_flight = False
        renew = cert.renew_at(self.policy.renew_fraction)
        if renew <= now:
            # Already past its renewal point (a very short-lived certificate, or the
            # CA's clock is behind ours): wait a little instead of refetching in a
            # tight loop.
            renew = now + timedelta(seconds=self.policy.initial_backoff_s)
        slot.next_fetch = renew
        return renew

    def record_failure(
        self, identity: SpiffeId, error: Exception, now: datetime
    ) -> datetime | None:
        """Note a failed fetch; return when it will be retried (None if forgotten).

        The previous certificate, if any, keeps being served while it is valid.
        """
        slot = self._slots.get(identity)
        if slot is None:
            return None
        slot.failures += 1
        slot.last_error = error
        slot.in_flight = False
        slot.next_fetch = now + self.policy.backoff(slot.failures, self._rng)
        return slot.next_fetch

    def record_abandoned(self, identity: SpiffeId, now: datetime) -> None:
        """A fetch ended without an answer (its task was cancelled): fetch again at ``now``."""
        slot = self._slots.get(identity)
        if slot is not None and slot.in_flight:
            slot.in_flight = False
            slot.next_fetch = now

    def get(self, identity: SpiffeId, now: datetime) -> WorkloadCertificate | None:
        """The certificate to serve for ``identity``, or None: never an expired one."""
        slot = self._slots.get(identity)
        if slot is None or slot.cert is None or slot.cert.expired(now):
            return None
        return slot.cert

    def status(self, identity: SpiffeId, now: datetime) -> CertStatus | None:
        """A snapshot of ``identity``'s slot at ``now``, or None if it is unknown."""
        slot = self._slots.get(identity)
        if slot is None:
            return None
        if slot.cert is not None and not slot.cert.expired(now):
            state = CertState.AVAILABLE
        elif slot.cert is None and slot.last_error is None:
            state = CertState.INITIALIZING
        else:
            state = CertState.UNAVAILABLE
        return CertStatus(
            identity=identity,
            state=state,
            certificate=slot.cert if state is CertState.AVAILABLE else None,
            failures=slot.failures,
            last_error=slot.last_error,
            next_fetch=slot.next_fetch,
        )

    def state(self, identity: SpiffeId, now: datetime) -> CertState | None:
        """The :class:`CertState` of ``identity`` at ``now``, or None if it is unknown."""
        status = self.status(identity, now)
        return status.state if status is not None else None

    def next_wakeup(self) -> datetime | None:
        """The earliest time a fetch becomes due, or None if nothing is scheduled."""
        times = [
            slot.next_fetch
            for slot in self._slots.values()
            if not slot.in_flight and slot.next_fetch is not None
        ]
        return min(times, default=None)


class Clock(Protocol):
    """Where the refresher gets the time and how it waits; tests substitute a fake."""

    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    async def sleep_until(self, deadline: datetime) -> None:
        """Return at or after ``deadline`` (at once if it has passed)."""
        ...


class SystemClock:
    """The real clock: ``datetime.now(UTC)`` and ``asyncio.sleep``."""

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)

    async def sleep_until(self, deadline: datetime) -> None:
        """Sleep until ``deadline``; the refresher re-checks the store when it returns."""
        delay = (deadline - self.now()).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)


Fetch = Callable[[SpiffeId], Awaitable[WorkloadCertificate]]
"""Obtain a new certificate for an identity (generate a key and CSR, call the CA)."""


class CertificateRefresher:
    """Runs the fetches a :class:`CertificateStore` asks for, at the times it asks.

    The caller owns the task running :meth:`run` and cancels it to stop;
    fetches in flight are cancelled with it.
    """

    def __init__(
        self,
        store: CertificateStore,
        fetch: Fetch,
        clock: Clock,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self._fetch = fetch
        self._clock = clock
        self._log = logger if logger is not None else logging.getLogger(__name__)
        self._wakeup = asyncio.Event()
        self._changed = asyncio.Event()

    def request(self, identity: SpiffeId) -> None:
        """Start keeping a certificate for ``identity`` (fetched at once by :meth:`run`)."""
        if self.store.request(identity, self._clock.now()):
            self.wake()

    def forget(self, identity: SpiffeId) -> None:
        """Stop renewing ``identity``'s certificate."""
        self.store.forget(identity)
        self.wake()

    def wake(self) -> None:
        """Make :meth:`run` look at the store again now."""
        self._wakeup.set()

    def get(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The certificate to serve now, or None (never an expired one)."""
        return self.store.get(identity, self._clock.now())

    async def certificate(self, identity: SpiffeId) -> WorkloadCertificate:
        """Request ``identity`` if needed and wait until its certificate is available.

        Raises :class:`CertificateUnavailable` if the fetch failed and no valid
        certificate is left, so a connection fails closed instead of waiting for
        the next retry. Needs :meth:`run` to be running.
        """
        self.request(identity)
        while True:
            changed = self._changed
            status = self.store.status(identity, self._clock.now())
            if status is None:
                raise CertificateUnavailable(identity=str(identity), cause=None)
            if status.certificate is not None:
                return status.certificate
            if status.state is CertState.UNAVAILABLE:
                raise CertificateUnavailable(identity=str(identity), cause=status.last_error)
            await changed.wait()

    def _notify_changed(self) -> None:
        # Waiters hold the old event; replacing it means each waiter wakes once per change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        """Fetch due identities concurrently, then sleep until the next one is due."""
        async with asyncio.TaskGroup() as tasks:
            while True:
                # Clear before looking, so a request made after this point wakes us.
                self._wakeup.clear()
                for identity in self.store.due(self._clock.now()):
                    tasks.create_task(self._fetch_one(identity))
                await self._sleep(self.store.next_wakeup())

    async def _sleep(self, deadline: datetime | None) -> None:
        waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(self._wakeup.wait())]
        if deadline is not None:
            waiters.append(asyncio.ensure_future(self._clock.sleep_until(deadline)))
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for waiter in done:
                waiter.result()  # surface a failing clock instead of spinning on it
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _fetch_one(self, identity: SpiffeId) -> None:
        try:
            cert = await self._fetch(identity)
            if cert.identity != identity:
                raise InvalidCertificate(f"fetched a certificate for {cert.identity}")
        except asyncio.CancelledError:
            self.store.record_abandoned(identity, self._clock.now())
            raise
        except Exception as e:
            # Whatever went wrong (CA unreachable, CSR refused, bad answer), the answer
            # is the same: back off and retry, serving the old certificate meanwhile.
            retry = self.store.record_failure(identity, e, self._clock.now())
            self._log.warning(
                "certificate fetch failed for %s: %s; retrying at %s", identity, e, retry
            )
        else:
            renew = self.store.record_success(identity, cert, self._clock.now())
            self._log.info(
                "certificate for %s valid until %s, renewal at %s", identity, cert.not_after, renew
            )
        finally:
            self._notify_changed()
            self.wake()
