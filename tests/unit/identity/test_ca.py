"""The mesh CA: its root on disk, and what it will and will not sign."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity import (
    DEFAULT_TTL,
    MAX_TTL,
    CaKeyMismatch,
    CertificateAuthority,
    CsrIdentityMismatch,
    InvalidCaMaterial,
    InvalidCsr,
    InvalidTtl,
    SpiffeId,
    TrustDomainMismatch,
    generate_key_and_csr,
    peer_identity,
    verify_chain,
)
from tests.unit.identity.conftest import T0


def _csr(names: list[x509.GeneralName] | None, key: object = None) -> bytes:
    """A CSR with the given SANs (None: no SAN extension at all)."""
    signing_key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    assert isinstance(signing_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _uri(identity: SpiffeId | str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(str(identity))


def _leaf(issued_chain: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued_chain)


# --- the root -------------------------------------------------------------------------------


def test_new_root_is_a_p256_ca_named_after_the_trust_domain(ca: CertificateAuthority) -> None:
    root = x509.load_pem_x509_certificate(ca.root_pem)
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "cluster.local"
    )
    assert root.issuer == root.subject
    public_key = root.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert root.not_valid_after_utc - root.not_valid_before_utc == timedelta(days=3650)
    assert ca.trust_domain == "cluster.local"


def test_load_or_create_creates_once_then_loads_the_same_root(
    tmp_path: Path, identity: SpiffeId
) -> None:
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(directory, "cluster.local", now=T0)
    key_file = directory / "root-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert (directory / "root-cert.pem").read_bytes() == first.root_pem
    assert sorted(p.name for p in directory.iterdir()) == ["root-cert.pem", "root-key.pem"]

    second = CertificateAuthority.load_or_create(directory, "cluster.local", now=T0)
    assert second.root_pem == first.root_pem
    # The reloaded CA really holds the key: what it signs verifies to the first root.
    _, csr = generate_key_and_csr(identity)
    issued = second.sign_csr(csr, identity, now=T0)
    assert peer_identity(verify_chain(issued.chain_pem, first.root_pem, T0)) == identity


def test_load_from_pem_round_trip(tmp_path: Path, identity: SpiffeId) -> None:
    created = CertificateAuthority.load_or_create(tmp_path, "example.org", now=T0)
    loaded = CertificateAuthority.load(
        (tmp_path / "root-cert.pem").read_bytes(), (tmp_path / "root-key.pem").read_bytes()
    )
    assert loaded.trust_domain == "example.org"  # read from the root's O=
    assert loaded.root_pem == created.root_pem
    other = SpiffeId(trust_domain="example.org", namespace="ns", service_account="sa")
    _, csr = generate_key_and_csr(other)
    verify_chain(loaded.sign_csr(csr, other, now=T0).chain_pem, created.root_pem, T0)


def test_a_key_from_another_ca_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "a", "cluster.local", now=T0)
    CertificateAuthority.load_or_create(tmp_path / "b", "cluster.local", now=T0)
    (tmp_path / "a" / "root-key.pem").write_bytes((tmp_path / "b" / "root-key.pem").read_bytes())
    with pytest.raises(CaKeyMismatch, match="does not match"):
        CertificateAuthority.load_or_create(tmp_path / "a", "cluster.local", now=T0)


def test_a_lone_cert_or_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, "cluster.local", now=T0)
    cert = (tmp_path / "root-cert.pem").read_bytes()
    (tmp_path / "root-key.pem").unlink()
    with pytest.raises(InvalidCaMaterial, match=r"root-key\.pem does not"):
        CertificateAuthority.load_or_create(tmp_path, "cluster.local", now=T0)
    assert (tmp_path / "root-cert.pem").read_bytes() == cert  # untouched


def test_a_leaf_certificate_cannot_be_loaded_as_the_root(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    key_pem, csr = generate_key_and_csr(identity)
    issued = ca.sign_csr(csr, identity, now=T0)
    with pytest.raises(InvalidCaMaterial, match="not a CA certificate"):
        CertificateAuthority.load(issued.chain_pem, key_pem, trust_domain="cluster.local")


@pytest.mark.parametrize(
    ("cert_pem", "key_pem", "message"),
    [
        (b"not a certificate", b"", "not a PEM certificate"),
        (None, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n", "root key"),
    ],
)
def test_unparsable_ca_material_is_refused(
    ca: CertificateAuthority, cert_pem: bytes | None, key_pem: bytes, message: str
) -> None:
    with pytest.raises(InvalidCaMaterial, match=message):
        CertificateAuthority.load(cert_pem or ca.root_pem, key_pem)


# --- signing --------------------------------------------------------------------------------


def test_issued_leaf_verifies_to_the_root_and_carries_only_the_identity(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    _, csr = generate_key_and_csr(identity)
    issued = ca.sign_csr(csr, identity, now=T0)
    assert issued.identity == identity
    assert issued.root_pem == ca.root_pem
    leaf = verify_chain(issued.chain_pem, ca.root_pem, T0)
    assert peer_identity(leaf) == identity

    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # RFC 5280: an empty subject makes the SAN critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(identity))]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root = x509.load_pem_x509_certificate(ca.root_pem)
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert 0 < issued.serial_number < 2**159
    assert issued.serial_number == leaf.serial_number


def test_default_lifetime_is_24_hours_backdated_one_minute(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    _, csr = generate_key_and_csr(identity)
    issued = ca.sign_csr(csr, identity, now=T0)
    assert timedelta(hours=24) == DEFAULT_TTL
    assert issued.not_after == T0 + timedelta(hours=24)
    assert issued.not_before == T0 - timedelta(minutes=1)
    leaf = _leaf(issued.chain_pem)
    assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (
        issued.not_before,
        issued.not_after,
    )


def test_requested_ttl_is_honoured_up_to_the_maximum(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    _, csr = generate_key_and_csr(identity)
    assert ca.sign_csr(csr, identity, timedelta(hours=1), now=T0).not_after == T0 + timedelta(
        hours=1
    )
    assert ca.sign_csr(csr, identity, MAX_TTL, now=T0).not_after == T0 + timedelta(days=90)


@pytest.mark.parametrize(
    "ttl", [MAX_TTL + timedelta(seconds=1), timedelta(0), timedelta(seconds=-5)]
)
def test_ttl_out_of_range_is_refused_saying_the_maximum(
    ca: CertificateAuthority, identity: SpiffeId, ttl: timedelta
) -> None:
    _, csr = generate_key_and_csr(identity)
    with pytest.raises(InvalidTtl, match="at most 7776000s"):
        ca.sign_csr(csr, identity, ttl, now=T0)


def test_serial_numbers_are_unique(ca: CertificateAuthority, identity: SpiffeId) -> None:
    _, csr = generate_key_and_csr(identity)
    serials = {ca.sign_csr(csr, identity, now=T0).serial_number for _ in range(20)}
    assert len(serials) == 20


def test_a_leaf_never_outlives_the_root(identity: SpiffeId) -> None:
    short = CertificateAuthority.create("cluster.local", now=T0, validity=timedelta(days=2))
    _, csr = generate_key_and_csr(identity)
    issued = short.sign_csr(csr, identity, MAX_TTL, now=T0 + timedelta(days=1))
    assert issued.not_after == T0 + timedelta(days=2)


def test_an_expired_root_signs_nothing(identity: SpiffeId) -> None:
    old = CertificateAuthority.create("cluster.local", now=T0, validity=timedelta(days=1))
    _, csr = generate_key_and_csr(identity)
    with pytest.raises(InvalidCaMaterial, match="expired"):
        old.sign_csr(csr, identity, now=T0 + timedelta(days=2))


def test_identity_of_another_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    foreign = SpiffeId.parse("spiffe://example.org/ns/default/sa/web")
    _, csr = generate_key_and_csr(foreign)
    with pytest.raises(TrustDomainMismatch) as excinfo:
        ca.sign_csr(csr, foreign, now=T0)
    assert "'example.org'" in str(excinfo.value)
    assert "'cluster.local'" in str(excinfo.value)


def test_csr_for_another_identity_is_refused_naming_both(
    ca: CertificateAuthority, identity: SpiffeId
) -> None:
    other = SpiffeId.parse("spiffe://cluster.local/ns/kube-system/sa/admin")
    _, csr = generate_key_and_csr(other)
    with pytest.raises(CsrIdentityMismatch) as excinfo:
        ca.sign_csr(csr, identity, now=T0)
    assert str(identity) in str(excinfo.value)
    assert str(other) in str(excinfo.value)


@pytest.mark.parametrize(
    "names",
    [
        None,
        [x509.DNSName("web.default.svc.cluster.local")],
        [
            _uri("spiffe://cluster.local/ns/default/sa/web"),
            _uri("spiffe://cluster.local/ns/a/sa/b"),
        ],
        [_uri("spiffe://cluster.local/ns/default/sa/web"), x509.DNSName("evil.example.com")],
        [_uri("https://cluster.local/ns/default/sa/web")],
    ],
    ids=["no-san", "dns-san", "two-uris", "uri-plus-dns", "other-uri"],
)
def test_csr_must_ask_for_exactly_the_identity(
    ca: CertificateAuthority, identity: SpiffeId, names: list[x509.GeneralName] | None
) -> None:
    with pytest.raises(CsrIdentityMismatch, match="exactly one URI SAN"):
        ca.sign_csr(_csr(names), identity, now=T0)


def test_csr_with_an_rsa_key_is_refused(ca: CertificateAuthority, identity: SpiffeId) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidCsr, match="only ECDSA P-256") as excinfo:
        ca.sign_csr(_csr([_uri(identity)], rsa_key), identity, now=T0)
    assert "RSA-2048" in str(excinfo.value)
    assert not isinstance(excinfo.value, CsrIdentityMismatch)


def test_csr_with_a_p384_key_is_refused(ca: CertificateAuthority, identity: SpiffeId) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(InvalidCsr, match="secp384r1"):
        ca.sign_csr(_csr([_uri(identity)], p384), identity, now=T0)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"hello",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_garbage_csr_is_refused(
    ca: CertificateAuthority, identity: SpiffeId, garbage: bytes
) -> None:
    with pytest.raises(InvalidCsr, match="not a PEM certificate signing request"):
        ca.sign_csr(garbage, identity, now=T0)


def test_csr_altered_after_signing_is_refused(ca: CertificateAuthority) -> None:
    # Someone edits a CSR for sa/web into one for sa/wex without the key: the
    # signature no longer covers the content, so the CA must not trust the SAN.
    web = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
    wex = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/wex")
    _, csr_pem = generate_key_and_csr(web)
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    assert der.count(b"sa/web") == 1
    forged = x509.load_der_x509_csr(der.replace(b"sa/web", b"sa/wex"))
    with pytest.raises(InvalidCsr, match="signature"):
        ca.sign_csr(forged.public_bytes(serialization.Encoding.PEM), wex, now=T0)


def test_naive_time_is_refused(ca: CertificateAuthority, identity: SpiffeId) -> None:
    _, csr = generate_key_and_csr(identity)
    with pytest.raises(ValueError, match="timezone-aware"):
        ca.sign_csr(csr, identity, now=T0.replace(tzinfo=None))
