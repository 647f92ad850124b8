"""meshd's certificate authority service: Istio's ``IstioCertificateService`` over gRPC.

A node agent (ztunnel) sends a CSR for one of its pods, names the identity in
the ``ImpersonatedIdentity`` metadata field, and proves who it is with a bearer
token in the ``authorization`` gRPC metadata. The service answers with the
signed chain as istiod does: ``cert_chain`` holds the leaf first, then any
intermediates, and the root last (Istio's ztunnel takes the last element as
its trust anchor and refuses an answer without one).

The rule that makes this safe is Istio's node authorizer: a node agent may
only obtain the identities of pods scheduled on its own node, so a
compromised node cannot mint the identity of a workload it does not host.

The request is decided first (:meth:`CaService.decide`: authenticate,
authorize, validate, sign) and only then answered or refused on the wire, with
one structured log line per decision.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, cast

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from controlplane.state import ROOT_NAMESPACE, SourceState
from mesh.identity import (
    DEFAULT_TTL,
    MAX_TTL,
    CertificateAuthority,
    IdentityError,
    InvalidCaMaterial,
    InvalidSpiffeId,
    SpiffeId,
    TrustDomainMismatch,
    load_pem_chain,
)
from mesh.proto.istio.ca import ca_pb2

SERVICE = "istio.v1.auth.IstioCertificateService"
"""The gRPC service name (Istio's)."""
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
"""The ``metadata`` key naming the identity a node agent asks for (Istio's name)."""
AUTHORIZATION = "authorization"
"""The gRPC metadata key carrying ``Bearer <token>``."""
NODE_AGENT_SERVICE_ACCOUNT = (ROOT_NAMESPACE, "ztunnel")
"""(namespace, name) of the node agent's Kubernetes service account, as Istio installs it."""


def now_utc() -> datetime:
    """The current time, timezone-aware UTC: the CA service's default clock."""
    return datetime.now(UTC)


class Unauthenticated(Exception):
    """The caller's token does not prove who it is; ``reason`` says why, for the operator."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class Caller:
    """Who is calling, as the authenticator established it.

    ``node`` is set for a node agent: it may obtain the identities of the pods
    on that node. ``identity`` is set when the caller has a workload identity
    of its own (a pod calling for itself). ``description`` names the caller in
    logs and refusals; it never contains the token.
    """

    node: str | None
    identity: SpiffeId | None
    description: str


class Authenticator(Protocol):
    """Turns a bearer token into a :class:`Caller`, or raises :class:`Unauthenticated`.

    It is asynchronous because checking a token may take a network round trip
    (a Kubernetes TokenReview). Any other exception means the token could not
    be checked at all; the service answers ``UNAVAILABLE`` then.
    """

    async def authenticate(self, token: str) -> Caller:
        """Say who presented ``token``."""
        ...


class NodeTokenAuthenticator:
    """The local cluster's authenticator: one random token per node agent.

    ``tokens`` returns the current table, token -> node name; it is read on
    every call so tokens can be issued and revoked while meshd runs. The
    presented token is compared with every known token in constant time
    (``hmac.compare_digest``), never by a dict lookup, so response timing does
    not tell an attacker how much of a guess was right.
    """

    def __init__(
        self,
        tokens: Callable[[], Mapping[str, str]],
        workloads: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        """``workloads``: token -> SPIFFE ID, for pods that ask for their own identity
        (a waypoint), as a projected service-account token would prove it."""
        self._tokens = tokens
        self._workloads = workloads

    async def authenticate(self, token: str) -> Caller:
        """Return the node agent (or the pod) that owns ``token``."""
        presented = token.encode()
        node: str | None = None
        for known, owner in self._tokens().items():
            # No early exit: every entry is compared, whatever matches.
            if hmac.compare_digest(presented, known.encode()) and node is None:
                node = owner
        if node is None and self._workloads is not None:
            workload: str | None = None
            for known, identity in self._workloads().items():
                if hmac.compare_digest(presented, known.encode()) and workload is None:
                    workload = identity
            if workload is not None:
                try:
                    spiffe = SpiffeId.parse(workload)
                except InvalidSpiffeId as e:
                    raise Unauthenticated(f"the token's pod has no valid identity: {e}") from e
                return Caller(node=None, identity=spiffe, description=f"pod {workload}")
        if node is None:
            raise Unauthenticated(
                "the token is not a known node agent token (hint: node agent tokens are "
                "issued by meshlab when the cluster starts; restart the node agent so it "
                "reads the current one)"
            )
        return Caller(node=node, identity=None, description=f"node agent of node {node}")


class ReviewResult(Protocol):
    """What a Kubernetes TokenReview says about a token.

    ``controlplane.sources.kube_client.review_token`` returns one; any object
    with these attributes will do (tests pass a fake).
    """

    @property
    def authenticated(self) -> bool: ...

    @property
    def username(self) -> str | None: ...

    @property
    def service_account(self) -> tuple[str, str] | None:
        """(namespace, name) if the token belongs to a service account."""
        ...

    @property
    def node_name(self) -> str | None:
        """The node of the pod the token is bound to (projected tokens only)."""
        ...

    @property
    def error(self) -> str | None: ...


Review = Callable[[str], Awaitable[ReviewResult]] | Callable[[str], ReviewResult]


class TokenReviewAuthenticator:
    """Kubernetes' authenticator: the API server reviews the token.

    A token of the node agent service account (``istio-system/ztunnel`` unless
    configured otherwise) makes the caller a node agent of the node its token
    is bound to. Any other service account token makes the caller that
    workload, with its own identity in ``trust_domain``.

    ``review`` may be a coroutine function or a plain function; a plain one
    runs in a thread, because the official Kubernetes client blocks.
    """

    def __init__(
        self,
        review: Review,
        *,
        trust_domain: str = "cluster.local",
        node_agent: tuple[str, str] = NODE_AGENT_SERVICE_ACCOUNT,
    ) -> None:
        self._review = review
        self._trust_domain = trust_domain
        self._node_agent = node_agent

    async def _run_review(self, token: str) -> ReviewResult:
        if inspect.iscoroutinefunction(self._review):
            result: object = await self._review(token)
        else:
            result = await asyncio.to_thread(self._review, token)
            if inspect.isawaitable(result):
                result = await result
        return cast(ReviewResult, result)

    async def authenticate(self, token: str) -> Caller:
        """Review ``token`` with the API server and say who it belongs to."""
        result = await self._run_review(token)
        if not result.authenticated:
            why = result.error or "no reason given"
            raise Unauthenticated(f"the Kubernetes TokenReview rejected the token: {why}")
        if result.service_account is None:
            raise Unauthenticated(
                f"the token of {result.username or 'an unknown user'} is not a service account "
                "token; only node agents and workloads may ask for certificates"
            )
        namespace, name = result.service_account
        try:
            identity = SpiffeId(
                trust_domain=self._trust_domain, namespace=namespace, service_account=name
            )
        except InvalidSpiffeId as e:
            raise Unauthenticated(f"the token's service account is not usable: {e}") from e
        if (namespace, name) == self._node_agent:
            if result.node_name:
                return Caller(
                    node=result.node_name,
                    identity=identity,
                    description=f"node agent {namespace}/{name} of node {result.node_name}",
                )
            # Valid token, but not bound to a pod: it can act for nobody but itself.
            return Caller(
                node=None,
                identity=identity,
                description=f"node agent {namespace}/{name} (token not bound to a node)",
            )
        return Caller(node=None, identity=identity, description=f"workload {namespace}/{name}")


class Refusal(Exception):
    """A request the CA will not serve: the gRPC status to answer and the reason."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code.name}: {reason}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """What the CA did with one request: the answer, or the refusal. Logged once."""

    caller: str
    identity: str
    response: ca_pb2.IstioCertificateResponse | None = None
    refusal: Refusal | None = None


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """Extract the token from ``authorization: Bearer <token>`` in gRPC invocation metadata.

    Raises :class:`Unauthenticated` when it is missing, repeated or not a
    bearer token.
    """
    values = [value for key, value in metadata or () if key.lower() == AUTHORIZATION]
    if not values:
        raise Unauthenticated(
            "no bearer token: send the gRPC metadata 'authorization: Bearer <token>'"
        )
    if len(values) > 1:
        raise Unauthenticated(f"{len(values)} authorization values; send exactly one")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization metadata is not of the form 'Bearer <token>'")
    return token.strip()


def requested_ttl(validity_duration_s: int) -> timedelta:
    """The lifetime asked for: 0 means the default (24 h); negative or above 90 days is refused."""
    if validity_duration_s == 0:
        return DEFAULT_TTL
    maximum_s = int(MAX_TTL.total_seconds())
    if validity_duration_s < 0 or validity_duration_s > maximum_s:
        # Checked in seconds: a huge int64 would overflow timedelta before InvalidTtl could.
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"invalid certificate TTL {validity_duration_s}s: it must be between 1s and "
            f"{maximum_s}s ({MAX_TTL}); 0 asks for the default {int(DEFAULT_TTL.total_seconds())}s",
        )
    return timedelta(seconds=validity_duration_s)


def requested_identity(request: ca_pb2.IstioCertificateRequest, caller: Caller) -> SpiffeId:
    """The identity asked for: ``ImpersonatedIdentity`` if present, else the caller's own."""
    fields = request.metadata.fields
    if IMPERSONATED_IDENTITY in fields:
        value = fields[IMPERSONATED_IDENTITY]
        if value.WhichOneof("kind") != "string_value":
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE ID",
            )
        # As Istio: an empty value means "not impersonating".
        if value.string_value:
            try:
                return SpiffeId.parse(value.string_value)
            except InvalidSpiffeId as e:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
    if caller.identity is None:
        raise Refusal(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"no {IMPERSONATED_IDENTITY} in the request metadata, and the caller "
            f"({caller.description}) has no identity of its own; name the SPIFFE ID to issue",
        )
    return caller.identity


