"""Verifying a peer: chain to our roots, validity at "now", identity, trust domain, real mTLS."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity import (
    CertificateAuthority,
    CertificateExpired,
    CertificateNotYetValid,
    InvalidCertificate,
    IssuedCertificate,
    SpiffeId,
    TrustDomainMismatch,
    UntrustedCertificate,
    check_trust_domain,
    generate_key_and_csr,
    load_pem_chain,
    peer_identity,
    verify_chain,
)
from tests.unit.identity.conftest import T0


def _issue(ca: CertificateAuthority, identity: SpiffeId, now: datetime = T0) -> IssuedCertificate:
    _, csr = generate_key_and_csr(identity)
    return ca.sign_csr(csr, identity, now=now)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class HandMadeCa:
    """A CA built directly with cryptography, to make certificates our CA refuses to make."""

    def __init__(self, name: str, issuer: HandMadeCa | None = None) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
        builder = self._builder(self.key.public_key(), self.name, issuer)
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        signer = issuer.key if issuer else self.key
        self.cert = builder.sign(signer, hashes.SHA256())

    def _builder(
        self, public_key: ec.EllipticCurvePublicKey, subject: x509.Name, issuer: HandMadeCa | None
    ) -> x509.CertificateBuilder:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.name if issuer else subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(T0 - timedelta(days=1))
            .not_valid_after(T0 + timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        )
        if issuer is not None:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
            builder = builder.add_extension(aki, False)
        return builder

    def leaf(
        self,
        names: list[x509.GeneralName] | None,
        eku: list[x509.ObjectIdentifier] | None = None,
    ) -> x509.Certificate:
        public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        builder = self._builder(public_key, x509.Name([]), self)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        if names is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), True)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(eku), False)
        return builder.sign(self.key, hashes.SHA256())


def _uri(value: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(value)


WEB = "spiffe://cluster.local/ns/default/sa/web"


# --- chains ---------------------------------------------------------------------------------


def test_good_chain_passes_and_names_the_peer(ca: CertificateAuthority, identity: SpiffeId) -> None:
    issued = _issue(ca, identity)
    for purpose in ("client", "server"):
        leaf = verify_chain(issued.chain_pem, ca.root_pem, T0, purpose=purpose)
        assert peer_identity(leaf) == identity
    # Also from parsed certificates, as a TLS stack hands them over.
    leaf = verify_chain(load_pem_chain(issued.chain_pem), load_pem_chain(ca.root_pem), T0)
    assert peer_identity(leaf) == identity


def test_expired_certificate_is_reported_with_its_dates(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    issued = _issue(ca, identity)
    verify_chain(issued.chain_pem, ca.root_pem, issued.not_after)  # last valid instant
    later = issued.not_after + timedelta(seconds=1)
    with pytest.raises(CertificateExpired) as excinfo:
        verify_chain(issued.chain_pem, ca.root_pem, later)
    message = str(excinfo.value)
    assert "2026-03-02T12:00:00+00:00" in message  # not_after
    assert "2026-03-02T12:00:01+00:00" in message  # now
    assert str(identity) in message
    assert excinfo.value.not_after == issued.not_after


def test_not_yet_valid_certificate_is_reported_with_its_dates(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    issued = _issue(ca, identity)
    early = issued.not_before - timedelta(seconds=1)
    with pytest.raises(CertificateNotYetValid) as excinfo:
        verify_chain(issued.chain_pem, ca.root_pem, early)
    assert "valid from 2026-03-01T11:59:00+00:00" in str(excinfo.value)
    assert "now is 2026-03-01T11:58:59+00:00" in str(excinfo.value)


def test_certificate_from_another_ca_is_untrusted(
    ca: CertificateAuthority, other_ca: CertificateAuthority, identity: SpiffeId
) -> None:
    foreign = _issue(other_ca, identity)
    with pytest.raises(UntrustedCertificate) as excinfo:
        verify_chain(foreign.chain_pem, ca.root_pem, T0)
    assert str(identity) in str(excinfo.value)
    assert "another CA" in str(excinfo.value)


def test_a_bundle_of_roots_trusts_each_of_them(
    ca: CertificateAuthority, other_ca: CertificateAuthority, identity: SpiffeId
) -> None:
    # During a root rotation both roots are distributed; both kinds of leaf must pass.
    bundle = ca.root_pem + other_ca.root_pem
    for issuer in (ca, other_ca):
        verify_chain(_issue(issuer, identity).chain_pem, bundle, T0)


def test_a_chain_through_an_intermediate_verifies_only_with_the_intermediate() -> None:
    root = HandMadeCa("root")
    intermediate = HandMadeCa("intermediate", issuer=root)
    leaf = intermediate.leaf([_uri(WEB)])
    assert peer_identity(verify_chain([leaf, intermediate.cert], [root.cert], T0)).namespace == (
        "default"
    )
    with pytest.raises(UntrustedCertificate):
        verify_chain([leaf], [root.cert], T0)


def test_a_ca_certificate_is_not_accepted_as_a_peer(ca: CertificateAuthority) -> None:
    with pytest.raises(UntrustedCertificate):
        verify_chain(ca.root_pem, ca.root_pem, T0)


def test_extended_key_usage_must_fit_the_purpose() -> None:
    root = HandMadeCa("root")
    server_only = root.leaf([_uri(WEB)], eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    verify_chain([server_only], [root.cert], T0, purpose="server")
    with pytest.raises(UntrustedCertificate, match="not meant for client authentication"):
        verify_chain([server_only], [root.cert], T0, purpose="client")


def test_no_roots_means_nothing_is_trusted(ca: CertificateAuthority, identity: SpiffeId) -> None:
    with pytest.raises(UntrustedCertificate, match="no trusted root"):
        verify_chain(_issue(ca, identity).chain_pem, [], T0)


def test_empty_or_garbage_chains_are_invalid(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidCertificate, match="no certificate"):
        verify_chain([], ca.root_pem, T0)
    for garbage in (
        b"",
        b"junk",
        b"-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
    ):
        with pytest.raises(InvalidCertificate):
            load_pem_chain(garbage)


# --- identity -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (None, "no subject alternative name"),
        ([x509.DNSName("web.default.svc")], "found 0"),
        ([_uri(WEB), _uri("spiffe://cluster.local/ns/default/sa/db")], "found 2"),
        ([_uri("https://web.default.svc/")], "not a mesh SPIFFE ID"),
        ([_uri("spiffe://cluster.local/workload/web")], "not a mesh SPIFFE ID"),
    ],
)
def test_peer_identity_needs_exactly_one_mesh_uri_san(
    names: list[x509.GeneralName] | None, message: str
) -> None:
    cert = HandMadeCa("root").leaf(names)
    with pytest.raises(InvalidCertificate, match=message):
        peer_identity(cert)


def test_other_san_types_beside_the_uri_are_ignored() -> None:
    cert = HandMadeCa("root").leaf([x509.DNSName("web.default.svc"), _uri(WEB)])
    assert str(peer_identity(cert)) == WEB


def test_trust_domain_check(identity: SpiffeId) -> None:
    check_trust_domain(identity, "cluster.local")
    with pytest.raises(TrustDomainMismatch) as excinfo:
        check_trust_domain(identity, "example.org")
    assert "'example.org'" in str(excinfo.value)
    assert "'cluster.local'" in str(excinfo.value)
    assert excinfo.value.identity == str(identity)


def test_a_peer_of_another_trust_domain_verifies_but_fails_the_domain_check(
    identity: SpiffeId,
) -> None:
    foreign_ca = CertificateAuthority.create("example.org", now=T0 - timedelta(days=1))
    foreign_id = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
    issued = _issue(foreign_ca, foreign_id)
    leaf = verify_chain(issued.chain_pem, foreign_ca.root_pem, T0)  # federated root
    with pytest.raises(TrustDomainMismatch):
        check_trust_domain(peer_identity(leaf), identity.trust_domain)


# --- real mTLS ------------------------------------------------------------------------------


def _write_credentials(directory: Path, name: str, key_pem: bytes, chain_pem: bytes) -> Path:
    (directory / f"{name}-key.pem").write_bytes(key_pem)
    (directory / f"{name}-chain.pem").write_bytes(chain_pem)
    return directory / name


def _context(side: ssl._SSLMethod, creds: Path, root_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(f"{creds}-chain.pem", f"{creds}-key.pem")
    ctx.load_verify_locations(cadata=root_pem.decode())
    ctx.verify_mode = ssl.CERT_REQUIRED  # client certificate required, as in HBONE
    ctx.set_alpn_protocols(["h2"])
    if side == ssl.PROTOCOL_TLS_CLIENT:
        # SPIFFE leaves carry no DNS name; the identity is checked with peer_identity.
        ctx.check_hostname = False
    return ctx


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[dict[str, object], dict[str, object]]:
    """Run a TLS handshake over a socketpair; return what each side saw of the other."""
    server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(5)
    client_sock.settimeout(5)
    server: dict[str, object] = {}
    client: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                server["peer_der"] = tls.getpeercert(binary_form=True)
                server["version"] = tls.version()
                server["alpn"] = tls.selected_alpn_protocol()
                server["data"] = tls.recv(4)
                tls.sendall(b"pong")
        except (ssl.SSLError, OSError) as e:
            server["error"] = e
        finally:
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock) as tls:
            client["peer_der"] = tls.getpeercert(binary_form=True)
            tls.sendall(b"ping")
            client["data"] = tls.recv(4)
    except (ssl.SSLError, OSError) as e:
        client["error"] = e
    finally:
        client_sock.close()
        thread.join(timeout=5)
    return server, client


def test_real_tls13_mutual_authentication_with_mesh_certificates(tmp_path: Path) -> None:
    # The TLS stack checks dates against the real clock, so this CA lives in the present.
    now = datetime.now(UTC)
    mesh_ca = CertificateAuthority.create("cluster.local", now=now - timedelta(hours=1))
    client_id = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    server_id = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/httpbin")
    creds = {}
    for name, ident in (("client", client_id), ("server", server_id)):
        key_pem, csr = generate_key_and_csr(ident)
        chain = mesh_ca.sign_csr(csr, ident, now=now).chain_pem
        creds[name] = _write_credentials(tmp_path, name, key_pem, chain)

    server, client = _handshake(
        _context(ssl.PROTOCOL_TLS_SERVER, creds["server"], mesh_ca.root_pem),
        _context(ssl.PROTOCOL_TLS_CLIENT, creds["client"], mesh_ca.root_pem),
    )
    assert "error" not in server and "error" not in client, (server, client)
    assert server["version"] == "TLSv1.3"
    assert server["alpn"] == "h2"
    assert (server["data"], client["data"]) == (b"ping", b"pong")

    assert isinstance(server["peer_der"], bytes) and isinstance(client["peer_der"], bytes)
    seen_by_server = x509.load_der_x509_certificate(server["peer_der"])
    seen_by_client = x509.load_der_x509_certificate(client["peer_der"])
    assert peer_identity(verify_chain([seen_by_server], mesh_ca.root_pem, now)) == client_id
    assert (
        peer_identity(verify_chain([seen_by_client], mesh_ca.root_pem, now, purpose="server"))
        == server_id
    )


def test_real_tls_refuses_a_client_from_another_ca(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    mesh_ca = CertificateAuthority.create("cluster.local", now=now - timedelta(hours=1))
    rogue_ca = CertificateAuthority.create("cluster.local", now=now - timedelta(hours=1))
    ident = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep")
    creds = {}
    for name, issuer in (("server", mesh_ca), ("client", rogue_ca)):
        key_pem, csr = generate_key_and_csr(ident)
        creds[name] = _write_credentials(
            tmp_path, name, key_pem, issuer.sign_csr(csr, ident, now=now).chain_pem
        )
    server, client = _handshake(
        _context(ssl.PROTOCOL_TLS_SERVER, creds["server"], mesh_ca.root_pem),
        _context(ssl.PROTOCOL_TLS_CLIENT, creds["client"], mesh_ca.root_pem),
    )
    assert isinstance(server.get("error"), ssl.SSLError), server
    assert "data" not in server
    assert client.get("data") in (None, b"")  # the client never gets an answer
