"""The CA root in a Kubernetes Secret, through the official client, against a local API server.

Each test starts from what a cluster may hold (no secret, Istio's secret, a
broken one, a secret another meshd creates at the same moment, a failing API
server) and checks the CA meshd gets, or the error it stops with, and that a
mesh root already in the cluster is never replaced.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from controlplane.ca_secret import CaSecretError, load_or_create_ca_secret
from controlplane.sources.kubernetes import api_client_from
from mesh.identity import CertificateAuthority
from tests.support.fake_kube import FakeKube

TRUST_DOMAIN = "cluster.local"
NAMESPACE, NAME = "istio-system", "istio-ca-secret"
SECRETS = f"/api/v1/namespaces/{NAMESPACE}/secrets"


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def kubeconfig(kube: FakeKube, tmp_path: Path) -> Path:
    return kube.write_kubeconfig(tmp_path / "kubeconfig")


def load_or_create(kubeconfig: Path) -> CertificateAuthority:
    """One meshd start: its own client, closed afterwards."""
    with contextlib.closing(api_client_from(str(kubeconfig))) as api:
        return load_or_create_ca_secret(api, TRUST_DOMAIN)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def istio_secret(cert_pem: bytes, key_pem: bytes, **data: str) -> dict[str, Any]:
    """``istio-ca-secret`` as istiod's self-signed CA writes it (``kubectl get -o json``)."""
    return {
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "type": "istio.io/ca-root",
        "data": {
            "ca-cert.pem": b64(cert_pem),
            "ca-key.pem": b64(key_pem),
            "cert-chain.pem": "",
            "key.pem": "",
            "root-cert.pem": "",
            **data,
        },
    }


def key_pem(ca: CertificateAuthority) -> bytes:
    return ca._private_key_pem()


def stored(kube: FakeKube) -> dict[str, Any]:
    return kube.get("secrets", NAME, NAMESPACE)


def calls(kube: FakeKube) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in kube.requests]


GET, POST = ("GET", f"{SECRETS}/{NAME}"), ("POST", SECRETS)


