"""The waypoint process: its certificate, meshd's feed, HBONE in, the router, HBONE out.

* Its own identity (the Gateway's service account) is fetched from meshd's
  CA and renewed at half life; without one it does not listen (fail closed).
* meshd's feed (Delta ADS, the waypoint's own Listener, routes, clusters and
  endpoints) is applied as whole snapshots; until the first one arrives
  every CONNECT is refused, and readiness says so.
* HBONE on 15008 terminates the source ztunnel's mTLS; streams go to
  :class:`waypoint.proxy.WaypointProxy`; upstream connections are HBONE to
  the destination pods' ztunnels under the waypoint's identity (pooled).
* SIGTERM: GOAWAY on every HBONE connection, requests in flight finish up to
  the drain deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import struct_pb2

from mesh.hbone import HboneClientPool, HboneServer, TlsIdentity
from mesh.identity import CertificateUnavailable, SpiffeId
from mesh.identity.store import (
    CertificateRefresher,
    CertificateStore,
    SystemClock,
    WorkloadCertificate,
)
from mesh.xds.client import FeedClient
from waypoint import accesslog
from waypoint.accesslog import istio_formatter
from waypoint.config import convert
from waypoint.config.snapshot import WaypointConfig, apply_response
from waypoint.connect import MeshConnector
from waypoint.gcfreeze import ConfigFreezer
from waypoint.proxy import WaypointProxy, drain
from waypoint.router import Router
from waypoint.telemetry import Telemetry
from waypoint.tracing import Tracer
from waypoint.upstream.pool import Upstreams

log = logging.getLogger("waypoint")
Fetch = Callable[[SpiffeId], Awaitable[WorkloadCertificate]]
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
RENEWAL_CHECK_S = 5.0  # how often a renewed certificate is looked for


def node_id(pod_ip: str, pod: str, namespace: str) -> str:
    """Istio's node id of a waypoint: ``waypoint~IP~POD.NS~NS.svc.cluster.local``."""
    return f"waypoint~{pod_ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"


def node_metadata(namespace: str, gateway: str, pod: str) -> dict[str, Any]:
    return {
        "NAMESPACE": namespace,
        "NAME": pod,
        "LABELS": {GATEWAY_NAME_LABEL: gateway},
        "WORKLOAD_NAME": gateway,
    }


