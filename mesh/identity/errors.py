"""Errors of the identity package.

Every error derives from :class:`IdentityError`. Each message says what is
wrong and, where an operator can act on it, a hint. The values that explain the
failure are also kept as attributes, so callers (the CA service, ztunnel's
admin page) can report them without parsing the message.
"""

from __future__ import annotations

from datetime import datetime, timedelta


class IdentityError(Exception):
    """Base class of every error raised by ``mesh.identity``."""


class InvalidSpiffeId(IdentityError, ValueError):
    """A SPIFFE ID (or one of its parts) is malformed.

    ``part`` names the offending part: ``scheme``, ``trust domain``, ``path``,
    ``namespace``, ``service account``, ``query``, ``fragment``, ...
    """

    def __init__(self, value: str, part: str, reason: str) -> None:
        self.value = value
        self.part = part
        self.reason = reason
        super().__init__(f"invalid SPIFFE ID {value!r}: {part}: {reason}")


class TrustDomainMismatch(IdentityError):
    """An identity belongs to a trust domain other than the expected one."""

    def __init__(self, *, expected: str, actual: str, identity: str | None = None) -> None:
        self.expected = expected
        self.actual = actual
        self.identity = identity
        who = f"identity {identity} is in" if identity else "got"
        super().__init__(
            f"trust domain mismatch: {who} trust domain {actual!r}, expected {expected!r} "
            "(hint: check the trust domain configured on both ends, "
            "e.g. meshConfig.trustDomain)"
        )


def _seconds(d: timedelta) -> str:
    """``90 days`` as ``7776000s``: plain seconds, the unit of Istio's ``validity_duration``."""
    total = d.total_seconds()
    return f"{int(total)}s" if total.is_integer() else f"{total:.3f}s"


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


class CertificateExpired(IdentityError):
    """A certificate's validity window ended before ``now``."""

    def __init__(
        self, *, not_before: datetime, not_after: datetime, now: datetime, subject: str = ""
    ) -> None:
        self.not_before = not_before
        self.not_after = not_after
        self.now = now
        self.subject = subject
        what = f"certificate of {subject}" if subject else "certificate"
        super().__init__(
            f"{what} expired: valid from {_iso(not_before)} until {_iso(not_after)}, "
            f"now is {_iso(now)} (hint: is certificate renewal failing, or is this "
            "node's clock wrong?)"
        )


class CertificateNotYetValid(IdentityError):
    """A certificate's validity window starts after ``now``."""

    def __init__(
        self, *, not_before: datetime, not_after: datetime, now: datetime, subject: str = ""
    ) -> None:
        self.not_before = not_before
        self.not_after = not_after
        self.now = now
        self.subject = subject
        what = f"certificate of {subject}" if subject else "certificate"
        super().__init__(
            f"{what} is not yet valid: valid from {_iso(not_before)} until "
            f"{_iso(not_after)}, now is {_iso(now)} (hint: the clocks of this node "
            "and the CA's node disagree; check NTP)"
        )


class UntrustedCertificate(IdentityError):
    """A certificate chain does not verify to the trusted roots."""

    DEFAULT_HINT = "was it issued by another CA? both ends must share the mesh root certificate"

    def __init__(self, *, subject: str, reason: str, hint: str = DEFAULT_HINT) -> None:
        self.subject = subject
        self.reason = reason
        super().__init__(f"certificate of {subject} is not trusted: {reason} (hint: {hint})")


class InvalidCertificate(IdentityError):
    """A certificate cannot be used: unparsable PEM, no or several URI SANs, ..."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid certificate: {reason}")


class InvalidCsr(IdentityError):
    """A certificate signing request is refused: unparsable, bad signature, wrong key."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid certificate signing request: {reason}")


class CsrIdentityMismatch(InvalidCsr):
    """The names a CSR asks for are not exactly the identity being issued."""

    def __init__(self, *, requested: str, found: list[str]) -> None:
        self.requested = requested
        self.found = list(found)
        shown = ", ".join(found) if found else "no subject alternative name"
        super().__init__(f"the CSR must carry exactly one URI SAN {requested}, it carries: {shown}")


class InvalidTtl(IdentityError, ValueError):
    """A requested certificate lifetime is not positive or above the maximum."""

    def __init__(self, *, ttl: timedelta, maximum: timedelta) -> None:
        self.ttl = ttl
        self.maximum = maximum
        super().__init__(
            f"invalid certificate TTL {_seconds(ttl)}: it must be above 0s and at most "
            f"{_seconds(maximum)} ({maximum})"
        )


class InvalidCaMaterial(IdentityError):
    """The CA's root certificate or key cannot be loaded or used."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot use the CA root: {reason}")


class CaKeyMismatch(InvalidCaMaterial):
    """The CA private key is not the key of the CA certificate."""

    def __init__(self, detail: str = "") -> None:
        where = f" ({detail})" if detail else ""
        super().__init__(
            f"the private key does not match the root certificate's public key{where} "
            "(hint: the key and certificate files come from different CAs; restore the "
            "matching pair)"
        )


class CertificateUnavailable(IdentityError):
    """No valid certificate for an identity: its fetch failed and nothing valid is left."""

    def __init__(self, *, identity: str, cause: BaseException | None) -> None:
        self.identity = identity
        self.cause = cause
        why = f": {cause}" if cause is not None else " (none issued, or the last one expired)"
        super().__init__(
            f"no valid certificate for {identity}{why} (hint: is the CA (meshd) reachable "
            "from this node? renewal is retried with backoff)"
        )
