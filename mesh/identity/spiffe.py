"""SPIFFE IDs of mesh workloads: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

The format is Istio's. The trust domain follows the SPIFFE ID specification;
the namespace and service account follow Kubernetes' name rules, because that
is where they come from. Anything else (query, fragment, port, userinfo,
percent-encoding, a trailing slash, upper case) is refused, so that two
spellings can never name the same workload and an authorization policy written
for one cannot be dodged with the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh.identity.errors import InvalidSpiffeId

SCHEME = "spiffe://"
"""The only accepted scheme prefix (lowercase, as the SPIFFE spec requires)."""

MAX_TRUST_DOMAIN_LENGTH = 255
MAX_NAMESPACE_LENGTH = 63  # Kubernetes namespace names are RFC 1123 DNS labels.
MAX_SERVICE_ACCOUNT_LENGTH = 253  # ServiceAccount names are RFC 1123 DNS subdomains.
MAX_SPIFFE_ID_LENGTH = 2048  # SPIFFE ID spec: URIs longer than 2048 bytes are invalid.

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _first_bad_char(value: str, allowed: str) -> str | None:
    for ch in value:
        if not (("a" <= ch <= "z") or ("0" <= ch <= "9") or ch in allowed):
            return ch
    return None


def _trust_domain_problem(td: str) -> str | None:
    if not td:
        return "is empty"
    if len(td) > MAX_TRUST_DOMAIN_LENGTH:
        return f"is {len(td)} characters long, the maximum is {MAX_TRUST_DOMAIN_LENGTH}"
    if not _TRUST_DOMAIN_CHARS.fullmatch(td):
        bad = _first_bad_char(td, "._-")
        if bad is not None and bad.isupper():
            return f"{td!r} contains upper case {bad!r}; trust domains are lower case"
        return (
            f"{td!r} contains {bad!r}; only lower case letters, digits, '.', '-' "
            "and '_' are allowed"
        )
    return None


def _dns_name_problem(value: str, *, kind: str, maximum: int, allowed: str) -> str | None:
    """Say why ``value`` is not a valid Kubernetes name, or return None."""
    if not value:
        return "is empty"
    if len(value) > maximum:
        return f"is {len(value)} characters long, the maximum is {maximum}"
    bad = _first_bad_char(value, allowed)
    if bad is not None:
        if bad.isupper():
            return f"{value!r} contains upper case {bad!r}; {kind}s are lower case"
        legal = "lower case letters, digits and '-'" + (" and '.'" if "." in allowed else "")
        return f"{value!r} contains {bad!r}; only {legal} are allowed"
    return f"{value!r} must start and end with a letter or digit (RFC 1123)"


def _namespace_problem(ns: str) -> str | None:
    if _DNS_LABEL.fullmatch(ns) and len(ns) <= MAX_NAMESPACE_LENGTH:
        return None
    return _dns_name_problem(ns, kind="namespace", maximum=MAX_NAMESPACE_LENGTH, allowed="-")


def _service_account_problem(sa: str) -> str | None:
    if _DNS_SUBDOMAIN.fullmatch(sa) and len(sa) <= MAX_SERVICE_ACCOUNT_LENGTH:
        return None
    return _dns_name_problem(
        sa, kind="service account", maximum=MAX_SERVICE_ACCOUNT_LENGTH, allowed="-."
    )


def validate_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` unchanged if it is a valid SPIFFE trust domain name.

    Raises :class:`InvalidSpiffeId` (part ``trust domain``) otherwise.
    """
    if not isinstance(trust_domain, str):
        raise InvalidSpiffeId(repr(trust_domain), "trust domain", "must be a string")
    problem = _trust_domain_problem(trust_domain)
    if problem is not None:
        raise InvalidSpiffeId(trust_domain, "trust domain", problem)
    return trust_domain


@dataclass(frozen=True, slots=True, kw_only=True)
class SpiffeId:
    """The identity of a workload: its trust domain, namespace and service account.

    Construction validates every part, so a ``SpiffeId`` value is always valid.
    """

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        shown = f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
        checks = (
            ("trust domain", self.trust_domain, _trust_domain_problem),
            ("namespace", self.namespace, _namespace_problem),
            ("service account", self.service_account, _service_account_problem),
        )
        for part, value, check in checks:
            if not isinstance(value, str):
                raise InvalidSpiffeId(shown, part, f"must be a string, got {type(value).__name__}")
            problem = check(value)
            if problem is not None:
                raise InvalidSpiffeId(shown, part, problem)

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://<td>/ns/<ns>/sa/<sa>``.

        Raises :class:`InvalidSpiffeId` whose ``part`` names what is wrong.
        """
        if not isinstance(value, str):
            raise InvalidSpiffeId(repr(value), "value", "must be a string")
        if not value.startswith(SCHEME):
            if value[: len(SCHEME)].lower() == SCHEME:
                reason = "must be lower case 'spiffe://'"
            elif "://" in value:
                reason = f"must be 'spiffe://', got {value.split('://', 1)[0] + '://'!r}"
            else:
                reason = "missing 'spiffe://' prefix"
            raise InvalidSpiffeId(value, "scheme", reason)
        if len(value) > MAX_SPIFFE_ID_LENGTH:
            raise InvalidSpiffeId(
                value[:64] + "...", "length", f"longer than {MAX_SPIFFE_ID_LENGTH} characters"
            )
        for char, part in (("?", "query"), ("#", "fragment"), ("%", "percent-encoding")):
            if char in value:
                raise InvalidSpiffeId(value, part, f"{char!r} is not allowed in a SPIFFE ID")

        authority, slash, path = value[len(SCHEME) :].partition("/")
        if "@" in authority:
            raise InvalidSpiffeId(value, "trust domain", "userinfo ('@') is not allowed")
        if ":" in authority:
            raise InvalidSpiffeId(value, "trust domain", "a port (':') is not allowed")
        problem = _trust_domain_problem(authority)
        if problem is not None:
            raise InvalidSpiffeId(value, "trust domain", problem)

        expected = "expected /ns/<namespace>/sa/<service-account>"
        if not slash:
            raise InvalidSpiffeId(value, "path", f"is missing; {expected}")
        if path.endswith("/"):
            raise InvalidSpiffeId(value, "path", f"has a trailing slash; {expected}")
        segments = path.split("/")
        if "" in segments:
            raise InvalidSpiffeId(value, "path", f"has an empty segment ('//'); {expected}")
        if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
            raise InvalidSpiffeId(value, "path", f"'/{path}' does not match; {expected}")

        namespace, service_account = segments[1], segments[3]
        for part, problem in (
            ("namespace", _namespace_problem(namespace)),
            ("service account", _service_account_problem(service_account)),
        ):
            if problem is not None:
                raise InvalidSpiffeId(value, part, problem)
        return cls(trust_domain=authority, namespace=namespace, service_account=service_account)
