"""``meshlab status``: the state of a cluster as a table, JSON or YAML.

JSON and YAML are the state document (the cluster file's shape, with runtime
fields) plus each pod's ``phase`` and each service's ``endpoints``: stable for
scripts. The table is for people.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from mesh.cluster import Cluster
from meshlab import mesh, procs
from meshlab.lifecycle import pod_phase


def status_document(state: Cluster) -> dict[str, Any]:
    doc = state.to_dict()
    for pod_doc, pod in zip(doc["pods"], state.pods, strict=True):
        pod_doc["phase"] = pod_phase(pod)
    for svc_doc, svc in zip(doc["services"], state.services, strict=True):
        svc_doc["endpoints"] = [
            {"pod": p.name, "ip": str(p.ip), "node": p.node}
            for p in state.endpoints(svc)
            if p.ip is not None
        ]
    if state.mesh and state.name:
        doc["meshProcesses"] = _mesh_processes(state)
    return doc


def _mesh_processes(state: Cluster) -> list[dict[str, Any]]:
    """meshd and each node's agent and ztunnel: pid and whether it still runs."""
    assert state.name
    pids = mesh.pids(state.name)
    found: list[tuple[str, str, Any, str | None]] = [("meshd", "-", pids.get("meshd"), None)]
    for node in state.nodes:
        entry = pids.get("nodes", {}).get(node.name, {})
        for part in ("agent", "ztunnel"):
            found.append(
                (
                    "ztunnel-node-agent" if part == "agent" else "ztunnel",
                    node.name,
                    entry.get(part),
                    node.netns,
                )
            )
    return [
        {
            "process": what,
            "node": where,
            "pid": pid,
            "running": isinstance(pid, int)
            and (procs.is_running_in(pid, netns) if netns else procs.is_alive(pid)),
        }
        for what, where, pid, netns in found
    ]


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "<none>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def render_table(doc: Mapping[str, Any]) -> str:
    net = doc["network"]
    out = [
        f"cluster {doc['name']}  phase {doc.get('phase', '?')}  "
        f"resourceVersion {doc['resourceVersion']}",
        f"underlay {net.get('underlay', '?')} on bridge {net.get('bridge', '?')} "
        f"(gateway {net.get('gateway', '?')}), pods {net['podCIDR']}, "
        f"services {net['serviceCIDR']}",
        "",
    ]
    out += _table(
        ["NODE", "IP", "POD CIDR", "NETNS", "CAPTURE"],
        [
            [
                n["name"],
                n.get("ip", ""),
                n["podCIDR"],
                n.get("netns", ""),
                n.get("capture", "iptables"),
            ]
            for n in doc["nodes"]
        ],
    )
    out.append("")
    out += _table(
        ["NAMESPACE", "LABELS"], [[ns["name"], _labels(ns["labels"])] for ns in doc["namespaces"]]
    )
    out.append("")
    out += _table(
        ["NAMESPACE", "POD", "NODE", "IP", "SERVICE ACCOUNT", "PHASE", "LABELS"],
        [
            [
                p["namespace"],
                p["name"],
                p["node"],
                p.get("ip", ""),
                p["serviceAccount"],
                p.get("phase", ""),
                _labels(p["labels"]),
            ]
            for p in doc["pods"]
        ],
    )
    if doc["services"]:
        out.append("")
        out += _table(
            ["NAMESPACE", "SERVICE", "VIP", "PORTS", "SELECTOR", "ENDPOINTS"],
            [
                [
                    s["namespace"],
                    s["name"],
                    s["vip"],
                    ",".join(f"{p['port']}->{p['targetPort']}/{p['protocol']}" for p in s["ports"]),
                    _labels(s["selector"]),
                    ",".join(e["ip"] for e in s.get("endpoints", [])) or "<none>",
                ]
                for s in doc["services"]
            ],
        )
    if doc.get("meshProcesses"):
        out.append("")
        out += _table(
            ["MESH PROCESS", "NODE", "PID", "STATE"],
            [
                [m["process"], m["node"], str(m["pid"]), "running" if m["running"] else "stopped"]
                for m in doc["meshProcesses"]
            ],
        )
    return "\n".join(out)


def render(doc: Mapping[str, Any], output: str) -> str:
    if output == "json":
        return json.dumps(doc, indent=2)
    if output == "yaml":
        return yaml.safe_dump(dict(doc), sort_keys=False).rstrip()
    return render_table(doc)