class WaypointRuntime:
    def __init__(
        self,
        *,
        namespace: str,
        gateway: str,
        pod: str,
        pod_ip: str,
        identity: SpiffeId,
        fetch_certificate: Fetch,
        xds_target: str,
        xds_credentials: Any = None,
        rng: random.Random | None = None,
        freeze_gc: bool = False,
        log_json: bool = False,
    ) -> None:
        """``freeze_gc``: move each applied config out of the collector's way
        (:mod:`waypoint.gcfreeze`); for the waypoint process, not for tests sharing one."""
        self.namespace = namespace
        self.gateway = gateway
        self.identity = identity
        self.node_id = node_id(pod_ip, pod, namespace)
        self.metadata = node_metadata(namespace, gateway, pod)
        struct = struct_pb2.Struct()
        struct.update(self.metadata)
        self.config = WaypointConfig()
        self.freezer = ConfigFreezer() if freeze_gc else None
        self.xds: FeedClient[WaypointConfig] = FeedClient(
            xds_target,
            node_id=self.node_id,
            node_metadata=struct,
            state=WaypointConfig(),
            apply=apply_response,
            type_urls=convert.TYPE_URLS,
            credentials=xds_credentials,
            on_update=self._on_config,
        )
        self.certificates = CertificateRefresher(
            CertificateStore(), fetch_certificate, SystemClock(), logger=log
        )
        self.tls: TlsIdentity | None = None
        self.hbone_pool = HboneClientPool(identities=self._client_identity)
        self.rng = rng or random.Random()
        self.telemetry = Telemetry(self._service_of, istio_formatter(log_json))
        self.upstreams = Upstreams(MeshConnector(self.hbone_pool, identity), self.rng)
        self.tracer = Tracer(
            self.rng, self.node_id, self._collector_of, service_name=f"{gateway}.{namespace}"
        )
        self.router = Router(
            lambda: self.config,
            self.upstreams,
            rng=self.rng,
            on_record=self.telemetry.record,
            tracer=self.tracer,
        )
        self.telemetry.active.set_function(lambda: self.router.active)
        self.proxy = WaypointProxy(
            lambda: self.config, self.upstreams, self.router, telemetry=self.telemetry
        )
        self.server: HboneServer | None = None
        self.listening = False

    # ------------------------------------------------------------ state

    def _client_identity(self, _: SpiffeId) -> TlsIdentity:
        if self.tls is None:
            raise RuntimeError("the waypoint has no certificate yet")
        return self.tls

    def _service_of(self, cluster: str) -> dict[str, Any]:
        c = self.config.clusters.get(cluster)
        if c is None:
            return {}
        services = c.metadata.get("istio", {}).get("services") or [{}]
        return dict(services[0])

    def _collector_of(self, cluster: str) -> str | None:
        """A tracer's collector named as an Envoy cluster (istiod's way): its first endpoint."""
        assignment = self.config.endpoints.get(cluster)
        if assignment is None or not assignment.endpoints:
            return None
        return assignment.endpoints[0].address

    def _on_config(self, config: WaypointConfig) -> None:
        for type_url, refused in config.refused.items():
            for name, reason in refused.items():
                log.warning("xds: refused %s %s: %s", type_url.rsplit(".", 1)[-1], name, reason)
                self.telemetry.config_refused.labels(type=type_url.rsplit(".", 1)[-1]).inc()
        self.config = config
        self.upstreams.update(config.clusters, config.endpoints)
        if config.synced and self.freezer is not None:
            # After this call returns, on the loop: the config it replaced is gone by then.
            asyncio.get_running_loop().call_soon(self.freezer.applied)

    def ready(self) -> tuple[bool, str]:
        if self.tls is None:
            return False, f"no certificate for {self.identity} yet"
        if not self.config.synced:
            return False, "waiting for the first xDS state from meshd"
        if not self.listening:
            return False, "not listening yet"
        return True, "ready"

    def _use_certificate(self, cert: WorkloadCertificate) -> None:
        tls = TlsIdentity(chain_pem=cert.chain_pem, key_pem=cert.key_pem, roots_pem=cert.root_pem)
        self.tls = tls
        if self.server is not None:
            # New connections take the renewed certificate; live ones keep theirs.
            self.server.identity = tls
            self.server.ssl_context = tls.server_context()

    # ------------------------------------------------------------ lifecycle

    async def run(self, host: str, port: int) -> None:
        """Until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.xds.run())
            tasks.create_task(self.certificates.run())
            tasks.create_task(self._serve(host, port))

    async def _serve(self, host: str, port: int) -> None:
        while True:
            try:
                cert = await self.certificates.certificate(self.identity)
                break
            except CertificateUnavailable as e:
                # No certificate, no listener: the waypoint fails closed and keeps asking.
                log.warning("waypoint: no certificate for %s yet: %s", self.identity, e)
                await asyncio.sleep(1.0)
        self._use_certificate(cert)
        assert self.tls is not None
        self.server = HboneServer(identity=self.tls, handler=self.proxy.connect, logger=log)
        await self.server.listen(host, port, reuse_port=True)
        self.listening = True
        log.info(
            "waypoint: %s/%s serving HBONE on %s:%d as %s",
            self.namespace,
            self.gateway,
            host,
            port,
            self.identity,
        )
        while True:
            await asyncio.sleep(RENEWAL_CHECK_S)
            fresh = self.certificates.get(self.identity)
            if fresh is not None and fresh is not cert:
                cert = fresh
                self._use_certificate(fresh)

    async def drain(self, timeout_s: float) -> None:
        if self.server is not None:
            await self.server.close(drain_timeout_s=timeout_s)
        await drain(self.router, 1.0)
        await self.tracer.aclose()
        await asyncio.to_thread(self.tracer.shutdown)
        accesslog.close_all()
        self.upstreams.close()
        with contextlib.suppress(Exception):
            await self.hbone_pool.close()
