"""Workload side of issuance: a fresh ECDSA P-256 key and a CSR asking for one identity.

ztunnel calls this for every workload identity it serves and sends the CSR to
the CA; the private key never leaves the node.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity.spiffe import SpiffeId


def generate_key_and_csr(identity: SpiffeId) -> tuple[bytes, bytes]:
    """Return ``(private_key_pem, csr_pem)`` for ``identity``.

    The key is ECDSA P-256 (PKCS#8, unencrypted PEM; keep it in memory or in a
    0600 file). The CSR has an empty subject and the SPIFFE ID as its single
    URI SAN, which is exactly what :meth:`CertificateAuthority.sign_csr`
    accepts.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)
