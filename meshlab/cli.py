"""The ``meshlab`` command: a local cluster of network namespaces.

meshlab up [-f cluster.yaml] [--name NAME] [--nodes N --pods-per-node M]
           [--mesh [--image IMAGE] [--capture iptables|ebpf]]
meshlab down [--name NAME]
meshlab status [--name NAME] [-o table|json|yaml]
meshlab exec [--name NAME] POD|NODE -- CMD...
meshlab label [--name NAME] namespace NS key=value|key- ... [--overwrite]
meshlab label [--name NAME] pod POD [-n NS] key=value|key- ... [--overwrite]
meshlab label [--name NAME] service SVC [-n NS] key=value|key- ... [--overwrite]
meshlab apply -f FILE / meshlab delete -f FILE / meshlab delete KIND NAME [-n NS]
meshlab get KIND [NAME] [-n NS | -A] [-o table|json|yaml]
meshlab list
meshlab app echo [--port PORT]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from mesh.cluster import Cluster, apply_label_edits, parse_label_edits, parse_spec
from mesh.cluster.errors import ClusterError
from mesh.cluster.model import CAPTURE_BACKENDS
from mesh.cluster.statefile import list_clusters, locked, read_state, write_state
from meshlab import apply as apply_cmd
from meshlab import cgroups, lifecycle, names, procs
from meshlab import mesh as mesh_procs
from meshlab.errors import ClusterNotFoundError, MeshlabError
from meshlab.status import render, status_document


def _err(message: str) -> None:
    print(f"meshlab: error: {message}", file=sys.stderr)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_cluster_file(path: Path) -> Cluster:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise MeshlabError(f"cluster file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise MeshlabError(f"cluster file {path} is not valid YAML: {e}") from e
    try:
        return parse_spec(raw)
    except ClusterError as e:
        raise MeshlabError(f"cluster file {path}: {e}") from e


def generated_cluster(nodes: int, pods_per_node: int) -> Cluster:
    """``--nodes N --pods-per-node M``: echo pods on every node behind one service."""
    if not 1 <= nodes <= 200 or not 0 <= pods_per_node <= 250:
        raise MeshlabError("--nodes must be 1-200 and --pods-per-node 0-250")
    doc: dict[str, Any] = {
        "nodes": [{"name": f"node{i + 1}"} for i in range(nodes)],
        "pods": [
            {
                "name": f"echo-{i + 1}-{j + 1}",
                "node": f"node{i + 1}",
                "labels": {"app": "echo"},
                "command": ["meshlab", "app", "echo", "--port", "8080"],
            }
            for i in range(nodes)
            for j in range(pods_per_node)
        ],
        "services": [
            {
                "name": "echo",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
                "selector": {"app": "echo"},
            }
        ],
    }
    return parse_spec(doc)


def cmd_up(args: argparse.Namespace) -> int:
    if args.file and (args.nodes or args.pods_per_node is not None):
        raise MeshlabError("give either -f FILE or --nodes/--pods-per-node, not both")
    if args.file:
        spec = load_cluster_file(Path(args.file))
    else:
        ppn = 2 if args.pods_per_node is None else args.pods_per_node
        spec = generated_cluster(args.nodes or 2, ppn)
    name = names.validate_cluster_name(args.name or spec.name or names.DEFAULT_CLUSTER_NAME)
    if args.mesh:
        spec = replace(spec, mesh=True)
    if args.capture is not None:
        if not spec.mesh:
            raise MeshlabError("--capture is for the mesh's nodes: give --mesh too")
        spec = replace(spec, nodes=tuple(replace(n, capture=args.capture) for n in spec.nodes))
    state = lifecycle.up(spec, name, log=_log, image=args.image)
    _log(
        f"cluster {name!r} is up: {len(state.nodes)} nodes, {len(state.pods)} pods, "
        f"{len(state.services)} services. `meshlab status --name {name}` shows it; "
        f"`meshlab down --name {name}` removes it."
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.name is None:
        running = list_clusters()
        if len(running) != 1:
            raise ClusterNotFoundError(
                "no meshlab cluster is running (pass --name NAME to clean up after a crash)"
                if not running
                else f"{len(running)} clusters are running ({', '.join(running)}); "
                "pick one with --name"
            )
        name = running[0]
    else:
        name = names.validate_cluster_name(args.name)
    report = lifecycle.down(name, log=_log)
    for warning in report.warnings:
        _log(f"warning: {warning}")
    _log(f"cluster {name!r}: nothing to remove" if report.empty else f"cluster {name!r} is down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = read_state(lifecycle.resolve_name(args.name))
    print(render(status_document(state), args.output))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in list_clusters():
        print(name)
    return 0


def _resolve_target(
    state: Cluster, target: str, namespace: str | None
) -> tuple[str, dict[str, str], Path | None]:
    """A pod (``ns/name``, ``name`` with ``-n``, or a unique ``name``) or a node (``node/name``)."""
    env = dict(os.environ)
    assert state.name
    env[names.PROCESS_MARKER_ENV] = state.name
    kind, _, rest = target.partition("/")
    if kind == "node" and rest:
        nodes = [n for n in state.nodes if n.name == rest]
    elif "/" not in target and namespace is None:
        nodes = [n for n in state.nodes if n.name == target]
    else:
        nodes = []
    if "/" in target and kind != "node":
        namespace, target = kind, rest
    pods = [
        p
        for p in state.pods
        if p.name == target and (namespace is None or p.namespace == namespace)
    ]
    if len(nodes) + len(pods) > 1:
        choices = [f"node/{n.name}" for n in nodes] + [p.key for p in pods]
        raise MeshlabError(f"{target!r} is ambiguous: {', '.join(choices)}")
    if nodes:
        assert nodes[0].netns
        return nodes[0].netns, env, None
    if pods:
        pod = pods[0]
        assert pod.netns
        env.update(lifecycle.pod_env(state, pod))
        cgroup = (
            cgroups.pod_dir(state.name, pod.node, pod.container_id) if pod.container_id else None
        )
        return pod.netns, env, cgroup
    known = [p.key for p in state.pods] + [f"node/{n.name}" for n in state.nodes]
    raise MeshlabError(
        f"no pod or node {target!r} in cluster {state.name!r} (known: {', '.join(known)})"
    )


def cmd_exec(args: argparse.Namespace) -> int:
    lifecycle.require_root("meshlab exec")
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise MeshlabError("no command given: meshlab exec POD|NODE -- CMD...")
    state = read_state(lifecycle.resolve_name(args.name))
    netns, env, cgroup = _resolve_target(state, args.target, args.namespace)
    sys.stdout.flush()
    procs.exec_in(netns, command, env, cgroup)
    return 127  # not reached: exec replaces this process


def cmd_label(args: argparse.Namespace) -> int:
    edits = parse_label_edits(args.labels)
    if not edits:
        raise MeshlabError("no labels given: key=value to set, key- to remove")
    name = lifecycle.resolve_name(args.name)
    kind = {
        "namespaces": "namespace",
        "ns": "namespace",
        "pods": "pod",
        "services": "service",
        "svc": "service",
    }.get(args.kind, args.kind)
    outcome: dict[str, bool] = {}

    def change(state: Cluster) -> Cluster:
        if kind == "namespace":
            try:
                ns = state.namespace(args.object)
            except KeyError:
                raise MeshlabError(f'namespaces "{args.object}" not found') from None
            labels = apply_label_edits(
                ns.labels, edits, overwrite=args.overwrite, what=f"namespace/{ns.name}"
            )
            outcome["changed"] = labels != dict(ns.labels)
            return state.with_namespace_labels(ns.name, labels)
        if kind == "service":
            svc_ns = args.namespace or "default"
            found = [s for s in state.services if s.name == args.object and s.namespace == svc_ns]
            if not found:
                raise MeshlabError(f'services "{args.object}" not found in namespace "{svc_ns}"')
            svc = found[0]
            labels = apply_label_edits(
                svc.labels, edits, overwrite=args.overwrite, what=f"service/{svc.name}"
            )
            outcome["changed"] = labels != dict(svc.labels)
            return state.with_service_labels(svc_ns, svc.name, labels)
        pod_ns = args.namespace or "default"
        target = args.object
        if "/" in target:
            pod_ns, target = target.split("/", 1)
        matches = [p for p in state.pods if p.name == target and p.namespace == pod_ns]
        if not matches:
            raise MeshlabError(f'pods "{target}" not found in namespace "{pod_ns}"')
        pod = matches[0]
        labels = apply_label_edits(
            pod.labels, edits, overwrite=args.overwrite, what=f"pod/{pod.name}"
        )
        outcome["changed"] = labels != dict(pod.labels)
        return state.with_pod_labels(pod.key, labels)

    read_state(name)  # a clear error for an unknown cluster, before taking its lock
    with locked(name):
        state = read_state(name)
        changed = change(state)
        # Only a real change bumps the resourceVersion that watchers follow.
        if outcome["changed"]:
            write_state(changed)
    shown = f"{kind}/{args.object}"
    print(f"{shown} labeled" if outcome["changed"] else f"{shown} not labeled")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    documents = apply_cmd.read_documents(Path(args.file))
    name = lifecycle.resolve_name(args.name)
    for line in apply_cmd.apply(name, documents, _log):
        print(line)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    name = lifecycle.resolve_name(args.name)
    if args.file:
        if args.words:
            raise MeshlabError("give -f FILE or KIND NAME, not both")
        targets = apply_cmd.targets_of(apply_cmd.read_documents(Path(args.file)))
    else:
        if len(args.words) != 2:
            raise MeshlabError("give -f FILE, or KIND NAME [-n NAMESPACE]")
        kind, obj = args.words
        targets = [(apply_cmd.kind_of(kind), args.namespace or "default", obj)]
    for line in apply_cmd.delete(name, targets, _log):
        print(line)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if len(args.words) > 2:
        raise MeshlabError("give KIND [NAME]")
    kind = apply_cmd.kind_of(args.words[0])
    obj = args.words[1] if len(args.words) == 2 else None
    name = lifecycle.resolve_name(args.name)
    state = read_state(name)
    namespace = None if args.all_namespaces else (args.namespace or "default")
    items = [dict(i) for i in apply_cmd.resources_of(state, kind, namespace)]
    if obj:
        items = [i for i in items if (i.get("metadata") or {}).get("name") == obj]
        if not items:
            raise MeshlabError(f'{kind.lower()} "{obj}" not found')
    statuses = _meshd_statuses(state)
    for item in items:
        meta = item.get("metadata") or {}
        key = f"{kind}/{meta.get('namespace') or 'default'}/{meta.get('name')}"
        if key in statuses:
            item["status"] = {**dict(item.get("status") or {}), **statuses[key]}
    if args.output in ("yaml", "json"):
        doc: Any = items[0] if obj else {"apiVersion": "v1", "kind": "List", "items": items}
        print(render(doc, args.output))
        return 0
    rows = [["NAMESPACE", "NAME", "STATUS"]]
    for item in items:
        meta = item.get("metadata") or {}
        rows.append(
            [str(meta.get("namespace") or "default"), str(meta.get("name")), _summary(item)]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _meshd_statuses(state: Cluster) -> dict[str, Any]:
    """What meshd says of each object (its /debug/status), when it runs."""
    import json
    import urllib.request

    if not state.mesh or state.network.gateway is None:
        return {}
    url = f"http://{state.network.gateway}:{mesh_procs.STATUS_PORT}/debug/status"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            doc = json.loads(answer.read())
    except (OSError, ValueError):
        return {}
    return {
        f"{o['kind']}/{o['namespace']}/{o['name']}": o.get("status") or {}
        for o in doc.get("objects") or []
    }


def _summary(item: dict[str, Any]) -> str:
    status = item.get("status") or {}
    parts = []
    for c in status.get("conditions") or []:
        parts.append(f"{c.get('type')}={c.get('status')}")
    for p in status.get("parents") or []:
        ref = p.get("parentRef") or {}
        conds = ",".join(f"{c.get('type')}={c.get('status')}" for c in p.get("conditions") or [])
        parts.append(f"{ref.get('kind')}/{ref.get('name')}: {conds}")
    addresses = [a.get("value") for a in status.get("addresses") or []]
    if addresses:
        parts.append("address " + ",".join(str(a) for a in addresses))
    if item.get("kind") == "Service":
        parts.append(f"clusterIP {(item.get('spec') or {}).get('clusterIP')}")
    return "; ".join(parts) or "-"


def cmd_app(args: argparse.Namespace) -> int:
    if args.app == "echo":
        from meshlab.apps import echo

        return echo.main(args.app_args)
    raise MeshlabError(f"unknown app {args.app!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlab",
        description="A local cluster of Linux network namespaces: nodes and pods "
        "built the way a Kubernetes node builds them, for running the mesh without Kubernetes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_name(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--name", help="cluster name (default: the only one running)")
        return p

    up = with_name(sub.add_parser("up", help="create a cluster"))
    up.add_argument("-f", "--file", help="cluster description (YAML)")
    up.add_argument("--nodes", type=int, help="generate N nodes (default 2)")
    up.add_argument("--pods-per-node", type=int, help="echo pods per node (default 2)")
    up.add_argument(
        "--mesh",
        action="store_true",
        help="run the mesh too: meshd, and the node agent, ztunnel and ztunnel-cni on each node",
    )
    up.add_argument(
        "--image",
        metavar="IMAGE",
        help="with --mesh: run meshd, the node agents, the ztunnels and the waypoints from "
        "this image in podman containers, with the manifests' privileges",
    )
    up.add_argument(
        "--capture",
        choices=CAPTURE_BACKENDS,
        help="with --mesh: every node's capture backend (else each node's 'capture' in the "
        "cluster file, iptables by default)",
    )
    up.set_defaults(func=cmd_up)

    down = with_name(sub.add_parser("down", help="remove a cluster and everything it made"))
    down.set_defaults(func=cmd_down)

    status = with_name(sub.add_parser("status", help="show a cluster"))
    status.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    status.set_defaults(func=cmd_status)

    lst = sub.add_parser("list", help="names of the running clusters")
    lst.set_defaults(func=cmd_list)

    ex = with_name(sub.add_parser("exec", help="run a command in a pod's or node's namespace"))
    ex.add_argument("-n", "--namespace", help="the pod's namespace")
    ex.add_argument("target", help="POD, NS/POD, NODE or node/NODE")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    ex.set_defaults(func=cmd_exec)

    lab = with_name(sub.add_parser("label", help="set or remove labels, as kubectl label"))
    lab.add_argument(
        "kind",
        choices=["namespace", "namespaces", "ns", "pod", "pods", "service", "services", "svc"],
    )
    lab.add_argument("object", help="namespace, pod or service name (pods: NS/NAME or -n NS)")
    lab.add_argument("labels", nargs="+", help="key=value to set, key- to remove")
    lab.add_argument(
        "-n", "--namespace", help="the pod's or service's namespace (default: default)"
    )
    lab.add_argument("--overwrite", action="store_true", help="allow changing existing values")
    lab.set_defaults(func=cmd_label)

    kinds = ", ".join(apply_cmd.KINDS)
    apply = with_name(
        sub.add_parser("apply", help=f"create or update objects, as kubectl ({kinds})")
    )
    apply.add_argument("-f", "--file", required=True, help="YAML, one or more documents")
    apply.set_defaults(func=cmd_apply)

    delete = with_name(sub.add_parser("delete", help="delete objects, as kubectl"))
    delete.add_argument("-f", "--file", help="the YAML the objects were applied from")
    # KIND and NAME are one positional list; main() gathers words that follow an
    # option (`delete KIND -n NS NAME`), which argparse alone would refuse.
    delete.add_argument(
        "words", nargs="*", metavar="KIND NAME", help="e.g. httproute canary (kinds: svc, ap, ...)"
    )
    delete.add_argument("-n", "--namespace", help="its namespace (default: default)")
    delete.set_defaults(func=cmd_delete)

    get = with_name(sub.add_parser("get", help="show objects and their status, as kubectl"))
    get.add_argument(
        "words", nargs="+", metavar="KIND [NAME]", help="e.g. gateway, httproute, svc; a name"
    )
    get.add_argument("-n", "--namespace", help="the namespace (default: default)")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", choices=["table", "json", "yaml"], default="table")
    get.set_defaults(func=cmd_get)

    app = sub.add_parser("app", help="run one of the small apps pods use")
    app.add_argument("app", choices=["echo"])
    app.add_argument("app_args", nargs=argparse.REMAINDER)
    app.set_defaults(func=cmd_app)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse as kubectl does: `delete KIND -n NS NAME` keeps NAME after the option."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "words") or any(w.startswith("-") for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.words = [*args.words, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return int(args.func(args))
    except (MeshlabError, ClusterError) as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
