"""What the node agent follows of the cluster: namespace labels, and the pods' own.

Only what decides enrollment: each namespace's labels, and for each pod its
labels, service account and node (and, on Kubernetes, the redirection state
the agent reported on it), and what finds a pod that ztunnel-cni never saw
(:mod:`ztunnel.nodeagent.discover`): its UID and addresses, and where the
source knows them (meshlab), its sandbox id and network namespace.
:class:`MeshlabView` reads a running meshlab cluster's state file, as
meshd's source does; on Kubernetes, :class:`ztunnel.nodeagent.kube.KubernetesView`
watches Namespaces and the node's Pods, as Istio's agent does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mesh.cluster.errors import StateFileError
from mesh.cluster.model import Cluster
from mesh.cluster.statefile import read_state

log = logging.getLogger("ztunnel.nodeagent")


@dataclass(frozen=True, slots=True)
class PodFacts:
    namespace: str
    name: str
    node: str
    service_account: str
    labels: Mapping[str, str]
    # The pod's ambient.istio.io/redirection annotation, as the agent reports it
    # (Kubernetes only; None when the pod has none).
    redirection: str | None = None
    uid: str = ""  # metadata.uid
    # status.podIPs: set once the runtime's CNI ADD is done (left empty for a pod being
    # deleted or finished: the agent never looks for such a pod's namespace)
    ips: tuple[str, ...] = ()
    sandbox: str | None = None  # the sandbox id CNI was given, where the source knows it
    netns: str | None = None  # the sandbox's network namespace, where the source knows it


# Where iproute2 (and so meshlab) pins named network namespaces.
NETNS_DIR = "/run/netns"


@dataclass(frozen=True, slots=True)
class ClusterView:
    """One consistent reading of the cluster; ``version`` grows with each change."""

    version: int = -1
    namespaces: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    pods: Mapping[tuple[str, str], PodFacts] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def known(self) -> bool:
        return self.version >= 0

    @classmethod
    def of_cluster(cls, cluster: Cluster) -> ClusterView:
        return cls(
            version=cluster.resource_version,
            namespaces=MappingProxyType({ns.name: dict(ns.labels) for ns in cluster.namespaces}),
            pods=MappingProxyType(
                {
                    (p.namespace, p.name): PodFacts(
                        p.namespace,
                        p.name,
                        p.node,
                        p.service_account,
                        dict(p.labels),
                        ips=(str(p.ip),) if p.ip is not None else (),
                        sandbox=p.container_id,
                        netns=f"{NETNS_DIR}/{p.netns}" if p.netns else None,
                        uid=p.uid,
                    )
                    for p in cluster.pods
                }
            ),
        )


class MeshlabView:
    """Reads the meshlab cluster ``name``; :meth:`read` returns the newest view."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.view = ClusterView()
        self.error = ""

    def describe(self) -> str:
        return f"meshlab cluster {self.name!r}"

    def read(self) -> ClusterView:
        """The newest view; on a read error the last good one (the error is logged once)."""
        try:
            cluster = read_state(self.name)
        except StateFileError as e:
            if str(e) != self.error:
                self.error = str(e)
                log.warning("node agent: %s; keeping the last good view", e)
            return self.view
        self.error = ""
        if cluster.resource_version != self.view.version:
            self.view = ClusterView.of_cluster(cluster)
        return self.view
