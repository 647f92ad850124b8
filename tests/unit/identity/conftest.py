"""Shared fixtures: a fixed "now", a mesh CA at that time, and a workload identity."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mesh.identity import CertificateAuthority, SpiffeId

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
"""The fixed time tests pretend it is; the CA was created a day earlier."""


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local", now=T0 - timedelta(days=1))


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    """A second CA of the same trust domain: its certificates must not be trusted by ``ca``."""
    return CertificateAuthority.create("cluster.local", now=T0 - timedelta(days=1))


@pytest.fixture
def identity() -> SpiffeId:
    return SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
