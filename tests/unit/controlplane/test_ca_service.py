"""The CA service end to end: meshd's servicer and the node agent's client over real gRPC.

Every test starts a grpc.aio server on loopback and talks to it with
:class:`mesh.caclient.CaClient` (or, to send what our client never would, the
generated stub). The world is two nodes: ``node-a`` runs ``default/web``,
``node-b`` runs ``data/db``; each node agent holds its own token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import uvloop
from cryptography import x509
from google.protobuf import struct_pb2

from controlplane.ca_service import (
    CaService,
    NodeTokenAuthenticator,
    TokenReviewAuthenticator,
    serve_ca,
)
from controlplane.state import PodInfo, SourceState
from mesh.caclient import CREATE_CERTIFICATE, CaClient, CaError, CaResponseError
from mesh.identity import (
    CertificateAuthority,
    CertificateRefresher,
    CertificateStore,
    SpiffeId,
    SystemClock,
    WorkloadCertificate,
    generate_key_and_csr,
    load_pem_chain,
    peer_identity,
    verify_chain,
)
from mesh.proto.istio.ca import ca_pb2

T = TypeVar("T")

WEB = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/web")
DB = SpiffeId.parse("spiffe://cluster.local/ns/data/sa/db")
TOKENS = {"token-of-node-a": "node-a", "token-of-node-b": "node-b"}
STATE = SourceState(
    pods=(
        PodInfo(
            uid="u1", name="web-1", namespace="default", node="node-a", ip="10.0.1.2",
            service_account="web",
        ),
        PodInfo(
            uid="u2", name="db-1", namespace="data", node="node-b", ip="10.0.2.2",
            service_account="db",
        ),
    )
)  # fmt: skip


def run(body: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 10) -> T:
    """Run a test body on uvloop, as the programs do, with a deadline."""

    async def guarded() -> T:
        async with asyncio.timeout(timeout_s):
            return await body()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(guarded())


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("cluster.local", now=datetime.now(UTC) - timedelta(days=1))


class World:
    """meshd's current view, replaced whole as a source would; the service reads it per call."""

    def __init__(self, state: SourceState = STATE) -> None:
        self.state = state

    def __call__(self) -> SourceState:
        return self.state


