"""TLS for HBONE: TLS 1.3 only, ALPN ``h2``, a client certificate both ways.

Certificates and keys come as PEM bytes (from the certificate store, later
from meshd's CA) and are handed to OpenSSL through an anonymous in-memory
file, so a workload's private key never touches the disk. OpenSSL verifies
the peer's chain against the mesh roots during the handshake; the SPIFFE
identity in the peer's URI SAN is then checked by the caller (the expected
identities on the client, the trust domain on the server).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from cryptography import x509

from mesh.hbone.errors import TlsFailure
from mesh.hbone.settings import ALPN
from mesh.identity import IdentityError, SpiffeId, load_pem_chain, peer_identity


@dataclass(frozen=True, slots=False, kw_only=True)
class TlsIdentity:
    """A workload's certificate chain (leaf first), its key, and the mesh roots."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)
    roots_pem: bytes

    @classmethod
    def from_files(cls, cert: Path, key: Path, roots: Path) -> TlsIdentity:
        return cls(
            chain_pem=cert.read_bytes(), key_pem=key.read_bytes(), roots_pem=roots.read_bytes()
        )

    @cached_property
    def identity(self) -> SpiffeId:
        """The SPIFFE identity of our own leaf certificate."""
        return peer_identity(load_pem_chain(self.chain_pem)[0])

    @property
    def trust_domain(self) -> str:
        return self.identity.trust_domain

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._configure(ctx)
        # Tickets are only useful for resumption, which HBONE does not use;
        # not sending them saves two records per new connection.
        ctx.num_tickets = 0
        return ctx

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # No DNS names in SPIFFE certificates: the identity is checked after
        # the handshake against the URI SAN instead.
        ctx.check_hostname = False
        self._configure(ctx)
        return ctx

    def _configure(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cadata=self.roots_pem.decode())
        except (ssl.SSLError, ValueError) as e:
            raise TlsFailure(f"cannot load the mesh roots: {e}") from e
        _load_chain(ctx, self.chain_pem, self.key_pem)
        ctx.set_alpn_protocols([ALPN])


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("hbone-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem.rstrip(b"\n") + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as e:
        raise TlsFailure(f"cannot load the certificate and key: {e.reason or e}") from e
    finally:
        os.close(fd)


def peer_certificate_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE identity of the peer's (already verified) leaf certificate."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise TlsFailure("the peer presented no certificate")
    try:
        return peer_identity(x509.load_der_x509_certificate(der))
    except (IdentityError, ValueError) as e:
        raise TlsFailure(f"the peer's certificate carries no usable SPIFFE identity: {e}") from e


def describe_tls_error(exc: BaseException) -> str:
    """A one-line reason for a failed handshake, as OpenSSL states it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason.lower().replace("_", " ") if exc.reason else str(exc)
    if isinstance(exc, TimeoutError):
        return str(exc) or "handshake timed out"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return "connection closed during the handshake"
    return str(exc) or type(exc).__name__
