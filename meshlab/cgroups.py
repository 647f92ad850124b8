"""Pods' cgroups, as kubelet makes them: one cgroup v2 directory per pod, made
before its sandbox's CNI ADD, which every process of the pod joins.

``<cgroup2 mount>/<cluster>-pods/<node>/pod<uid>``: the cluster's name first
(so ``down`` finds every one, also after a crash), then the node (the node
agent's ``--cgroup-root``), then kubelet's ``pod<uid>``; the uid, passed in
CNI_ARGS as ``K8S_POD_UID``, is derived from the sandbox's id. The eBPF
capture attaches its programs there; with iptables they are only
bookkeeping. A host without cgroup v2 gets no pod cgroups (and no eBPF).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ebpf.capture import cgroup2_mount
from mesh.cluster.model import Pod
from meshlab import names


def cluster_root(cluster: str) -> Path | None:
    mount = cgroup2_mount()
    return None if mount is None else mount / f"{names.prefix(cluster)}pods"


def node_root(cluster: str, node: str) -> Path | None:
    root = cluster_root(cluster)
    return None if root is None else root / node


def pod_uid(container_id: str) -> str:
    """The pod's uid, stable for its sandbox (:attr:`mesh.cluster.model.Pod.uid`)."""
    return Pod(name="", namespace="", node="", container_id=container_id).uid


def pod_dir(cluster: str, node: str, container_id: str) -> Path | None:
    root = node_root(cluster, node)
    return None if root is None else root / f"pod{pod_uid(container_id)}"


def create(cluster: str, node: str, container_id: str) -> Path | None:
    path = pod_dir(cluster, node, container_id)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return path


def join(path: Path, pid: int | None = None) -> None:
    """Move ``pid`` (default: this process) into the cgroup at ``path``."""
    (path / "cgroup.procs").write_text(str(pid or os.getpid()))


def remove_pod(cluster: str, node: str, container_id: str) -> None:
    """Remove the pod's cgroup (its processes have been stopped)."""
    path = pod_dir(cluster, node, container_id)
    if path is not None:
        _remove_tree(path)


def remove_all(cluster: str) -> list[str]:
    """Remove every cgroup of the cluster; what could not be removed (still busy)."""
    root = cluster_root(cluster)
    if root is None or not root.exists():
        return []
    _remove_tree(root)
    return [str(p) for p in _tree(root)] if root.exists() else []


def _tree(root: Path) -> list[Path]:
    """``root`` and the cgroups below it, deepest first."""
    found: list[Path] = []
    for here, dirs, _ in os.walk(root, topdown=False):
        found += [Path(here) / d for d in dirs]
    return [*found, root] if root.exists() else found


def _remove_tree(root: Path) -> None:
    for path in _tree(root):
        with contextlib.suppress(FileNotFoundError, OSError):
            path.rmdir()  # cgroupfs: rmdir of a directory of control files is removal