class FixedClock:
    """The CA's clock: a whole second shortly before now, so certificate dates are exact."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@asynccontextmanager
async def serving(service: CaService) -> AsyncIterator[str]:
    """A CA server on a loopback port for the duration of the block; yields its target."""
    server, port = await serve_ca(service, "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@asynccontextmanager
async def client(target: str, token: str) -> AsyncIterator[CaClient]:
    ca_client = CaClient(target, token, timeout_s=5)
    try:
        yield ca_client
    finally:
        await ca_client.close()


def node_service(
    ca: CertificateAuthority, world: World | None = None, clock: FixedClock | None = None
) -> CaService:
    return CaService(
        ca,
        NodeTokenAuthenticator(lambda: TOKENS),
        world if world is not None else World(),
        clock=clock if clock is not None else FixedClock(),
    )


async def fetch(
    service: CaService, token: str, identity: SpiffeId, ttl: timedelta | None = None
) -> WorkloadCertificate:
    async with serving(service) as target, client(target, token) as c:
        return await c.fetch(identity, ttl)


def refused(
    service: CaService, token: str, identity: SpiffeId, ttl: timedelta | None = None
) -> CaError:
    with pytest.raises(CaError) as caught:
        run(lambda: fetch(service, token, identity, ttl))
    return caught.value


async def raw_call(
    target: str,
    *,
    csr: str,
    token: str | None = "token-of-node-a",
    impersonate: str | None = None,
    validity_s: int = 0,
) -> ca_pb2.IstioCertificateResponse:
    """Send a hand-built request (generated messages): what our client would never send."""
    metadata = struct_pb2.Struct()
    if impersonate is not None:
        metadata.update({"ImpersonatedIdentity": impersonate})
    request = ca_pb2.IstioCertificateRequest(
        csr=csr, validity_duration=validity_s, metadata=metadata
    )
    auth = (("authorization", f"Bearer {token}"),) if token is not None else ()
    async with grpc.aio.insecure_channel(target) as channel:
        # The method by hand, not the generated stub class: under the mypy strict override for
        # mesh.*, calling the untyped ca_pb2_grpc stub is flagged from every module.
        create = channel.unary_unary(
            CREATE_CERTIFICATE,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )
        response: ca_pb2.IstioCertificateResponse = await create(request, metadata=auth, timeout=5)
        return response


def raw_refused(service: CaService, **kwargs: Any) -> grpc.aio.AioRpcError:
    async def body() -> None:
        async with serving(service) as target:
            await raw_call(target, **kwargs)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        run(body)
    return caught.value


def csr_for(identity: SpiffeId) -> str:
    return generate_key_and_csr(identity)[1].decode()


# --- the node agent (meshlab tokens) ------------------------------------------------------


def test_node_agent_obtains_the_identity_of_a_pod_on_its_node(ca: CertificateAuthority) -> None:
    clock = FixedClock()
    cert = run(lambda: fetch(node_service(ca, clock=clock), "token-of-node-a", WEB))

    leaf = verify_chain(cert.chain_pem, ca.root_pem, datetime.now(UTC))
    assert peer_identity(leaf) == WEB == cert.identity
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert cert.root_pem == ca.root_pem
    # Istio's default lifetime, counted from the CA's clock (backdated a minute for skew).
    assert cert.not_after == clock.now + timedelta(hours=24)
    assert cert.not_before == clock.now - timedelta(minutes=1)
    assert b"PRIVATE KEY" in cert.key_pem


def test_the_requested_ttl_is_granted(ca: CertificateAuthority) -> None:
    clock = FixedClock()
    cert = run(
        lambda: fetch(node_service(ca, clock=clock), "token-of-node-b", DB, timedelta(hours=2))
    )
    assert cert.identity == DB
    assert cert.not_after == clock.now + timedelta(hours=2)


def test_an_identity_only_on_another_node_is_denied(ca: CertificateAuthority) -> None:
    error = refused(node_service(ca), "token-of-node-a", DB)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert f"no pod with identity {DB} is scheduled on node node-a" in error.message
    assert "PERMISSION_DENIED" in str(error)


def test_an_unknown_token_is_unauthenticated(ca: CertificateAuthority) -> None:
    error = refused(node_service(ca), "token-of-node-z", WEB)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "not a known node agent token" in error.message


def test_a_missing_token_is_unauthenticated(ca: CertificateAuthority) -> None:
    error = refused(node_service(ca), "", WEB)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "no bearer token" in error.message


def test_a_ttl_above_90_days_is_invalid(ca: CertificateAuthority) -> None:
    error = refused(node_service(ca), "token-of-node-a", WEB, timedelta(days=91))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "7862400s" in error.message and "7776000s" in error.message


def test_a_negative_ttl_is_invalid(ca: CertificateAuthority) -> None:
    error = raw_refused(node_service(ca), csr=csr_for(WEB), impersonate=str(WEB), validity_s=-60)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid certificate TTL -60s" in (error.details() or "")


def test_a_csr_naming_another_identity_is_invalid(ca: CertificateAuthority) -> None:
    """A node may not smuggle another identity in the CSR while impersonating its own pod."""
    error = raw_refused(node_service(ca), csr=csr_for(DB), impersonate=str(WEB))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"exactly one URI SAN {WEB}, it carries: URI:{DB}" in (error.details() or "")


def test_a_garbage_csr_is_invalid(ca: CertificateAuthority) -> None:
    error = raw_refused(node_service(ca), csr="not a csr", impersonate=str(WEB))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a PEM certificate signing request" in (error.details() or "")


def test_a_malformed_impersonated_identity_is_invalid(ca: CertificateAuthority) -> None:
    error = raw_refused(
        node_service(ca), csr=csr_for(WEB), impersonate="spiffe://cluster.local/ns/default"
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid SPIFFE ID" in (error.details() or "")


def test_a_node_agent_must_name_the_identity(ca: CertificateAuthority) -> None:
    error = raw_refused(node_service(ca), csr=csr_for(WEB))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no ImpersonatedIdentity" in (error.details() or "")


def test_an_identity_of_another_trust_domain_is_denied(ca: CertificateAuthority) -> None:
    foreign = SpiffeId.parse("spiffe://other.example/ns/default/sa/web")
    error = refused(node_service(ca), "token-of-node-a", foreign)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert "only issues identities of trust domain 'cluster.local'" in error.message
    assert "'other.example'" in error.message


def test_a_pod_that_moves_off_the_node_is_no_longer_served(ca: CertificateAuthority) -> None:
    world = World()
    service = node_service(ca, world)

    async def body() -> CaError:
        async with serving(service) as target, client(target, "token-of-node-a") as c:
            assert (await c.fetch(WEB)).identity == WEB
            web = world.state.pods[0]
            world.state = replace(world.state, pods=(replace(web, node="node-b"),))
            with pytest.raises(CaError) as caught:
                await c.fetch(WEB)
            return caught.value

    error = run(body)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert f"no pod with identity {WEB} is scheduled on node node-a" in error.message


def test_each_decision_is_logged_once(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controlplane.ca_service")
    service = node_service(ca)

    async def body() -> None:
        async with serving(service) as target, client(target, "token-of-node-a") as c:
            await c.fetch(WEB)
            with pytest.raises(CaError):
                await c.fetch(DB)

    run(body)
    records = [r for r in caplog.records if r.name == "controlplane.ca_service"]
    assert [(r.__dict__["identity"], r.__dict__["outcome"]) for r in records] == [
        (str(WEB), "issued"),
        (str(DB), "PERMISSION_DENIED"),
    ]
    assert all(r.__dict__["caller"] == "node agent of node node-a" for r in records)
    assert "scheduled on node node-a" in records[1].__dict__["reason"]
    assert "token-of-node-a" not in caplog.text


# --- Kubernetes TokenReview ---------------------------------------------------------------


@dataclass(frozen=True)
class Review:
    """What the API server says about a token (the fields our service reads)."""

    authenticated: bool
    username: str | None = None
    service_account: tuple[str, str] | None = None
    node_name: str | None = None
    error: str | None = None


REVIEWS = {
    "ztunnel-on-a": Review(
        authenticated=True,
        username="system:serviceaccount:istio-system:ztunnel",
        service_account=("istio-system", "ztunnel"),
        node_name="node-a",
    ),
    "web-pod": Review(
        authenticated=True,
        username="system:serviceaccount:default:web",
        service_account=("default", "web"),
        node_name="node-a",
    ),
}
EXPIRED = Review(authenticated=False, error="token has expired")


def review_sync(token: str) -> Review:
    return REVIEWS.get(token, EXPIRED)


async def review_async(token: str) -> Review:
    await asyncio.sleep(0)
    return REVIEWS.get(token, EXPIRED)


@pytest.fixture(params=["sync", "async"])
def k8s_service(request: pytest.FixtureRequest, ca: CertificateAuthority) -> CaService:
    review = review_sync if request.param == "sync" else review_async
    return CaService(ca, TokenReviewAuthenticator(review), World(), clock=FixedClock())


def test_token_review_node_agent_obtains_pods_on_its_node(k8s_service: CaService) -> None:
    assert run(lambda: fetch(k8s_service, "ztunnel-on-a", WEB)).identity == WEB
    error = refused(k8s_service, "ztunnel-on-a", DB)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert f"no pod with identity {DB} is scheduled on node node-a" in error.message


def test_token_review_workload_gets_its_own_identity(
    k8s_service: CaService, ca: CertificateAuthority
) -> None:
    async def body() -> ca_pb2.IstioCertificateResponse:
        async with serving(k8s_service) as target:
            return await raw_call(target, csr=csr_for(WEB), token="web-pod")

    response = run(body)
    leaf = load_pem_chain(response.cert_chain[0].encode())[0]
    assert peer_identity(leaf) == WEB
    # As istiod answers: the leaf first and the root as the last element (Istio's
    # ztunnel takes the last element as its trust anchor), no field of our own.
    assert len(response.cert_chain) == 2
    assert response.cert_chain[-1].encode() == ca.root_pem
    assert not response.HasField("root_cert")


def test_token_review_workload_may_not_impersonate(k8s_service: CaService) -> None:
    error = refused(k8s_service, "web-pod", DB)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert f"workload default/web may only obtain its own identity {WEB}" in error.message


def test_token_review_rejected_token_is_unauthenticated(k8s_service: CaService) -> None:
    error = refused(k8s_service, "stale-token", WEB)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "TokenReview rejected the token: token has expired" in error.message


# --- the client: trust nothing, fit the refresher -----------------------------------------


class RogueService(CaService):
    """A CA that answers with a chain its own roots do not vouch for."""

    def __init__(self, ca: CertificateAuthority, claimed_root: bytes) -> None:
        super().__init__(ca, NodeTokenAuthenticator(lambda: TOKENS), World())
        self.claimed_root = claimed_root

    def _sign(
        self, csr: str, identity: SpiffeId, ttl: timedelta
    ) -> ca_pb2.IstioCertificateResponse:
        response = super()._sign(csr, identity, ttl)
        response.cert_chain[-1] = self.claimed_root.decode()
        return response


class OldShapeService(CaService):
    """meshd before it followed istiod: the leaf alone, the roots in ``root_cert``."""

    def __init__(self, ca: CertificateAuthority, *, with_roots: bool = True) -> None:
        super().__init__(ca, NodeTokenAuthenticator(lambda: TOKENS), World())
        self.with_roots = with_roots

    def _sign(
        self, csr: str, identity: SpiffeId, ttl: timedelta
    ) -> ca_pb2.IstioCertificateResponse:
        response = super()._sign(csr, identity, ttl)
        root = response.cert_chain.pop()
        if self.with_roots:
            response.root_cert.ca_cert.append(root)
        return response


def test_the_client_reads_the_older_answer_with_roots_apart(ca: CertificateAuthority) -> None:
    issued = run(lambda: fetch(OldShapeService(ca), "token-of-node-a", WEB))
    assert issued.identity == WEB
    assert issued.root_pem == ca.root_pem


def test_the_client_refuses_an_answer_without_a_root(ca: CertificateAuthority) -> None:
    error = refused(OldShapeService(ca, with_roots=False), "token-of-node-a", WEB)
    assert isinstance(error, CaResponseError)
    assert "no root certificate present" in error.message


def test_the_client_refuses_a_chain_its_roots_do_not_verify(ca: CertificateAuthority) -> None:
    impostor = CertificateAuthority.create("cluster.local", now=datetime.now(UTC) - timedelta(1))
    error = refused(RogueService(impostor, ca.root_pem), "token-of-node-a", WEB)
    assert isinstance(error, CaResponseError)
    assert error.code is None
    assert "not trusted" in error.message


def test_an_unreachable_ca_is_unavailable() -> None:
    async def body() -> None:
        async with client("127.0.0.1:1", "token-of-node-a") as c:
            await c.fetch(WEB)

    with pytest.raises(CaError) as caught:
        run(body)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "is meshd running" in str(caught.value)


def test_the_refresher_fetches_through_the_client(ca: CertificateAuthority) -> None:
    async def body() -> WorkloadCertificate:
        async with serving(node_service(ca)) as target, client(target, "token-of-node-a") as c:
            refresher = CertificateRefresher(CertificateStore(), c.fetch, SystemClock())
            task = asyncio.create_task(refresher.run())
            try:
                return await refresher.certificate(WEB)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    assert run(body).identity == WEB


def test_the_root_survives_a_restart(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    before = run(lambda: fetch(node_service(first), "token-of-node-a", WEB))

    second = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert second.root_pem == first.root_pem
    after = run(lambda: fetch(node_service(second), "token-of-node-a", WEB))
    assert after.root_pem == before.root_pem
    # A certificate issued before the restart still verifies against the root served after.
    verify_chain(before.chain_pem, after.root_pem, datetime.now(UTC))