def authorize(caller: Caller, identity: SpiffeId, state: SourceState, trust_domain: str) -> None:
    """Raise :class:`Refusal` (``PERMISSION_DENIED``) unless ``caller`` may obtain ``identity``.

    A caller may always obtain its own identity. A node agent may obtain the
    identity of a pod scheduled on its node, as the current state says; so a
    pod that moves away stops being served at once.
    """
    if identity.trust_domain != trust_domain:
        mismatch = TrustDomainMismatch(
            expected=trust_domain, actual=identity.trust_domain, identity=str(identity)
        )
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"this CA only issues identities of trust domain {trust_domain!r}: {mismatch}",
        )
    if caller.identity == identity:
        return
    if caller.node is None:
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{caller.description} may only obtain its own identity "
            f"{caller.identity if caller.identity is not None else '(none)'}, not {identity} "
            "(hint: only a node agent with a token bound to its node may impersonate pods)",
        )
    for pod in state.pods:
        if (
            pod.node == caller.node
            and pod.namespace == identity.namespace
            and pod.service_account == identity.service_account
        ):
            return
    raise Refusal(
        grpc.StatusCode.PERMISSION_DENIED,
        f"no pod with identity {identity} is scheduled on node {caller.node} "
        "(hint: a node agent may only obtain the identities of pods on its own node; has the "
        "pod moved, or has meshd not seen it yet?)",
    )


