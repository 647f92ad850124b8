"""The certificate store's schedule: renew at half life, back off, never serve an expired cert.

Every test passes times in; nothing sleeps.
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta

import pytest

from mesh.identity import (
    CertificateAuthority,
    CertificateStore,
    CertState,
    RenewalPolicy,
    SpiffeId,
    WorkloadCertificate,
    generate_key_and_csr,
)
from tests.unit.identity.conftest import T0

S = timedelta(seconds=1)


def _cert(
    ca: CertificateAuthority,
    identity: SpiffeId,
    now: datetime,
    ttl: timedelta = timedelta(hours=24),
) -> WorkloadCertificate:
    key_pem, csr = generate_key_and_csr(identity)
    return WorkloadCertificate.from_issued(ca.sign_csr(csr, identity, ttl, now=now), key_pem)


def _store(jitter: float = 0.2, seed: int = 7) -> CertificateStore:
    return CertificateStore(RenewalPolicy(jitter=jitter), random.Random(seed))


def _fetched(
    store: CertificateStore, ca: CertificateAuthority, identity: SpiffeId, now: datetime
) -> WorkloadCertificate:
    """Request ``identity`` and complete its first fetch at ``now``."""
    store.request(identity, now)
    assert store.due(now) == [identity]
    cert = _cert(ca, identity, now)
    store.record_success(identity, cert, now)
    return cert


def test_a_requested_identity_is_fetched_at_once_and_only_once(identity: SpiffeId) -> None:
    store = _store()
    assert store.request(identity, T0) is True
    assert store.request(identity, T0) is False
    assert store.state(identity, T0) is CertState.INITIALIZING
    assert store.get(identity, T0) is None
    assert store.next_wakeup() == T0
    assert store.due(T0) == [identity]
    assert store.due(T0) == []  # in flight: not handed out twice
    assert store.next_wakeup() is None


def test_renewal_is_scheduled_at_half_life(ca: CertificateAuthority, identity: SpiffeId) -> None:
    store = _store()
    cert = _fetched(store, ca, identity, T0)
    half_life = cert.not_before + (cert.not_after - cert.not_before) / 2
    assert cert.renew_at() == half_life
    assert store.next_wakeup() == half_life
    assert store.state(identity, T0) is CertState.AVAILABLE
    assert store.get(identity, T0) == cert

    assert store.due(T0 + timedelta(hours=11)) == []
    assert store.due(half_life - S) == []
    assert store.due(half_life) == [identity]
    # While the renewal is in flight the current certificate is still served.
    assert store.get(identity, half_life) == cert


def test_renewal_fraction_is_configurable(ca: CertificateAuthority, identity: SpiffeId) -> None:
    store = CertificateStore(RenewalPolicy(renew_fraction=0.8), random.Random(1))
    cert = _fetched(store, ca, identity, T0)
    assert store.next_wakeup() == cert.renew_at(0.8)
    assert store.next_wakeup() == cert.not_before + (cert.not_after - cert.not_before) * 0.8


def test_backoff_doubles_from_one_second_up_to_the_cap_without_jitter(identity: SpiffeId) -> None:
    store = _store(jitter=0.0)
    store.request(identity, T0)
    delays = []
    now = T0
    for _ in range(12):
        assert store.due(now) == [identity]
        retry = store.record_failure(identity, ConnectionError("CA unreachable"), now)
        assert retry is not None
        delays.append((retry - now).total_seconds())
        assert store.due(retry - timedelta(milliseconds=1)) == []
        now = retry
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


def test_backoff_jitter_stays_within_twenty_percent_and_spreads_retries(
    identity: SpiffeId,
) -> None:
    store = _store(jitter=0.2, seed=42)
    store.request(identity, T0)
    now = T0
    capped = []
    for failure in range(1, 16):
        store.due(now)
        retry = store.record_failure(identity, ConnectionError("refused"), now)
        assert retry is not None
        delay = (retry - now).total_seconds()
        base = min(300.0, 2.0 ** (failure - 1))
        assert 0.8 * base <= delay <= 1.2 * base
        if base == 300.0:
            capped.append(delay)
        now = retry
    assert len(set(capped)) == len(capped)  # jittered: no two retries at the same delay


def test_jitter_comes_from_the_injected_rng(identity: SpiffeId) -> None:
    def first_delay(seed: int) -> timedelta:
        store = _store(seed=seed)
        store.request(identity, T0)
        store.due(T0)
        retry = store.record_failure(identity, ConnectionError("refused"), T0)
        assert retry is not None
        return retry - T0

    assert first_delay(3) == first_delay(3)
    assert first_delay(3) != first_delay(4)


def test_a_long_outage_does_not_overflow(identity: SpiffeId) -> None:
    policy = RenewalPolicy(jitter=0.0)
    assert policy.backoff(10_000, random.Random(0)) == timedelta(seconds=300)


def test_the_old_certificate_is_served_while_renewal_fails(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    store = _store()
    cert = _fetched(store, ca, identity, T0)
    now = cert.renew_at()
    for _ in range(5):
        assert store.due(now) == [identity]
        retry = store.record_failure(identity, ConnectionError("CA down"), now)
        assert retry is not None
        assert store.get(identity, now) == cert
        assert store.state(identity, now) is CertState.AVAILABLE
        now = retry
    status = store.status(identity, now)
    assert status is not None
    assert status.failures == 5
    assert isinstance(status.last_error, ConnectionError)


def test_an_expired_certificate_is_never_served(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    store = _store()
    cert = _fetched(store, ca, identity, T0)
    store.due(cert.renew_at())
    store.record_failure(identity, ConnectionError("CA down"), cert.renew_at())
    assert store.get(identity, cert.not_after) == cert  # last valid instant
    after = cert.not_after + S
    assert store.get(identity, after) is None
    assert store.state(identity, after) is CertState.UNAVAILABLE
    status = store.status(identity, after)
    assert status is not None and status.certificate is None


def test_a_first_fetch_that_fails_leaves_the_identity_unavailable(identity: SpiffeId) -> None:
    store = _store()
    store.request(identity, T0)
    store.due(T0)
    store.record_failure(identity, PermissionError("denied"), T0)
    assert store.state(identity, T0) is CertState.UNAVAILABLE
    assert store.get(identity, T0) is None


def test_success_resets_the_backoff(ca: CertificateAuthority, identity: SpiffeId) -> None:
    store = _store(jitter=0.0)
    store.request(identity, T0)
    now = T0
    for _ in range(6):
        store.due(now)
        retry = store.record_failure(identity, ConnectionError("down"), now)
        assert retry is not None
        now = retry
    store.due(now)
    cert = _cert(ca, identity, now)
    store.record_success(identity, cert, now)
    status = store.status(identity, now)
    assert status is not None and status.failures == 0 and status.last_error is None
    store.due(cert.renew_at())
    retry = store.record_failure(identity, ConnectionError("down"), cert.renew_at())
    assert retry == cert.renew_at() + S  # back to the first step


def test_forget_stops_renewals(ca: CertificateAuthority, identity: SpiffeId) -> None:
    store = _store()
    cert = _fetched(store, ca, identity, T0)
    store.forget(identity)
    assert store.due(cert.renew_at()) == []
    assert store.next_wakeup() is None
    assert store.get(identity, T0) is None
    assert store.state(identity, T0) is None
    assert store.identities() == []


def test_a_fetch_finishing_after_forget_is_dropped(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    store = _store()
    store.request(identity, T0)
    store.due(T0)
    store.forget(identity)
    assert store.record_success(identity, _cert(ca, identity, T0), T0) is None
    assert store.record_failure(identity, ConnectionError("x"), T0) is None
    assert store.get(identity, T0) is None
    assert store.next_wakeup() is None


def test_a_certificate_for_another_identity_is_refused(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    store = _store()
    store.request(identity, T0)
    store.due(T0)
    other = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/db")
    with pytest.raises(ValueError, match=re.escape(f"not {identity}")):
        store.record_success(identity, _cert(ca, other, T0), T0)


def test_a_certificate_already_past_half_life_does_not_cause_a_fetch_loop(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    store = _store()
    store.request(identity, T0)
    store.due(T0)
    # A one-minute certificate is backdated one minute: its half life is already over.
    short = _cert(ca, identity, T0, ttl=timedelta(minutes=1))
    renew = store.record_success(identity, short, T0)
    assert renew == T0 + S
    assert store.due(T0) == []


def test_each_identity_has_its_own_schedule(ca: CertificateAuthority) -> None:
    store = _store()
    a = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/a")
    b = SpiffeId.parse("spiffe://cluster.local/ns/b/sa/b")
    cert_a = _fetched(store, ca, a, T0)
    cert_b = _fetched(store, ca, b, T0 + timedelta(hours=2))
    assert store.next_wakeup() == cert_a.renew_at()
    assert store.due(cert_a.renew_at()) == [a]
    assert store.next_wakeup() == cert_b.renew_at()
    assert store.due(cert_b.renew_at()) == [b]
    assert set(store.identities()) == {a, b}


def test_an_abandoned_fetch_is_due_again(identity: SpiffeId) -> None:
    store = _store()
    store.request(identity, T0)
    store.due(T0)
    store.record_abandoned(identity, T0 + S)
    assert store.due(T0 + S) == [identity]


def test_workload_certificate_from_pem_reads_the_leaf(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    key_pem, csr = generate_key_and_csr(identity)
    issued = ca.sign_csr(csr, identity, now=T0)
    cert = WorkloadCertificate.from_pem(
        chain_pem=issued.chain_pem, key_pem=key_pem, root_pem=issued.root_pem
    )
    assert cert == WorkloadCertificate.from_issued(issued, key_pem)
    assert cert.identity == identity
    assert cert.not_after == T0 + timedelta(hours=24)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"renew_fraction": 0.0},
        {"renew_fraction": 1.0},
        {"initial_backoff_s": 0.0},
        {"initial_backoff_s": 10.0, "max_backoff_s": 5.0},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_nonsensical_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(**kwargs)
