"""How meshlab names what it creates: everything starts with the cluster name.

Linux interface names are at most 15 characters, so cluster names are kept
to 8 lowercase letters and digits (no dash: ``<name>-`` is then an
unambiguous prefix, and ``a`` can never sweep up ``a-b``'s resources).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from meshlab.errors import MeshlabError

_CLUSTER_NAME = re.compile(r"^[a-z][a-z0-9]{0,7}$")
DEFAULT_CLUSTER_NAME = "meshlab"
# Marks every process meshlab starts, so ``down`` finds them after a crash even
# when they live outside the cluster's namespaces.
PROCESS_MARKER_ENV = "MESHLAB_CLUSTER"
IPTABLES_COMMENT_PREFIX = "meshlab:"


def validate_cluster_name(name: str) -> str:
    if not _CLUSTER_NAME.match(name):
        raise MeshlabError(
            f"invalid cluster name {name!r}: use 1-8 lowercase letters and digits, "
            "starting with a letter (it prefixes interface names, which the kernel "
            "limits to 15 characters)"
        )
    return name


def prefix(cluster: str) -> str:
    return f"{cluster}-"


BPF_FS = Path("/sys/fs/bpf")


def bpf_dir(cluster: str, node: str) -> Path:
    """Where a node's eBPF capture is pinned (the node agent's and ztunnel's --bpf-dir)."""
    return BPF_FS / f"{prefix(cluster)}{node}"


def bpf_dirs(cluster: str) -> list[Path]:
    """The pin folders of the cluster's nodes that exist."""
    if not BPF_FS.is_dir():
        return []
    return sorted(p for p in BPF_FS.glob(f"{prefix(cluster)}*") if p.is_dir())


def bridge_name(cluster: str) -> str:
    return f"{cluster}-br"


def node_uplink_name(cluster: str, index: int) -> str:
    """Root-namespace end of node ``index``'s veth to the underlay bridge."""
    return f"{cluster}-v{index}"


def node_netns(cluster: str, node: str) -> str:
    return _bounded(f"{cluster}-node-{node}")


def pod_netns(cluster: str, namespace: str, pod: str) -> str:
    return _bounded(f"{cluster}-pod-{namespace}-{pod}")


def iptables_comment(cluster: str) -> str:
    return f"{IPTABLES_COMMENT_PREFIX}{cluster}"


def _bounded(name: str) -> str:
    # A netns name is a file name under /run/netns: keep it well below 255.
    if len(name) <= 200:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[:180]}-{digest}"


def container_name(cluster: str, *parts: str) -> str:
    """A container meshlab runs (``--image``): ``<cluster>-meshd``, ``<cluster>-ztunnel-<node>``."""
    return _bounded("-".join((cluster, *parts)))
