"""Checking a peer's certificate: chain to our roots, validity at ``now``, SPIFFE identity.

Chain building and signature checks are cryptography's
``cryptography.x509.verification`` (the Rust path validator, RFC 5280 and
CA/B web PKI profile). It handles SPIFFE certificates (empty subject, URI-only
SAN) as long as it is driven through the *client* verifier: the server
verifier insists on matching a DNS name or IP address, which SPIFFE leaves do
not carry. For the server purpose we therefore use the client verifier with
our own extended-key-usage rule (serverAuth instead of clientAuth); the
identity check is ours anyway (:func:`peer_identity`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from mesh.identity.errors import (
    CertificateExpired,
    CertificateNotYetValid,
    InvalidCertificate,
    InvalidSpiffeId,
    TrustDomainMismatch,
    UntrustedCertificate,
)
from mesh.identity.spiffe import SpiffeId

Purpose = Literal["client", "server"]
"""What the peer is: a ``client`` certificate (we are the server) or a ``server`` one."""

_PURPOSE_EKU = {
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
}


_EKU_REFUSED = "extended key usage does not allow"
_EkuValidator = Callable[[Policy, x509.Certificate, x509.ExtendedKeyUsage | None], None]


def _eku_validator(purpose: Purpose) -> _EkuValidator:
    wanted = _PURPOSE_EKU[purpose]

    def check(_policy: Policy, _cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
        # Like the web PKI client profile: no EKU means "any purpose"; a present
        # EKU must name ours (or anyExtendedKeyUsage).
        if eku is None or wanted in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
            return
        raise ValueError(f"{_EKU_REFUSED} {purpose} authentication")

    return check


def _ee_policy(purpose: Purpose) -> ExtensionPolicy:
    return ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _eku_validator(purpose)
    )


_EE_POLICIES: dict[Purpose, ExtensionPolicy] = {
    "client": _ee_policy("client"),
    "server": _ee_policy("server"),
}


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware (UTC), got naive {now!r}")
    return now.astimezone(UTC)


def load_pem_chain(pem: bytes) -> list[x509.Certificate]:
    """Parse one or more PEM certificates; raise :class:`InvalidCertificate` if there are none."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, TypeError) as e:
        raise InvalidCertificate(f"cannot parse PEM certificates: {e}") from e
    if not certs:
        raise InvalidCertificate("no PEM certificate found")
    return certs


def peer_identity(cert: x509.Certificate) -> SpiffeId:
    """Return the SPIFFE ID in ``cert``'s single URI SAN.

    Raises :class:`InvalidCertificate` when there is no SAN, no or several URI
    SANs, or the URI is not a mesh SPIFFE ID. Other SAN types are ignored.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidCertificate(
            "no subject alternative name; a mesh certificate carries its SPIFFE ID as a URI SAN"
        ) from None
    except ValueError as e:
        raise InvalidCertificate(f"cannot parse the extensions: {e}") from e
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidCertificate(
            f"expected exactly one URI SAN (the SPIFFE ID), found {len(uris)}: {uris}"
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as e:
        raise InvalidCertificate(f"the URI SAN is not a mesh SPIFFE ID: {e}") from e


def check_trust_domain(identity: SpiffeId, expected_trust_domain: str) -> None:
    """Raise :class:`TrustDomainMismatch` unless ``identity`` is in ``expected_trust_domain``."""
    if identity.trust_domain != expected_trust_domain:
        raise TrustDomainMismatch(
            expected=expected_trust_domain, actual=identity.trust_domain, identity=str(identity)
        )


def _describe(cert: x509.Certificate) -> str:
    """Name a certificate in an error message: its identity if it has one, else its serial."""
    try:
        return str(peer_identity(cert))
    except InvalidCertificate:
        return f"serial {cert.serial_number:x}"


def verify_chain(
    chain_pem: bytes | Sequence[x509.Certificate],
    roots: bytes | Sequence[x509.Certificate],
    now: datetime,
    *,
    purpose: Purpose = "client",
) -> x509.Certificate:
    """Verify a peer's chain (leaf first) against ``roots`` at ``now``; return the leaf.

    The leaf's validity window is checked first so an expired or early
    certificate is reported with its dates (:class:`CertificateExpired`,
    :class:`CertificateNotYetValid`). Any other failure (another CA, a broken
    signature, an expired intermediate, a CA used as a leaf, the wrong
    extended key usage for ``purpose``) raises :class:`UntrustedCertificate`.
    Who the peer *is* is not checked here: use :func:`peer_identity` and
    :func:`check_trust_domain` on the returned leaf.
    """
    now = _utc(now)
    if purpose not in _EE_POLICIES:
        raise ValueError(f"purpose must be 'client' or 'server', got {purpose!r}")
    chain = load_pem_chain(chain_pem) if isinstance(chain_pem, bytes) else list(chain_pem)
    if not chain:
        raise InvalidCertificate("the peer sent no certificate")
    anchors = load_pem_chain(roots) if isinstance(roots, bytes) else list(roots)
    leaf = chain[0]
    who = _describe(leaf)
    if not anchors:
        raise UntrustedCertificate(subject=who, reason="no trusted root certificates configured")
    not_before, not_after = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < not_before:
        raise CertificateNotYetValid(
            not_before=not_before, not_after=not_after, now=now, subject=who
        )
    if now > not_after:
        raise CertificateExpired(not_before=not_before, not_after=not_after, now=now, subject=who)
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(now)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_EE_POLICIES[purpose]
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, chain[1:])
    except VerificationError as e:
        if _EKU_REFUSED in str(e):
            raise UntrustedCertificate(
                subject=who,
                reason=str(e),
                hint=f"the peer presented a certificate not meant for {purpose} authentication",
            ) from e
        raise UntrustedCertificate(subject=who, reason=str(e)) from e
    return leaf
