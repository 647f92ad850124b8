"""The mesh CA root kept in a Kubernetes Secret, so every meshd replica and restart shares it.

The Secret has the shape of Istio's self-signed CA secret: ``istio-ca-secret``
in ``istio-system``, type ``istio.io/ca-root``, with the root certificate in
``ca-cert.pem`` (and ``root-cert.pem``), its key in ``ca-key.pem``, and empty
``cert-chain.pem`` and ``key.pem``. meshd reads the secret if it exists and
creates it otherwise; a replica that loses the creation race loads the winner's
root. A secret that exists but cannot be used is an error, never replaced: a
new root would strand every workload certificate the old one signed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

from mesh.identity import (
    CaKeyMismatch,
    CertificateAuthority,
    InvalidCaMaterial,
    validate_trust_domain,
)

log = logging.getLogger(__name__)

SECRET_TYPE = "istio.io/ca-root"
CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
CERT_CHAIN = "cert-chain.pem"
ROOT_CERT = "root-cert.pem"
PRIVATE_KEY = "key.pem"
REQUEST_TIMEOUT_S = 30.0


class CaSecretError(Exception):
    """The CA secret cannot be read, written or used: meshd must not run a CA."""


def load_or_create_ca_secret(
    api_client: kubernetes.client.ApiClient,
    trust_domain: str,
    *,
    namespace: str = "istio-system",
    name: str = "istio-ca-secret",
) -> CertificateAuthority:
    """The CA whose root is in Secret ``namespace/name``, creating the secret if there is none.

    Blocking: call it from a thread or before the event loop starts. Raises
    :class:`CaSecretError` if the API server refuses or fails, or if the secret
    exists but does not hold a usable root; ``InvalidSpiffeId`` for a bad
    ``trust_domain``.
    """
    validate_trust_domain(trust_domain)
    where = f"secret {namespace}/{name}"
    core = kubernetes.client.CoreV1Api(api_client)
    secret = _read(core, namespace, name, where)
    if secret is not None:
        ca = _load(secret, trust_domain, where)
        log.info("CA root loaded from %s", where)
        return ca
    ca = CertificateAuthority.create(trust_domain)
    body = kubernetes.client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=namespace),
        type=SECRET_TYPE,
        data={
            CA_CERT: _b64(ca.root_pem),
            CA_KEY: _b64(ca._private_key_pem()),
            CERT_CHAIN: "",
            PRIVATE_KEY: "",
            ROOT_CERT: _b64(ca.root_pem),
        },
    )
    try:
        core.create_namespaced_secret(namespace, body, _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status != 409:
            raise CaSecretError(f"cannot create {where}: {_describe(e)}") from e
        # Another replica created it since our read: use its root, so all share one.
        secret = _read(core, namespace, name, where)
        if secret is None:
            raise CaSecretError(
                f"{where} was created by someone else and then deleted before meshd could "
                "read it (hint: is another process managing it?)"
            ) from e
        ca = _load(secret, trust_domain, where)
        log.info("CA root loaded from %s (another meshd created it first)", where)
        return ca
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise CaSecretError(f"cannot create {where}: {type(e).__name__}: {e}") from e
    log.info("CA root created in %s (trust domain %s)", where, trust_domain)
    return ca


def _read(
    core: kubernetes.client.CoreV1Api, namespace: str, name: str, where: str
) -> kubernetes.client.V1Secret | None:
    """The secret, or None if the API server says it does not exist."""
    try:
        return core.read_namespaced_secret(name, namespace, _request_timeout=REQUEST_TIMEOUT_S)
    except ApiException as e:
        if e.status == 404:
            return None
        raise CaSecretError(f"cannot read {where}: {_describe(e)}") from e
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise CaSecretError(f"cannot read {where}: {type(e).__name__}: {e}") from e


def _load(
    secret: kubernetes.client.V1Secret, trust_domain: str, where: str
) -> CertificateAuthority:
    data: dict[str, bytes | str] = secret.data or {}
    pems: dict[str, bytes] = {}
    for key in (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT):
        try:
            pems[key] = base64.b64decode(data.get(key) or "", validate=True)
        except binascii.Error as e:
            raise _unusable(where, f"{key} is not base64: {e}") from e
        if not pems[key] and key in (CA_CERT, CA_KEY):
            raise _unusable(where, f"{key} is missing or empty")
    if pems[CERT_CHAIN].strip() or pems[ROOT_CERT].strip() not in (b"", pems[CA_CERT].strip()):
        raise _unusable(
            where,
            f"it holds an intermediate CA ({CERT_CHAIN}, or a {ROOT_CERT} other than {CA_CERT}); "
            "meshd only runs a self-signed root",
        )
    try:
        return CertificateAuthority.load(pems[CA_CERT], pems[CA_KEY], trust_domain=trust_domain)
    except CaKeyMismatch as e:
        raise _unusable(
            where, f"{CA_KEY} is not the private key of the certificate in {CA_CERT}"
        ) from e
    except InvalidCaMaterial as e:
        raise _unusable(where, e.reason) from e


def _unusable(where: str, what: str) -> CaSecretError:
    return CaSecretError(
        f"{where} is unusable: {what} (hint: restore the secret from a backup, or delete "
        "it to create a new root; every workload will then need new certificates)"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _describe(e: ApiException) -> str:
    """``HTTP 403 Forbidden: <the Status message>``, with a hint where one helps."""
    message = ""
    with contextlib.suppress(ValueError, AttributeError):
        message = str(json.loads(e.body or "{}").get("message", ""))
    text = f"HTTP {e.status} {e.reason}" + (f": {message}" if message else "")
    if e.status in (401, 403):
        text += " (hint: meshd's RBAC must allow get and create on secrets in this namespace)"
    return text
