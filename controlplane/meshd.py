"""``meshd``: a source of truth in, one Delta ADS feed (and the CA) out.

    meshd --source meshlab:NAME | file:PATH | kubernetes [--kubeconfig PATH]
          [--listen 127.0.0.1:15010] [--tls-listen 127.0.0.1:15012 | off]
          [--status-listen 127.0.0.1:15014] [--ca-dir DIR] [--trust-domain cluster.local]
          [--pod-name NAME] [--leader-elect-lease-duration 15s] [--leader-elect-renew-deadline 10s]
          [--leader-elect-retry-period 2s] [--jwks-refresh-interval 20m]

Ports as istiod's: 15010 plaintext xDS (and, for the local cluster only, the
CA); 15012 xDS and the CA over TLS, with a certificate signed by the mesh root.

Every change at the source is translated (incrementally: only what the
change touches is redone, see :mod:`controlplane.incremental`) and handed
to the snapshot cache, which works out per subscriber what to send. Objects
the source or the translation refused are logged once and listed in the
status document (``GET /debug/status`` on the status port), beside every
subscriber's state; ``GET /ready`` answers 200 once the first state is
served.

The ``jwksUri`` of RequestAuthentications are fetched by meshd, as istiod
does (:mod:`controlplane.jwks`), every ``--jwks-refresh-interval`` (env
``PILOT_JWT_PUB_KEY_REFRESH_INTERVAL``, default 20m); keys that change are
rebuilt into the waypoints' configuration and pushed.

On Kubernetes every replica serves xDS and the CA; the one that holds the
Lease ``istio-system/meshd-leader`` (:mod:`controlplane.leader`) also runs
the waypoint deployer's writes (:mod:`controlplane.deployer`), so that
several replicas may run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from envoy.config.core.v3.base_pb2 import Node

from controlplane import ca_service
from controlplane.ads.cache import GLOBAL, SnapshotCache
from controlplane.ads.feed import TYPE_URLS, Feed, ScopedFeed
from controlplane.ads.server import AdsServer
from controlplane.authz_yaml import ztunnel_status
from controlplane.gcpause import QuietCollector
from controlplane.incremental import IncrementalTranslator
from controlplane.jwks import REFRESH_S, RETRY_S, JwksFetcher
from controlplane.kube_waypoints import DEFAULT_IMAGE, DEFAULT_XDS_ADDRESS, DeployerSettings
from controlplane.l7 import envoy, request_authn
from controlplane.l7.build import L7Result, build
from controlplane.serving import ServingCertificate, serving_ips
from controlplane.state import SourceState
from controlplane.translate import Resources
from mesh.identity import CertificateAuthority

if TYPE_CHECKING:
    from controlplane.deployer import WaypointDeployer
    from controlplane.leader import ElectionSettings, Elector

log = logging.getLogger("meshd")
CA_TOKEN_AUDIENCE = "istio-ca"  # the audience of the tokens istiod's CA takes

# Keepalive, as istiod's: meshd pings a quiet subscriber every 30 s and drops
# it after 10 s without an answer, and lets the proxies ping it (ztunnel and
# our XdsClient do, every 30 s, on a stream that may stay quiet for hours).
# gRPC's default policy allows one ping in 5 minutes without data and
# answers the third early one with GOAWAY too_many_pings.
XDS_KEEPALIVE_TIME_MS = 30_000
XDS_KEEPALIVE_TIMEOUT_MS = 10_000
XDS_MIN_CLIENT_PING_INTERVAL_MS = 10_000


def grpc_server_options() -> list[tuple[str, int]]:
    """The channel options of meshd's gRPC servers (15010 and 15012)."""
    return [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", XDS_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", XDS_KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.ping_timeout_ms", XDS_KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # The clients' pings: allowed without calls, one per 10 s or fewer
        # without data (closer ones count as strikes, and no number of
        # strikes earns a GOAWAY too_many_pings).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", XDS_MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class Source(Protocol):
    latest: SourceState | None

    def describe(self) -> str: ...

    async def run(self) -> None: ...


class Meshd:
    """The control plane's core wiring, independent of how it is started."""

    def __init__(
        self,
        *,
        logger: logging.Logger = log,
        jwks_refresh_s: float = REFRESH_S,
        jwks_retry_s: float = RETRY_S,
    ) -> None:
        self.log = logger
        self.cache = SnapshotCache(TYPE_URLS, envoy.TYPE_URLS)
        self.ads = AdsServer(self.cache, scope_of=self.scope_of)
        self.ads.resend_with = {envoy.CLUSTER_TYPE: envoy.ENDPOINT_TYPE}
        self.feed = Feed()
        self.scoped_feed = ScopedFeed()
        self.l7 = L7Result()
        self.translator = IncrementalTranslator()
        self.state: SourceState | None = None  # as built: the source's, with the keys fetched
        self.source_state: SourceState | None = None  # as the source gave it
        # The RequestAuthentications' jwksUri; runs in run() (or a test's loop).
        self.jwks = JwksFetcher(
            self._on_jwks, refresh_s=jwks_refresh_s, retry_s=jwks_retry_s, logger=logger
        )
        # Called after a rebuild for changed keys (the source's callback is not).
        self.on_rebuilt: Callable[[SourceState, L7Result], None] | None = None
        # MeshConfig's text from --mesh-config (None: the istio ConfigMap's, if any).
        self.mesh_config: str | None = None
        self.resources = Resources()
        self.rejected: tuple[str, ...] = ()
        self.warnings: tuple[str, ...] = ()  # accepted, but not all of it is enforced
        self.updates = 0
        self.last_update_ms = 0.0
        self.ready = asyncio.Event()
        # The daemon keeps full GC pauses out of updates (see gcpause); off in-process.
        self.collector: QuietCollector | None = None
        self.leader: Elector | None = None  # on Kubernetes: who writes what only one may

    def on_source(self, state: SourceState) -> None:
        """A new state at the source: translate it and publish the result."""
        started = time.perf_counter()
        self.source_state = state
        self.jwks.want(request_authn.jwks_uris(state.l7, state.root_namespace))
        state = replace(state, jwks=self.jwks.keys(), mesh_config=self.mesh_config)
        resources = self.translator.translate(state)
        entries = self.feed.entries(resources)
        l7 = build(state)
        scopes = self.scoped_feed.entries(
            {key: envoy.translate(share).by_type() for key, share in l7.shares.items()}
        )
        changed = self.cache.update(entries, scopes)
        self.state = state
        self.resources = resources
        self.l7 = l7
        rejected = tuple(sorted(set(resources.rejected) | set(l7.rejected)))
        for line in sorted(set(rejected) - set(self.rejected)):
            self.log.warning("meshd: refused %s", line)
        self.rejected = rejected
        warnings = tuple(
            sorted(
                f"AuthorizationPolicy {p.namespace}/{p.name}: {p.warning}"
                for p in state.policies
                if p.warning
            )
        )
        for line in sorted(set(warnings) - set(self.warnings)):
            self.log.warning("meshd: %s", line)
        self.warnings = warnings
        self.updates += 1
        self.last_update_ms = (time.perf_counter() - started) * 1000
        self.ready.set()
        if self.collector is not None:
            self.collector.after_update()
        if changed:
            self.log.info(
                "meshd: generation %d: %d workloads, %d services, %d policies "
                "(%s changed, %.1f ms)",
                self.cache.snapshot.generation,
                len(resources.workloads),
                len(resources.services),
                len(resources.policies),
                ", ".join(
                    f"{len(n)} {t.rsplit('.', 1)[-1]}" + (f" of {scope}" if scope else "")
                    for (scope, t), n in changed.items()
                ),
                self.last_update_ms,
            )

    def _on_jwks(self) -> None:
        """Fetched keys changed: build again with them (only what changed is sent)."""
        if self.source_state is None:
            return
        self.on_source(self.source_state)
        if self.on_rebuilt is not None and self.state is not None:
            self.on_rebuilt(self.state, self.l7)

    def use_mesh_config(self, text: str | None) -> None:
        """MeshConfig's text changed (``--mesh-config``): build again with it."""
        if text == self.mesh_config:
            return
        self.mesh_config = text
        self._on_jwks()  # the same rebuild: the source's state, with what meshd adds

    def scope_of(self, node: Node) -> str:
        """The waypoint a subscriber is, from its node: Istio's waypoints say so in their
        metadata (the pod's ``gateway.networking.k8s.io/gateway-name`` label and
        ``NAMESPACE``); otherwise the node id's ``pod.namespace`` names a pod whose
        label meshd knows. Anything else (a ztunnel) is in no scope."""
        return waypoint_scope(node, self.state)

    def status(self) -> dict[str, Any]:
        return {
            "generation": self.cache.snapshot.generation,
            "workloads": len(self.resources.workloads),
            "services": len(self.resources.services),
            "policies": len(self.resources.policies),
            "rejected": list(self.rejected),
            "warnings": list(self.warnings),
            "waypoints": sorted(self.l7.shares),
            "objects": [o.to_dict() for o in self.l7.statuses]
            + [ztunnel_status(p).to_dict() for p in (self.state.policies if self.state else ())],
            "updates": self.updates,
            "lastUpdateMs": round(self.last_update_ms, 2),
            "subscribers": self.ads.status(),
            "translation": {
                "fullPasses": self.translator.full_passes,
                "partialPasses": self.translator.partial_passes,
            },
            "gc": self.collector.status() if self.collector is not None else None,
            "leader": self.leader.status() if self.leader is not None else None,
            "jwks": self.jwks.status(),
        }


GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def waypoint_scope(node: Node, state: SourceState | None) -> str:
    """``namespace/name`` of the waypoint Gateway a node is an instance of, or ""."""
    fields = node.metadata.fields
    labels = fields["LABELS"].struct_value.fields if "LABELS" in fields else {}
    name = labels[GATEWAY_NAME_LABEL].string_value if GATEWAY_NAME_LABEL in labels else ""
    namespace = fields["NAMESPACE"].string_value if "NAMESPACE" in fields else ""
    parts = node.id.split("~")
    pod = ""
    if len(parts) == 4:  # type~ip~pod.namespace~namespace.svc.cluster.local
        pod, _, ns = parts[2].partition(".")
        namespace = namespace or ns
    if not name and pod and state is not None:
        for info in state.pods:
            if info.name == pod and info.namespace == namespace:
                name = info.labels.get(GATEWAY_NAME_LABEL, "")
                break
    if not name or not namespace:
        return GLOBAL
    return f"{namespace}/{name}"


async def serve_status(meshd: Meshd, host: str, port: int) -> asyncio.Server:
    """A tiny HTTP endpoint: ``/debug/status`` (JSON) and ``/ready``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)).strip():
                pass
            path = request.split()[1].decode() if len(request.split()) > 1 else "/"
            if path.startswith("/ready"):
                code, body = (200, b"ready\n") if meshd.ready.is_set() else (503, b"not ready\n")
            elif path.startswith("/debug/status"):
                code, body = 200, json.dumps(meshd.status(), indent=1).encode() + b"\n"
            else:
                code, body = 404, b"try /debug/status or /ready\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            writer.write(
                f"HTTP/1.1 {code} {reason}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _tls_address(text: str) -> tuple[str, int] | None:
    return None if text == "off" else _address(text)


def _duration(text: str) -> float:
    """Seconds, from ``15s``, ``500ms`` or ``15`` (the kube components' flags take Go's)."""
    number, scale = text, 1.0
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            number, scale = text.removesuffix(unit), factor
            break
    try:
        seconds = float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (15s, 500ms)") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="meshlab:NAME, file:PATH or kubernetes")
    parser.add_argument("--kubeconfig", help="with --source kubernetes (default: in-cluster)")
    parser.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 15010),
        help="plaintext gRPC: xDS and CA (default 127.0.0.1:15010)",
    )
    parser.add_argument(
        "--tls-listen",
        type=_tls_address,
        default=("127.0.0.1", 15012),
        help="TLS gRPC: xDS and CA, certificate from the mesh root (default 127.0.0.1:15012; "
        "'off' to disable)",
    )
    parser.add_argument("--status-listen", type=_address, default=("127.0.0.1", 15014))
    parser.add_argument(
        "--ca-dir",
        type=Path,
        help="where the CA root persists (meshlab: in the cluster's state dir; "
        "kubernetes: default the Secret istio-system/istio-ca-secret)",
    )
    parser.add_argument("--trust-domain", default="cluster.local")
    # With --source kubernetes: the waypoint Gateways' instances (controlplane.deployer).
    parser.add_argument(
        "--waypoint-image",
        default=os.environ.get("WAYPOINT_IMAGE", DEFAULT_IMAGE),
        help=f"the image of waypoint pods (env WAYPOINT_IMAGE; default {DEFAULT_IMAGE})",
    )
    parser.add_argument(
        "--waypoint-xds-address",
        default=os.environ.get("WAYPOINT_XDS_ADDRESS", DEFAULT_XDS_ADDRESS),
        help=f"meshd's TLS address as waypoint pods reach it (default {DEFAULT_XDS_ADDRESS})",
    )
    # With --source kubernetes: the election of the replica that writes (controlplane.leader),
    # with the kube components' flag names and defaults.
    parser.add_argument(
        "--pod-name",
        default=os.environ.get("POD_NAME", ""),
        help="this replica's name in the leader Lease, with a random suffix "
        "(env POD_NAME; default the host name)",
    )
    parser.add_argument("--leader-elect-lease-duration", type=_duration, default=15.0)
    parser.add_argument("--leader-elect-renew-deadline", type=_duration, default=10.0)
    parser.add_argument("--leader-elect-retry-period", type=_duration, default=2.0)
    parser.add_argument(
        "--jwks-refresh-interval",
        type=_duration,
        default=os.environ.get("PILOT_JWT_PUB_KEY_REFRESH_INTERVAL", "20m"),
        help="how often the jwksUri of RequestAuthentications are fetched again "
        "(env PILOT_JWT_PUB_KEY_REFRESH_INTERVAL; default 20m, as istiod)",
    )
    parser.add_argument(
        "--mesh-config",
        type=Path,
        help="MeshConfig's YAML (istiod's --meshConfig: the istio ConfigMap's mesh key, "
        "mounted); read again when it changes. Without it: the istio ConfigMap of the "
        "root namespace among the source's objects, if any",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


SourceFactory = Callable[[Callable[[SourceState], None]], Source]


def make_source(args: argparse.Namespace) -> tuple[SourceFactory, Path | None]:
    """The source named by ``--source`` and the default CA directory for it."""
    kind, _, value = args.source.partition(":")
    if kind == "meshlab" and value:
        from controlplane.sources.local import MeshlabSource
        from mesh.cluster.statefile import cluster_dir

        return (
            lambda cb: MeshlabSource(value, on_change=cb, trust_domain=args.trust_domain),
            cluster_dir(value) / "ca",
        )
    if kind == "file" and value:
        from controlplane.sources.local import FileSource

        path = Path(value)
        return (lambda cb: FileSource(path, on_change=cb, trust_domain=args.trust_domain), None)
    if kind == "kubernetes":
        from controlplane.sources.kube_client import api_client_from
        from controlplane.sources.kubernetes import KubernetesSource

        client = api_client_from(args.kubeconfig)
        return (
            lambda cb: KubernetesSource(client, on_change=cb, trust_domain=args.trust_domain),
            None,
        )
    raise SystemExit(
        f"meshd: error: --source {args.source!r}: use meshlab:NAME, file:PATH or kubernetes"
    )


async def run(
    args: argparse.Namespace,
    *,
    started: Callable[[], Awaitable[None]] | None = None,
) -> None:
    meshd = Meshd(jwks_refresh_s=args.jwks_refresh_interval)
    meshd.collector = QuietCollector()
    factory, default_ca_dir = make_source(args)
    kind = args.source.partition(":")[0]
    elector = _elector(args) if kind == "kubernetes" else None
    meshd.leader = elector
    deployer = _waypoint_deployer(args, elector) if kind == "kubernetes" else None
    on_change = meshd.on_source
    if deployer is not None:
        waypoints = deployer

        def on_change(state: SourceState) -> None:
            meshd.on_source(state)
            waypoints.offer(state, meshd.l7)

        meshd.on_rebuilt = waypoints.offer

    source = factory(on_change)
    options = grpc_server_options()
    ca = _ca(meshd, args, args.ca_dir or default_ca_dir)
    if deployer is not None and ca is not None:
        root = ca[0]
        deployer.root_cert = lambda: root.root_pem.decode()

    # Plaintext (15010): xDS; the CA too, but only for the local cluster: a
    # Kubernetes service-account token never crosses a plaintext connection.
    plain = grpc.aio.server(options=options)
    meshd.ads.add_to(plain)
    if ca is not None and kind != "kubernetes":
        ca_service.add_to_server(plain, ca[1])
    host, port = args.listen
    bound = plain.add_insecure_port(f"{host}:{port}")
    servers = [plain]
    listening = [f"xDS on {host}:{bound}"]

    # TLS (15012): xDS and the CA, with a certificate from the mesh root.
    if ca is not None and args.tls_listen is not None:
        tls_host, tls_port = args.tls_listen
        serving = ServingCertificate(ca[0], ip_addresses=serving_ips(tls_host))
        tls = grpc.aio.server(options=options)
        meshd.ads.add_to(tls)
        ca_service.add_to_server(tls, ca[1])
        tls_bound = tls.add_secure_port(f"{tls_host}:{tls_port}", serving.credentials())
        servers.append(tls)
        listening.append(f"xDS and CA over TLS on {tls_host}:{tls_bound}")
    elif args.tls_listen is not None:
        log.warning("meshd: no CA, so no certificate to serve TLS with: the TLS port is off")
    for server in servers:
        await server.start()
    status = await serve_status(meshd, *args.status_listen)
    log.info(
        "meshd: serving %s, status on %s:%d, source %s",
        ", ".join(listening),
        *args.status_listen,
        source.describe(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    source_task = asyncio.ensure_future(source.run())
    deployer_task = asyncio.ensure_future(deployer.run()) if deployer is not None else None
    elector_task = asyncio.ensure_future(elector.run()) if elector is not None else None
    jwks_task = asyncio.ensure_future(meshd.jwks.run())
    mesh_task = (
        asyncio.ensure_future(watch_mesh_config(meshd, args.mesh_config))
        if args.mesh_config is not None
        else None
    )
    if started is not None:
        await started()
    try:
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({source_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if source_task in done and source_task.exception() is not None:
            log.error("meshd: the source failed: %s", source_task.exception())
    finally:
        # The deployer first, then the election: it releases the lease once the deployer's
        # writes in flight are done, and the other replica takes over at its next try.
        for task in (source_task, deployer_task, elector_task, jwks_task, mesh_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        status.close()
        await asyncio.gather(*(server.stop(grace=1.0) for server in servers))
        meshd.collector.close()


MESH_CONFIG_POLL_S = 1.0


async def watch_mesh_config(meshd: Meshd, path: Path, poll_s: float = MESH_CONFIG_POLL_S) -> None:
    """Follow ``--mesh-config``: its text on every change of modification time (a mounted
    ConfigMap is replaced by a rename, which changes it). A file that cannot be read is
    logged and the last text kept; one that is gone means Istio's defaults."""
    seen: float | None = -1.0
    while True:
        seen, text = _read_if_changed(path, seen, meshd.mesh_config)
        if text is not None:
            meshd.use_mesh_config(text)
        await asyncio.sleep(poll_s)


def _read_if_changed(
    path: Path, seen: float | None, last: str | None
) -> tuple[float | None, str | None]:
    """(modification time, text if it changed else None); a small file, read on the loop."""
    try:
        mtime: float | None = path.stat().st_mtime
    except FileNotFoundError:
        mtime = None
    except OSError as e:
        log.warning("meshd: --mesh-config %s: %s", path, e)
        return seen, None
    if mtime == seen:
        return seen, None
    if mtime is None:
        log.warning("meshd: --mesh-config %s is missing: Istio's defaults apply", path)
        return None, ""
    try:
        return mtime, path.read_text()
    except OSError as e:
        log.warning("meshd: --mesh-config %s: %s (the last one stays)", path, e)
        return mtime, last


def _waypoint_deployer(args: argparse.Namespace, leader: Elector | None) -> WaypointDeployer:
    """The waypoint Gateways' instances on Kubernetes, with a client of its own, writing
    only while ``leader`` leads."""
    from controlplane.deployer import WaypointDeployer
    from controlplane.sources.kube_client import api_client_from

    settings = DeployerSettings(
        image=args.waypoint_image,
        xds_address=args.waypoint_xds_address,
        trust_domain=args.trust_domain,
    )
    return WaypointDeployer(api_client_from(args.kubeconfig), settings, leader=leader)


def election_settings(args: argparse.Namespace) -> ElectionSettings:
    """The lease's timings from the flags (a whole number of seconds for its duration)."""
    from controlplane.leader import ElectionSettings

    try:
        return ElectionSettings(
            lease_duration_s=math.ceil(args.leader_elect_lease_duration),
            renew_deadline_s=args.leader_elect_renew_deadline,
            retry_period_s=args.leader_elect_retry_period,
        )
    except ValueError as e:
        raise SystemExit(f"meshd: error: --leader-elect-*: {e}") from None


def _elector(args: argparse.Namespace) -> Elector:
    """The election of the replica that writes, with a client of its own (its renewals
    must not queue behind the deployer's requests)."""
    from controlplane import leader
    from controlplane.sources.kube_client import api_client_from

    return leader.Elector(
        api_client_from(args.kubeconfig),
        leader.identity(args.pod_name),
        election_settings(args),
    )


def _ca(
    meshd: Meshd, args: argparse.Namespace, ca_dir: Path | None
) -> tuple[CertificateAuthority, ca_service.CaService] | None:
    """The CA root and the CA service, or None when the CA is not served."""
    kind, _, value = args.source.partition(":")
    authenticator: Any
    if kind == "meshlab":
        from mesh.cluster.statefile import node_tokens, pod_identities

        authenticator = ca_service.NodeTokenAuthenticator(
            lambda: node_tokens(value), lambda: pod_identities(value, args.trust_domain)
        )
    elif kind == "kubernetes":
        from controlplane.sources.kube_client import api_client_from, review_token

        client = api_client_from(args.kubeconfig)
        # Only tokens minted for the CA (a projected token of audience istio-ca, as
        # istiod asks): a pod's default API token must not buy a certificate.
        authenticator = ca_service.TokenReviewAuthenticator(
            lambda token: review_token(client, token, [CA_TOKEN_AUDIENCE]),
            trust_domain=args.trust_domain,
        )
    else:
        log.info("meshd: a file source has no callers to authenticate: the CA is not served")
        return None
    if ca_dir is not None:
        ca = CertificateAuthority.load_or_create(ca_dir, args.trust_domain)
        where = str(ca_dir)
    elif kind == "kubernetes":
        from controlplane.ca_secret import load_or_create_ca_secret

        ca = load_or_create_ca_secret(client, args.trust_domain)
        where = "the Secret istio-system/istio-ca-secret"
    else:
        log.info("meshd: no --ca-dir: the CA is not served")
        return None
    log.info("meshd: CA root from %s (trust domain %s)", where, args.trust_domain)

    def state() -> SourceState:
        return meshd.state or SourceState()

    return ca, ca_service.CaService(ca, authenticator, state)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
