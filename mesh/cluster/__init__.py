"""The cluster description: the source of truth of the local mode.

Owns the typed model of a small Kubernetes-like cluster (nodes, namespaces
with labels, service accounts, pods, services), its parsing from the
``cluster.yaml`` that users write, and the on-disk state file that ``meshlab``
keeps for a running cluster. ``meshlab`` writes that file; ``meshd`` reads it
(and the same shape from a plain file) the way it would read the Kubernetes
API. Keys are Kubernetes-style camelCase.

May import: the standard library and ``mesh`` siblings only.
"""

from mesh.cluster.errors import ClusterSpecError, StateFileError
from mesh.cluster.labels import LabelEdit, apply_label_edits, parse_label_edits, selector_matches
from mesh.cluster.model import (
    Cluster,
    Namespace,
    Network,
    Node,
    Pod,
    Service,
    ServiceAccount,
    ServicePort,
)
from mesh.cluster.parse import parse_spec

__all__ = [
    "Cluster",
    "ClusterSpecError",
    "LabelEdit",
    "Namespace",
    "Network",
    "Node",
    "Pod",
    "Service",
    "ServiceAccount",
    "ServicePort",
    "StateFileError",
    "apply_label_edits",
    "parse_label_edits",
    "parse_spec",
    "selector_matches",
]
