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
from collections.abc import Awaitable, Callable

from mesh.identity import SpiffeId
from mesh.identity.store import (
    CertificateRefresher,
    CertificateStore,
    SystemClock,
    WorkloadCertificate,
)
from mesh.xds import XdsClient, XdsState
from ztunnel.index import StateIndex
from ztunnel.pod import PodProxy
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
    ) -> None:
        self.xds = xds
        self.trust_domain = trust_domain
        self._index = StateIndex.build(XdsState())
        xds.on_update = self._on_state
        self.certificates = CertificateRefresher(
            CertificateStore(), fetch_certificate, SystemClock(), logger=log
        )
        self.zds = ZdsProxy(zds_path, self._on_zds)
        self.pods: dict[str, PodProxy] = {}

    def index(self) -> StateIndex:
        return self._index

    def _on_state(self, state: XdsState) -> None:
        self._index = StateIndex.build(state)

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

    async def _add(self, event: Add) -> None:
        if event.uid in self.pods:
            await self._drop(event.uid)  # re-added (a restarted agent): start afresh
        identity = SpiffeId(
            trust_domain=self.trust_domain,
            namespace=event.pod.namespace,
            service_account=event.pod.service_account,
        )
        await self.certificates.certificate(identity)  # none: the add is refused
        pod = PodProxy(
            event.uid,
            event.pod,
            event.netns_fd,
            trust_domain=self.trust_domain,
            index=self.index,
            certificate=lambda: self.certificates.get(identity),
        )
        try:
            await pod.start()
        except BaseException:
            await pod.close()
            raise
        self.pods[event.uid] = pod

    async def _drop(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is not None:
            with contextlib.suppress(Exception):
                await pod.close()
            log.info("ztunnel: %s/%s left the mesh", pod.pod.namespace, pod.pod.name)
