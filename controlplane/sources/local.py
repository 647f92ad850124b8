"""The local sources: a running meshlab cluster, or a file of the same shape.

Both read the cluster document of :mod:`mesh.cluster` (the state file of a
meshlab cluster, or a ``cluster.yaml``) and follow it: a new
``resourceVersion`` in the state file, or a new modification time of the
file, produces a new :class:`SourceState`. Polling a small local file a few
times a second is cheaper and simpler than inotify and has no kernel limits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from controlplane.authz_yaml import InvalidPolicy, fail_closed, parse_authorization_policy
from controlplane.l7.authz import has_target_refs
from controlplane.l7.gateway_api import is_waypoint, parse_gateway
from controlplane.l7.reader import InvalidObject
from controlplane.state import (
    AuthorizationPolicyInfo,
    L7Object,
    NamespaceInfo,
    PodInfo,
    ServiceInfo,
    ServicePortInfo,
    SourceState,
    WaypointInfo,
    frozen_labels,
)
from mesh.cluster import Cluster, ClusterSpecError, StateFileError, parse_spec
from mesh.cluster.model import resource_key
from mesh.cluster.statefile import read_state, state_path

log = logging.getLogger("controlplane.sources")
POLL_INTERVAL_S = 0.1


def source_state(
    cluster: Cluster, *, trust_domain: str = "cluster.local", cluster_id: str | None = None
) -> SourceState:
    """A cluster document as meshd's input."""
    policies: list[AuthorizationPolicyInfo] = []
    rejected: list[str] = []
    waypoints = [
        WaypointInfo(
            name=str(w["name"]),
            namespace=str(w["namespace"]),
            address=str(w.get("address") or "") or None,
        )
        for w in cluster.waypoints
    ]
    l7: list[L7Object] = []
    for raw in cluster.resources:
        kind, namespace, name = resource_key(raw)
        plain = _plain(raw)
        if kind == "Gateway":
            if not is_waypoint(plain):
                continue  # an ingress Gateway: another controller's
            try:
                waypoints.append(parse_gateway(plain))
            except InvalidObject as e:
                rejected.append(str(e))
        else:
            l7.append(L7Object(kind=kind, namespace=namespace, name=name, raw=plain))
    for raw in cluster.policies:
        plain = _plain(raw)
        if has_target_refs(plain):  # the waypoint's: read with the L7 objects
            kind, namespace, name = resource_key(plain)
            l7.append(L7Object(kind=kind, namespace=namespace, name=name, raw=plain))
            continue
        try:
            policies.append(parse_authorization_policy(plain))
        except InvalidPolicy as e:
            denied = fail_closed(plain, e)  # never dropped: a DENY of what it may select
            if denied is None:
                rejected.append(str(e))
            else:
                policies.append(denied)
    return SourceState(
        namespaces=tuple(
            NamespaceInfo(name=ns.name, labels=frozen_labels(ns.labels))
            for ns in cluster.namespaces
        ),
        pods=tuple(
            PodInfo(
                uid=p.container_id or f"{p.namespace}/{p.name}",
                name=p.name,
                namespace=p.namespace,
                node=p.node,
                ip=str(p.ip) if p.ip is not None else None,
                service_account=p.service_account,
                labels=frozen_labels(p.labels),
            )
            for p in cluster.pods
        ),
        services=tuple(
            ServiceInfo(
                name=s.name,
                namespace=s.namespace,
                cluster_ips=(str(s.vip),),
                ports=tuple(
                    ServicePortInfo(
                        port=sp.port,
                        target_port=sp.target_port,
                        name=sp.name,
                        protocol=sp.protocol,
                        app_protocol=sp.app_protocol,
                    )
                    for sp in s.ports
                ),
                selector=frozen_labels(s.selector),
                labels=frozen_labels(s.labels),
                traffic_distribution=s.traffic_distribution or "",
                internal_traffic_policy=s.internal_traffic_policy or "",
            )
            for s in cluster.services
        ),
        policies=tuple(policies),
        waypoints=tuple(waypoints),
        l7=tuple(l7),
        trust_domain=trust_domain,
        cluster_id=cluster_id or cluster.name or "Kubernetes",
        rejected=tuple(rejected),
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Polling:
    def __init__(
        self, on_change: Callable[[SourceState], None], trust_domain: str, logger: logging.Logger
    ) -> None:
        self.on_change = on_change
        self.trust_domain = trust_domain
        self.log = logger
        self.latest: SourceState | None = None
        self._error = ""

    def _report(self, error: str) -> None:
        if error != self._error:
            self._error = error
            if error:
                self.log.warning("source: %s; keeping the last good state", error)
            else:
                self.log.info("source: readable again")


class MeshlabSource(_Polling):
    """Follows the state file of the running meshlab cluster ``name``."""

    def __init__(
        self,
        name: str,
        *,
        on_change: Callable[[SourceState], None],
        trust_domain: str = "cluster.local",
        logger: logging.Logger = log,
    ) -> None:
        super().__init__(on_change, trust_domain, logger)
        self.name = name
        self.version = -1

    def describe(self) -> str:
        return f"meshlab cluster {self.name!r} ({state_path(self.name)})"

    def poll(self) -> bool:
        """Read the state once; publish and return True when it changed."""
        try:
            cluster = read_state(self.name)
        except StateFileError as e:
            self._report(str(e))
            return False
        self._report("")
        if cluster.resource_version == self.version:
            return False
        self.version = cluster.resource_version
        self.latest = source_state(cluster, trust_domain=self.trust_domain)
        self.on_change(self.latest)
        return True

    async def run(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(POLL_INTERVAL_S)


class FileSource(_Polling):
    """Follows a cluster document in a YAML (or JSON) file."""

    def __init__(
        self,
        path: Path,
        *,
        on_change: Callable[[SourceState], None],
        trust_domain: str = "cluster.local",
        logger: logging.Logger = log,
    ) -> None:
        super().__init__(on_change, trust_domain, logger)
        self.path = path
        self.stamp: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"file {self.path}"

    def poll(self) -> bool:
        try:
            stat = self.path.stat()
        except OSError as e:
            self._report(f"cannot read {self.path}: {e.strerror}")
            return False
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            cluster = parse_spec(yaml.safe_load(self.path.read_text()))
        except (OSError, yaml.YAMLError, ClusterSpecError) as e:
            self._report(f"{self.path} is not a valid cluster document: {e}")
            return False
        self._report("")
        self.latest = source_state(cluster, trust_domain=self.trust_domain)
        self.on_change(self.latest)
        return True

    async def run(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(POLL_INTERVAL_S)
