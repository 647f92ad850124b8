"""The state file of a running local cluster: where it lives, how it is written.

``meshlab`` keeps one JSON document per cluster at
``/run/meshlab/<name>/state.json`` (``MESHLAB_STATE_DIR`` moves the root).
It is the cluster document of :mod:`mesh.cluster.model` with its runtime
fields filled in, and a ``resourceVersion`` that grows by one on every change.
Writers hold an exclusive ``flock`` and replace the file with ``rename`` so a
reader (``meshd``, ``meshlab status``) always sees a whole document, never a
half-written one, and can tell a change by the version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from mesh.cluster.errors import ClusterSpecError, StateFileError
from mesh.cluster.model import Cluster
from mesh.cluster.parse import parse_spec

DEFAULT_ROOT = Path("/run/meshlab")
STATE_FILE = "state.json"


def state_root() -> Path:
    """The directory holding one folder per cluster."""
    return Path(os.environ.get("MESHLAB_STATE_DIR", str(DEFAULT_ROOT)))


def cluster_dir(name: str) -> Path:
    return state_root() / name


def state_path(name: str) -> Path:
    return cluster_dir(name) / STATE_FILE


def list_clusters() -> list[str]:
    """Names of the clusters that have a state file, sorted."""
    root = state_root()
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{STATE_FILE}"))


def read_state(name: str) -> Cluster:
    """Load and validate the state of cluster ``name``."""
    path = state_path(name)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise StateFileError(f"no cluster named {name!r} is running (no {path})") from e
    except (OSError, json.JSONDecodeError) as e:
        raise StateFileError(f"cannot read the state of cluster {name!r} at {path}: {e}") from e
    try:
        return parse_spec(raw)
    except ClusterSpecError as e:
        raise StateFileError(f"the state file {path} is not a valid cluster document: {e}") from e


def write_state(cluster: Cluster) -> Cluster:
    """Write ``cluster`` as the new state, one version above the current one.

    The caller holds :func:`locked`. Returns the cluster as written (with its
    new ``resource_version``).
    """
    if cluster.name is None:
        raise StateFileError("a cluster state needs a name")
    path = state_path(cluster.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    current = 0
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        current = int(json.loads(path.read_text()).get("resourceVersion", 0))
    written = replace(cluster, resource_version=max(current, cluster.resource_version) + 1)
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(written.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return written


def update_state(name: str, change: Callable[[Cluster], Cluster]) -> Cluster:
    """Read, change and write the state under the cluster lock."""
    with locked(name):
        return write_state(change(read_state(name)))


def lock_path(name: str) -> Path:
    # Beside, not inside, the cluster folder, so ``down`` can remove the folder
    # while it holds the lock.
    return state_root() / f".{name}.lock"


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Hold the cluster's exclusive lock: one writer at a time (up, down, label)."""
    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


TOKEN_FILE = "token"


def node_token_path(name: str, node: str) -> Path:
    """Where meshlab keeps the CA token of node ``node``'s agent (mode 0600)."""
    return cluster_dir(name) / "nodes" / node / TOKEN_FILE


def node_tokens(name: str) -> dict[str, str]:
    """token -> node name, for every node agent of cluster ``name``."""
    tokens: dict[str, str] = {}
    for path in (cluster_dir(name) / "nodes").glob(f"*/{TOKEN_FILE}"):
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
            if token:
                tokens[token] = path.parent.name
    return tokens


def pod_token_path(name: str, namespace: str, pod: str) -> Path:
    """Where meshlab keeps the CA token of a pod that asks for its own identity (a
    waypoint), as a projected service-account token would be mounted (mode 0600)."""
    return cluster_dir(name) / "pods" / namespace / pod / TOKEN_FILE


def pod_identities(name: str, trust_domain: str) -> dict[str, str]:
    """token -> the SPIFFE ID of the pod it was issued to, for the pods that still exist."""
    try:
        state = read_state(name)
    except StateFileError:
        return {}
    accounts = {(p.namespace, p.name): p.service_account for p in state.pods}
    found: dict[str, str] = {}
    for path in (cluster_dir(name) / "pods").glob(f"*/*/{TOKEN_FILE}"):
        key = (path.parent.parent.name, path.parent.name)
        account = accounts.get(key)
        if account is None:
            continue
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
            if token:
                found[token] = f"spiffe://{trust_domain}/ns/{key[0]}/sa/{account}"
    return found
