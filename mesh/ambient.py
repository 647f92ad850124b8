"""Which pods are in the ambient mesh: Istio's labels, one rule for every part.

A pod is in the mesh when its namespace is labelled
``istio.io/dataplane-mode=ambient`` (or the pod itself is), unless the pod
opts out with ``istio.io/dataplane-mode=none``. meshd uses the rule to give a
workload HBONE; the node agent uses it to capture the pod.
"""

from __future__ import annotations

from collections.abc import Mapping

DATAPLANE_MODE = "istio.io/dataplane-mode"


def in_ambient(pod_labels: Mapping[str, str], namespace_labels: Mapping[str, str]) -> bool:
    """True when a pod with ``pod_labels`` in a namespace with ``namespace_labels`` is meshed."""
    mode = pod_labels.get(DATAPLANE_MODE)
    if mode == "none":
        return False
    return mode == "ambient" or namespace_labels.get(DATAPLANE_MODE) == "ambient"