class CaService:
    """The ``istio.v1.auth.IstioCertificateService`` servicer (grpc.aio).

    ``state`` returns meshd's current view of the world; it is read on every
    request, so authorization follows pods as they come, go and move.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        state: Callable[[], SourceState],
        *,
        clock: Callable[[], datetime] = now_utc,
        logger: logging.Logger | None = None,
    ) -> None:
        self._ca = ca
        self._authenticator = authenticator
        self._state = state
        self._clock = clock
        self._log = logger if logger is not None else logging.getLogger(__name__)

    async def decide(
        self,
        request: ca_pb2.IstioCertificateRequest,
        metadata: Iterable[tuple[str, str | bytes]] | None,
    ) -> Decision:
        """Authenticate, authorize, validate and sign: the whole decision, without the wire."""
        caller_name, identity_name = "(unauthenticated)", "(unknown)"
        try:
            try:
                caller = await self._authenticator.authenticate(bearer_token(metadata))
            except Unauthenticated as e:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, e.reason) from e
            except Exception as e:
                raise Refusal(
                    grpc.StatusCode.UNAVAILABLE,
                    f"cannot check the token: {e} (hint: is the token reviewer, e.g. the "
                    "Kubernetes API server, reachable from meshd?)",
                ) from e
            caller_name = caller.description
            identity = requested_identity(request, caller)
            identity_name = str(identity)
            authorize(caller, identity, self._state(), self._ca.trust_domain)
            ttl = requested_ttl(request.validity_duration)
            response = self._sign(request.csr, identity, ttl)
        except Refusal as refusal:
            return Decision(caller=caller_name, identity=identity_name, refusal=refusal)
        return Decision(caller=caller_name, identity=identity_name, response=response)

    def _sign(
        self, csr: str, identity: SpiffeId, ttl: timedelta
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            issued = self._ca.sign_csr(csr.encode(), identity, ttl, now=self._clock())
        except InvalidCaMaterial as e:
            # Our fault, not the caller's: the root is unusable (e.g. expired).
            raise Refusal(grpc.StatusCode.INTERNAL, str(e)) from e
        except TrustDomainMismatch as e:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, str(e)) from e
        except IdentityError as e:  # InvalidCsr, CsrIdentityMismatch, InvalidTtl
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from e
        # One PEM block per element, as istiod sends them: leaf, intermediates, root.
        blocks = [c.public_bytes(Encoding.PEM).decode() for c in load_pem_chain(issued.chain_pem)]
        return ca_pb2.IstioCertificateResponse(cert_chain=[*blocks, issued.root_pem.decode()])

    def _record(self, decision: Decision) -> None:
        refusal = decision.refusal
        outcome = "issued" if refusal is None else refusal.code.name
        reason = "" if refusal is None else refusal.reason
        self._log.log(
            logging.INFO if refusal is None else logging.WARNING,
            "ca.decision caller=%r identity=%s outcome=%s reason=%r",
            decision.caller,
            decision.identity,
            outcome,
            reason,
            extra={
                "caller": decision.caller,
                "identity": decision.identity,
                "outcome": outcome,
                "reason": reason,
            },
        )

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> ca_pb2.IstioCertificateResponse:
        """Sign the request's CSR, or abort the call with the status and reason of the refusal."""
        decision = await self.decide(request, context.invocation_metadata())
        self._record(decision)
        if decision.refusal is not None:
            # abort() raises: the call ends here with this status and details.
            await context.abort(decision.refusal.code, decision.refusal.reason)
        assert decision.response is not None
        return decision.response


def add_to_server(server: grpc.aio.Server, service: CaService) -> None:
    """Register ``service`` on a grpc.aio server (before it starts).

    Written out rather than calling the generated ``ca_pb2_grpc`` helper: that
    module is untyped, and this is all it does.
    """
    handlers = {
        "CreateCertificate": grpc.unary_unary_rpc_method_handler(
            service.CreateCertificate,
            request_deserializer=ca_pb2.IstioCertificateRequest.FromString,
            response_serializer=ca_pb2.IstioCertificateResponse.SerializeToString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def serve_ca(
    service: CaService,
    address: str = "127.0.0.1:0",
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with only the CA service; return it and its bound port.

    Plaintext unless ``credentials`` is given (meshd serves TLS on 15012). The
    caller owns the server: ``await server.stop(grace)`` when done.
    """
    server = grpc.aio.server()
    add_to_server(server, service)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    return server, port