def test_first_start_creates_the_secret_and_a_restart_loads_the_same_root(
    kube: FakeKube, kubeconfig: Path
) -> None:
    ca = load_or_create(kubeconfig)

    secret = stored(kube)
    assert secret["type"] == "istio.io/ca-root"
    data = {key: base64.b64decode(value) for key, value in secret["data"].items()}
    assert set(data) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "key.pem", "root-cert.pem"}
    assert data["ca-cert.pem"] == data["root-cert.pem"] == ca.root_pem
    assert data["cert-chain.pem"] == data["key.pem"] == b""
    cert = x509.load_pem_x509_certificate(data["ca-cert.pem"])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TRUST_DOMAIN
    key = serialization.load_pem_private_key(data["ca-key.pem"], password=None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    assert calls(kube) == [GET, POST]

    restarted = load_or_create(kubeconfig)

    assert restarted.root_pem == ca.root_pem
    assert key_pem(restarted) == key_pem(ca)
    assert restarted.trust_domain == TRUST_DOMAIN
    assert calls(kube) == [GET, POST, GET]
    assert stored(kube) == secret


def test_a_secret_in_istios_format_is_used(kube: FakeKube, kubeconfig: Path) -> None:
    istio = CertificateAuthority.create(TRUST_DOMAIN)
    before = kube.add("secrets", istio_secret(istio.root_pem, key_pem(istio)))

    ca = load_or_create(kubeconfig)

    assert ca.root_pem == istio.root_pem
    assert key_pem(ca) == key_pem(istio)
    assert calls(kube) == [GET]
    assert stored(kube) == before


def rsa_root() -> tuple[bytes, bytes]:
    """A root as istiod's own self-signed CA makes it: RSA 2048, ``O=cluster.local``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pkcs8 = serialization.PrivateFormat.PKCS8
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()
    )


def broken_secret(case: str) -> dict[str, Any]:
    """``istio-ca-secret`` damaged as ``case`` says."""
    ca, other = CertificateAuthority.create(TRUST_DOMAIN), CertificateAuthority.create(TRUST_DOMAIN)
    secret = istio_secret(ca.root_pem, key_pem(ca))
    data = secret["data"]
    if case == "key missing":
        del data["ca-key.pem"]
    elif case == "key empty":
        data["ca-key.pem"] = ""
    elif case == "key of another root":
        data["ca-key.pem"] = b64(key_pem(other))
    elif case == "certificate garbage":
        data["ca-cert.pem"] = b64(b"-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")
    elif case == "istiod's RSA root":
        data["ca-cert.pem"], data["ca-key.pem"] = map(b64, rsa_root())
    elif case == "intermediate":
        data["cert-chain.pem"] = b64(other.root_pem)
    return secret


BROKEN = [
    ("key missing", "is unusable: ca-key.pem is missing or empty"),
    ("key empty", "is unusable: ca-key.pem is missing or empty"),
    ("key of another root", "ca-key.pem is not the private key of the certificate in ca-cert"),
    ("certificate garbage", "the root certificate is not a PEM certificate"),
    ("istiod's RSA root", "the root key is RSA-2048; only ECDSA P-256 is supported"),
    ("intermediate", "is unusable: it holds an intermediate CA"),
]


@pytest.mark.parametrize(("case", "reason"), BROKEN, ids=[case for case, _ in BROKEN])
def test_a_broken_secret_is_an_error_and_never_replaced(
    kube: FakeKube, kubeconfig: Path, case: str, reason: str
) -> None:
    secret = broken_secret(case)
    before = kube.add("secrets", secret)

    with pytest.raises(CaSecretError) as raised:
        load_or_create(kubeconfig)

    message = str(raised.value)
    assert f"secret {NAMESPACE}/{NAME}" in message
    assert reason in message
    assert "hint: restore the secret" in message
    assert stored(kube) == before
    assert calls(kube) == [GET]


def test_losing_the_creation_race_loads_the_winners_root(kube: FakeKube, kubeconfig: Path) -> None:
    winner = CertificateAuthority.create(TRUST_DOMAIN)
    # Another meshd replica creates the secret after our GET (404), before our POST.
    kube.before(
        "POST",
        "secrets",
        lambda: kube.add("secrets", istio_secret(winner.root_pem, key_pem(winner))),
    )

    ca = load_or_create(kubeconfig)

    assert ca.root_pem == winner.root_pem
    assert key_pem(ca) == key_pem(winner)
    assert calls(kube) == [GET, POST, GET]
    assert base64.b64decode(stored(kube)["data"]["ca-cert.pem"]) == winner.root_pem


@pytest.mark.parametrize(
    ("failing", "expected"), [("GET", [GET]), ("POST", [GET, POST])], ids=["GET", "POST"]
)
def test_a_failing_api_server_is_an_error_and_no_ca(
    kube: FakeKube, kubeconfig: Path, failing: str, expected: list[tuple[str, str]]
) -> None:
    kube.before(failing, "secrets", lambda: kube.fail_next(1))

    with pytest.raises(CaSecretError) as raised:
        load_or_create(kubeconfig)

    message = str(raised.value)
    assert f"secret {NAMESPACE}/{NAME}" in message
    assert "HTTP 500 Internal Server Error: Internal error occurred: etcdserver" in message
    assert calls(kube) == expected
    with pytest.raises(KeyError):
        stored(kube)


def test_an_unreachable_api_server_is_an_error(tmp_path: Path) -> None:
    with FakeKube() as gone:
        kubeconfig = gone.write_kubeconfig(tmp_path / "kubeconfig")
    # Stopped: nothing listens at its address any more.

    with pytest.raises(CaSecretError, match=f"cannot read secret {NAMESPACE}/{NAME}"):
        load_or_create(kubeconfig)
