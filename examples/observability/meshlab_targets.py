"""Write the scrape targets of a meshlab cluster for prometheus-meshlab.yaml (file_sd).

    meshlab status --name NAME -o json | python3 examples/observability/meshlab_targets.py DIR

reads the cluster's state (``meshlab status -o json``, or its state file
``/run/meshlab/NAME/state.json``) on stdin and writes Prometheus file_sd
target groups into DIR (prometheus-meshlab.yaml reads them from ``targets/``
beside it):

* ``ztunnel.json``: each node's ztunnel, ``<node IP>:15020`` (ztunnel runs in
  the node's network namespace there), labels ``app="ztunnel"`` and ``node``;
* ``waypoint.json``: each waypoint pod (label
  ``gateway.networking.k8s.io/gateway-name``), ``<pod IP>:15020``, labels
  ``namespace``, ``pod``, ``node`` and the pod's labels with their names made
  Prometheus-safe, as the Kubernetes config's ``labelmap`` makes them.

So the series carry the same target labels as on Kubernetes and the dashboard
works on both. Prometheus rereads the files when they change: run this again
after a waypoint is added or removed. Files are replaced whole (rename), so
Prometheus never reads half of one.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

METRICS_PORT = 15020
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"
USAGE = "usage: meshlab status -o json | meshlab_targets.py DIR"


def label_name(key: str) -> str:
    """A Kubernetes label key as Prometheus' Kubernetes discovery spells it."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def targets(state: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The file_sd documents, by file name, for a cluster's state."""
    ztunnels = [
        {
            "targets": [f"{node['ip']}:{METRICS_PORT}"],
            "labels": {"app": "ztunnel", "node": node["name"]},
        }
        for node in state.get("nodes", [])
        if node.get("ip")
    ]
    waypoints = []
    for pod in state.get("pods", []):
        labels = pod.get("labels") or {}
        if GATEWAY_NAME not in labels or not pod.get("ip"):
            continue
        target_labels = {label_name(k): str(v) for k, v in labels.items()}
        target_labels.update(namespace=pod["namespace"], pod=pod["name"], node=pod["node"])
        waypoints.append({"targets": [f"{pod['ip']}:{METRICS_PORT}"], "labels": target_labels})
    return {"ztunnel.json": ztunnels, "waypoint.json": waypoints}


def write(directory: Path, documents: dict[str, list[dict[str, Any]]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, groups in documents.items():
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=2)
            f.write("\n")
        Path(tmp).replace(directory / name)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    state = json.load(sys.stdin)
    documents = targets(state)
    write(Path(argv[1]), documents)
    for name, groups in documents.items():
        addresses = [t for g in groups for t in g["targets"]]
        print(f"{name}: {', '.join(addresses) or '(none)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
