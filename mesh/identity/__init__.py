"""SPIFFE workload identity and the certificates that prove it.

Owns: the ``SpiffeId`` value (``spiffe://<td>/ns/<ns>/sa/<sa>``), the mesh CA
(a self-signed ECDSA P-256 root that signs workload CSRs), key and CSR
generation for workloads, verification of a peer's chain and identity, and the
per-node certificate store with its renewal schedule (renew at half life, back
off on failure, never serve an expired certificate).

May import: the standard library and ``cryptography`` only; nothing else from
this repository.

Modules: ``spiffe`` (IDs), ``ca`` (signing), ``csr`` (workload keys),
``verify`` (chains and peers), ``store`` (lifecycle core and its asyncio
driver), ``errors``.
"""

from mesh.identity.ca import (
    DEFAULT_TTL,
    MAX_TTL,
    CertificateAuthority,
    IssuedCertificate,
)
from mesh.identity.csr import generate_key_and_csr
from mesh.identity.errors import (
    CaKeyMismatch,
    CertificateExpired,
    CertificateNotYetValid,
    CertificateUnavailable,
    CsrIdentityMismatch,
    IdentityError,
    InvalidCaMaterial,
    InvalidCertificate,
    InvalidCsr,
    InvalidSpiffeId,
    InvalidTtl,
    TrustDomainMismatch,
    UntrustedCertificate,
)
from mesh.identity.spiffe import SpiffeId, validate_trust_domain
from mesh.identity.store import (
    CertificateRefresher,
    CertificateStore,
    CertState,
    CertStatus,
    Clock,
    RenewalPolicy,
    SystemClock,
    WorkloadCertificate,
)
from mesh.identity.verify import check_trust_domain, load_pem_chain, peer_identity, verify_chain

__all__ = [
    "DEFAULT_TTL",
    "MAX_TTL",
    "CaKeyMismatch",
    "CertState",
    "CertStatus",
    "CertificateAuthority",
    "CertificateExpired",
    "CertificateNotYetValid",
    "CertificateRefresher",
    "CertificateStore",
    "CertificateUnavailable",
    "Clock",
    "CsrIdentityMismatch",
    "IdentityError",
    "InvalidCaMaterial",
    "InvalidCertificate",
    "InvalidCsr",
    "InvalidSpiffeId",
    "InvalidTtl",
    "IssuedCertificate",
    "RenewalPolicy",
    "SpiffeId",
    "SystemClock",
    "TrustDomainMismatch",
    "UntrustedCertificate",
    "WorkloadCertificate",
    "check_trust_domain",
    "generate_key_and_csr",
    "load_pem_chain",
    "peer_identity",
    "validate_trust_domain",
    "verify_chain",
]
