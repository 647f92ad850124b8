"""meshd's own TLS on 15012: a certificate from the mesh root, renewed before it expires.

Proxies reach the control plane as istiod's are reached: xDS and the CA over
TLS on 15012, the server checked against the mesh root they already hold
(``root-cert.pem``). The certificate names the DNS names proxies use for
istiod (``istiod.istio-system.svc``) and meshd, ``localhost``, and the
addresses meshd listens on. gRPC asks :meth:`ServingCertificate.fetch` at
each new handshake, so a certificate past half its life is replaced without
a restart and without dropping the streams already open.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import grpc

from mesh.identity import CertificateAuthority

log = logging.getLogger("meshd")

DNS_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "meshd.istio-system.svc",
    "localhost",
)
SERVING_TTL = timedelta(hours=24)


def serving_ips(listen_host: str) -> tuple[str, ...]:
    """The addresses to name: the listen address if it is one, and loopback."""
    ips = ["127.0.0.1", "::1"]
    try:
        ip = ipaddress.ip_address(listen_host)
    except ValueError:
        return tuple(ips)
    if not ip.is_unspecified and str(ip) not in ips:
        ips.insert(0, str(ip))
    return tuple(ips)


class ServingCertificate:
    """The certificate meshd serves on its TLS port, issued and renewed from ``ca``."""

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        dns_names: Sequence[str] = DNS_NAMES,
        ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
        ttl: timedelta = SERVING_TTL,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.ca = ca
        self.dns_names = tuple(dns_names)
        self.ip_addresses = tuple(ip_addresses)
        self.ttl = ttl
        self.clock = clock
        self.issued = 0
        self._lock = threading.Lock()  # gRPC calls fetch from its own threads
        self.chain_pem, self._key_pem, self.renew_at = self._issue()

    def _issue(self) -> tuple[bytes, bytes, datetime]:
        now = self.clock()
        chain, key = self.ca.issue_serving(self.dns_names, self.ip_addresses, self.ttl, now=now)
        self.issued += 1
        return chain, key, now + self.ttl / 2

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self._key_pem, self.chain_pem)])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: a new certificate, or None to keep the one in use."""
        with self._lock:
            if self.clock() < self.renew_at:
                return None
            self.chain_pem, self._key_pem, self.renew_at = self._issue()
            log.info("meshd: renewed the serving certificate (next at %s)", self.renew_at)
            return self._configuration()

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that renew themselves; clients are not asked for certificates."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), self.fetch, require_client_authentication=False
        )
