"""The ztunnel process: meshd's feed in, pods from the node agent, a PodProxy per pod.

* The xDS client keeps the node's snapshot; every connection is decided
  against the latest one (:meth:`Ztunnel.index`).
* The ZDS client takes pods from the node agent: on ``Add`` the pod's
  certificate is obtained (no certificate: the add is refused, so the pod
  never runs unprotected) and its listeners are opened inside its
  namespace; on ``Delete`` they close; at ``SnapshotSent`` pods the agent no
  longer names are dropped.
* Certificates are renewed at half life by the refresher; a renewed one is
  handed to the pods of that identity.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from ebpf.capture import NodeMaps, netns_cookie
from mesh.identity import SpiffeId
from mesh.identity.store import (
    CertificateRefresher,
    CertificateStore,
    SystemClock,
    WorkloadCertificate,
)
from mesh.xds import XdsClient, XdsState
from ztunnel import netns
from ztunnel.dns import TableCache
from ztunnel.index import StateIndex
from ztunnel.pod import PodProxy
from ztunnel.telemetry import Telemetry
from ztunnel.zds.protocol import Add, Delete, Keep
from ztunnel.zds.proxy import Event, Snapshot, ZdsProxy

log = logging.getLogger("ztunnel")

Fetch = Callable[[SpiffeId], Awaitable[WorkloadCertificate]]


class Ztunnel:
    def __init__(
        self,
        *,
        xds: XdsClient,
        fetch_certificate: Fetch,
        zds_path: str,
        trust_domain: str = "cluster.local",
        dns_upstreams: Sequence[tuple[str, int]] = (),
        bpf_dir: Path | None = None,
    ) -> None:
        self.xds = xds
        self.bpf_dir = bpf_dir  # the node's pinned eBPF capture, when it has one
        self._maps: NodeMaps | None = None
        self.trust_domain = trust_domain
        self.dns_upstreams = tuple(dns_upstreams)
        self.dns_tables = TableCache()  # one names table per snapshot, shared by the pods
        self.telemetry = Telemetry()
        self.telemetry.pods.set_function(lambda: len(self.pods))
        self.telemetry.xds_connected.set_function(lambda: 1 if self.xds.connected else 0)
        self.telemetry.xds_connects = lambda: self.xds.connects
        self.snapshot_applied = False  # the node agent's ZDS snapshot has been taken
        self._index = StateIndex.build(XdsState())
        xds.on_update = self._on_state
        self.certificates = CertificateRefresher(
            CertificateStore(), fetch_certificate, SystemClock(), logger=log
        )
        self.zds = ZdsProxy(zds_path, self._on_zds)
        self.pods: dict[str, PodProxy] = {}

    def index(self) -> StateIndex:
        return self._index

    def ready(self) -> tuple[bool, str]:
        """Istio's readiness: the feed is synced and the node agent's pods are taken."""
        if not self._index.state.synced:
            return False, "waiting for the first xDS state"
        if not self.snapshot_applied:
            return False, "waiting for the node agent's pod snapshot (ZDS)"
        return True, "ready"

    def _on_state(self, state: XdsState) -> None:
        previous, self._index = self._index, StateIndex.build(state)
        # Live inbound connections were let in on an older snapshot: each pod decides
        # them again and closes the ones now denied. Only policies and workloads take
        # part in authorization; a change of services alone cannot deny anything.
        if (
            state.policies == previous.state.policies
            and state.workloads == previous.state.workloads
        ):
            return
        for pod in list(self.pods.values()):
            try:
                pod.recheck(self._index)
            except Exception:
                log.exception(
                    "ztunnel: re-checking the live connections of %s/%s failed",
                    pod.pod.namespace,
                    pod.pod.name,
                )

    async def run(self) -> None:
        """Until cancelled; then every pod's listeners close."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.xds.run())
                tasks.create_task(self.certificates.run())
                tasks.create_task(self.zds.run())
        finally:
            for uid in list(self.pods):
                await self._drop(uid)

    async def _on_zds(self, event: Event) -> None:
        if isinstance(event, Add):
            await self._add(event)
        elif isinstance(event, Delete):
            await self._drop(event.uid)
        elif isinstance(event, Keep):
            if event.uid not in self.pods:
                log.info("ztunnel: asked to keep %s, which this ztunnel never had", event.uid)
        elif isinstance(event, Snapshot):
            for uid in set(self.pods) - event.uids:
                await self._drop(uid)
            self.snapshot_applied = True

    async def _add(self, event: Add) -> None:
        held = self.pods.get(event.uid)
        if held is not None:
            if held.pod == event.pod and _same_netns(held.netns_fd, event.netns_fd):
                return  # a restarted agent's snapshot: keep the pod and its connections
            await self._drop(event.uid)  # the pod changed: start afresh
        identity = SpiffeId(
            trust_domain=self.trust_domain,
            namespace=event.pod.namespace,
            service_account=event.pod.service_account,
        )
        await self.certificates.certificate(identity)  # none: the add is refused
        self.telemetry.certificate_expiry.labels(identity=str(identity)).set_function(
            lambda: _expiry(self.certificates.get(identity))
        )
        pod = PodProxy(
            event.uid,
            event.pod,
            event.netns_fd,
            trust_domain=self.trust_domain,
            index=self.index,
            certificate=lambda: self.certificates.get(identity),
            dns_upstreams=self.dns_upstreams,
            dns_tables=self.dns_tables,
            telemetry=self.telemetry,
            bpf=await self._bpf_capture(event.netns_fd),
        )
        try:
            await pod.start()
        except BaseException:
            await pod.close()
            raise
        self.pods[event.uid] = pod

    async def _bpf_capture(self, netns_fd: int) -> NodeMaps | None:
        """The node's eBPF maps when they capture this pod (the node agent recorded it
        in ``zt_pods`` before handing it over), else None: iptables captures it."""
        if self.bpf_dir is None:
            return None
        if self._maps is None:
            if not (self.bpf_dir / "zt_pods").exists():
                return None
            try:
                self._maps = NodeMaps(self.bpf_dir)
            except OSError as e:
                log.warning("ztunnel: cannot open the eBPF capture in %s: %s", self.bpf_dir, e)
                return None
        cookie = await asyncio.to_thread(netns.in_netns, netns_fd, netns_cookie)
        return self._maps if self._maps.captures(cookie) else None

    async def drain(self, deadline_s: float) -> None:
        """Stop accepting, let live connections finish for up to ``deadline_s``, then close."""
        pods = list(self.pods.values())
        await asyncio.gather(*(pod.drain(deadline_s) for pod in pods), return_exceptions=True)
        for uid in list(self.pods):
            await self._drop(uid)

    async def _drop(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            with contextlib.suppress(Exception):
                await pod.close()
            log.info("ztunnel: %s/%s left the mesh", pod.pod.namespace, pod.pod.name)


def _same_netns(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _expiry(cert: WorkloadCertificate | None) -> float:
    """When the served certificate expires (Unix time); 0 when none is served."""
    return cert.not_after.timestamp() if cert is not None else 0.0
