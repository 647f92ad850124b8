"""The mesh certificate authority: a self-signed ECDSA P-256 root that signs workload CSRs.

Issued leaves follow Istio's shape so that real peers accept them: an empty
subject, the SPIFFE ID as the one (critical) URI SAN, ECDSA P-256 keys,
serverAuth + clientAuth, a default lifetime of 24 hours.

Time is an argument (``now``), never read from the clock inside signing, so
tests and the CA service decide what "now" is.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.identity.errors import (
    CaKeyMismatch,
    CsrIdentityMismatch,
    InvalidCaMaterial,
    InvalidCsr,
    InvalidSpiffeId,
    InvalidTtl,
    TrustDomainMismatch,
)
from mesh.identity.spiffe import SpiffeId, validate_trust_domain

DEFAULT_TTL = timedelta(hours=24)
"""Lifetime of a workload certificate unless the caller asks otherwise (Istio's default)."""
MAX_TTL = timedelta(days=90)
"""The longest workload certificate lifetime the CA grants (Istio's default maximum)."""
DEFAULT_ROOT_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=1)
"""How far leaves are backdated, so a peer whose clock is slightly behind accepts them."""

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware (UTC), got naive {now!r}")
    return now.astimezone(UTC)


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def _key_description(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    size = getattr(key, "key_size", None)
    name = type(key).__name__.removeprefix("_").removesuffix("PublicKey") or "unknown"
    return f"{name}-{size}" if size else name


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedCertificate:
    """A workload certificate as the CA hands it out.

    ``chain_pem`` is the leaf followed by any intermediates (none for a
    self-signed root); ``root_pem`` is the trust anchor, kept apart so that it
    is never sent in a TLS chain by mistake.
    """

    chain_pem: bytes
    root_pem: bytes
    identity: SpiffeId
    serial_number: int
    not_before: datetime
    not_after: datetime


class CertificateAuthority:
    """A root certificate and its key, able to sign workload CSRs.

    Build it with :meth:`create`, :meth:`load` or :meth:`load_or_create`; the
    constructor trusts that ``key`` belongs to ``cert`` and does not check it.
    """

    def __init__(
        self, *, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, trust_domain: str
    ) -> None:
        self._cert = cert
        self._key = key
        self._trust_domain = validate_trust_domain(trust_domain)
        self._root_pem = cert.public_bytes(serialization.Encoding.PEM)
        try:
            ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())

    @property
    def trust_domain(self) -> str:
        """The trust domain whose identities this CA issues."""
        return self._trust_domain

    @property
    def root_pem(self) -> bytes:
        """The root certificate in PEM, to distribute as the mesh trust anchor."""
        return self._root_pem

    @property
    def root_certificate(self) -> x509.Certificate:
        """The parsed root certificate."""
        return self._cert

    @classmethod
    def create(
        cls,
        trust_domain: str,
        *,
        now: datetime | None = None,
        validity: timedelta = DEFAULT_ROOT_VALIDITY,
    ) -> CertificateAuthority:
        """Make a new self-signed root (ECDSA P-256, subject ``O=<trust_domain>``).

        ``now`` defaults to the current time; it is the root's ``not_before``.
        """
        validate_trust_domain(trust_domain)
        now = _utc(now)
        if validity <= timedelta(0):
            raise ValueError(f"root validity must be positive, got {validity}")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert=cert, key=key, trust_domain=trust_domain)

    @classmethod
    def load(
        cls, cert_pem: bytes, key_pem: bytes, *, trust_domain: str | None = None
    ) -> CertificateAuthority:
        """Load a root from PEM. The trust domain defaults to the root's ``O=`` attribute.

        Raises :class:`InvalidCaMaterial` if either part cannot be parsed or the
        certificate is not a CA, and :class:`CaKeyMismatch` if the key is not the
        certificate's.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise InvalidCaMaterial(f"the root certificate is not a PEM certificate: {e}") from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise InvalidCaMaterial(
                f"the root key is not an unencrypted PEM private key: {e}"
            ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not _is_p256(key):
            raise InvalidCaMaterial(
                f"the root key is {_key_description(key.public_key())}; only ECDSA P-256 is "
                "supported"
            )
        der = serialization.Encoding.DER
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
            raise CaKeyMismatch(f"certificate serial {cert.serial_number:x}")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            is_ca = constraints.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise InvalidCaMaterial(
                "the certificate is not a CA certificate (BasicConstraints CA:TRUE missing)"
            )
        try:
            usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(
                x509.KeyUsage
            ).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise InvalidCaMaterial("the certificate's KeyUsage does not allow keyCertSign")
        if trust_domain is None:
            orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
            if len(orgs) != 1:
                raise InvalidCaMaterial(
                    "cannot tell the trust domain: the root subject has no single O= "
                    "attribute; pass trust_domain explicitly"
                )
            trust_domain = str(orgs[0].value)
        try:
            validate_trust_domain(trust_domain)
        except InvalidSpiffeId as e:
            raise InvalidCaMaterial(f"{e} (hint: pass the mesh's trust_domain explicitly)") from e
        return cls(cert=cert, key=key, trust_domain=trust_domain)

    @classmethod
    def load_or_create(
        cls, directory: Path, trust_domain: str, *, now: datetime | None = None
    ) -> CertificateAuthority:
        """Load ``root-cert.pem`` / ``root-key.pem`` from ``directory``, or create them.

        A new key is written with mode 0600, atomically, so a crash never leaves a
        half-written key. If only one of the two files exists the CA refuses to
        start rather than silently replacing the mesh root.
        """
        validate_trust_domain(trust_domain)
        cert_path = directory / ROOT_CERT_FILE
        key_path = directory / ROOT_KEY_FILE
        has_cert, has_key = cert_path.exists(), key_path.exists()
        if has_cert and has_key:
            return cls.load(
                cert_path.read_bytes(), key_path.read_bytes(), trust_domain=trust_domain
            )
        if has_cert or has_key:
            present, missing = (cert_path, key_path) if has_cert else (key_path, cert_path)
            raise InvalidCaMaterial(
                f"{present} exists but {missing} does not (hint: restore the missing file, "
                "or remove both to create a new root; every workload will then need new "
                "certificates)"
            )
        ca = cls.create(trust_domain, now=now)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Key first: if we crash before the certificate is written, the next start
        # refuses (one file present) instead of pairing a certificate with no key.
        _write_atomically(key_path, ca._private_key_pem(), mode=0o600)
        _write_atomically(cert_path, ca.root_pem, mode=0o644)
        return ca

    def _private_key_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        ttl: timedelta = DEFAULT_TTL,
        *,
        now: datetime,
    ) -> IssuedCertificate:
        """Sign ``csr_pem`` for ``identity``, valid from ``now`` (minus skew) for ``ttl``.

        Refuses a TTL outside (0, MAX_TTL] (:class:`InvalidTtl`), an identity of
        another trust domain (:class:`TrustDomainMismatch`), an unparsable CSR,
        a bad signature or a key other than ECDSA P-256 (:class:`InvalidCsr`),
        and a CSR whose SANs are not exactly ``identity`` as one URI
        (:class:`CsrIdentityMismatch`).
        """
        now = _utc(now)
        if ttl <= timedelta(0) or ttl > MAX_TTL:
            raise InvalidTtl(ttl=ttl, maximum=MAX_TTL)
        if identity.trust_domain != self._trust_domain:
            raise TrustDomainMismatch(
                expected=self._trust_domain, actual=identity.trust_domain, identity=str(identity)
            )
        root_not_after = self._cert.not_valid_after_utc
        if now >= root_not_after:
            raise InvalidCaMaterial(
                f"the root certificate expired at {root_not_after.isoformat()} (hint: rotate "
                "the mesh root)"
            )
        csr = _parse_csr(csr_pem)
        public_key = csr.public_key()
        if not _is_p256(public_key):
            raise InvalidCsr(
                f"the key is {_key_description(public_key)}; only ECDSA P-256 keys are accepted"
            )
        _check_csr_names(csr, identity)

        # A leaf never outlives its root: a chain is only as valid as its shortest link.
        not_after = min(now + ttl, root_not_after)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(
            chain_pem=leaf.public_bytes(serialization.Encoding.PEM),
            root_pem=self._root_pem,
            identity=identity,
            serial_number=leaf.serial_number,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    def issue_serving(
        self,
        dns_names: Sequence[str],
        ip_addresses: Sequence[str] = (),
        ttl: timedelta = DEFAULT_TTL,
        *,
        now: datetime,
    ) -> tuple[bytes, bytes]:
        """A TLS server certificate for the control plane itself: ``(chain_pem, key_pem)``.

        Like istiod's own certificate: DNS (and IP) names, serverAuth only, a
        fresh P-256 key that never leaves the process. Proxies check it
        against the mesh root they already trust.
        """
        now = _utc(now)
        if ttl <= timedelta(0) or ttl > MAX_TTL:
            raise InvalidTtl(ttl=ttl, maximum=MAX_TTL)
        if not dns_names and not ip_addresses:
            raise ValueError("a serving certificate needs at least one DNS name or IP address")
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + ttl, self._cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(self._aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except (ValueError, TypeError) as e:
        raise InvalidCsr(f"not a PEM certificate signing request: {e}") from e
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as e:
        raise InvalidCsr(f"cannot check the signature: {e}") from e
    if not valid:
        raise InvalidCsr("the signature does not verify with the CSR's own key")
    return csr


def _check_csr_names(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> None:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrIdentityMismatch(requested=str(identity), found=[]) from None
    except ValueError as e:
        raise InvalidCsr(f"cannot parse the requested extensions: {e}") from e
    names = [_describe_name(name) for name in san]
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(names) != 1 or uris != [str(identity)]:
        raise CsrIdentityMismatch(requested=str(identity), found=names)


def _describe_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    return type(name).__name__


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` so readers see the old file or the whole new one."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file 0600 already; set the final mode before any byte lands.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    # Make the rename itself durable: without this a power cut can lose the new entry.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
