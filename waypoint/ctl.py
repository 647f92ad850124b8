"""``waypoint-ctl``: a waypoint's view, for operators, as ``istioctl`` shows an Envoy's.

    waypoint-ctl [--cluster NAME] -n NS [--gateway waypoint] explain \
        'GET http://reviews:9080/x -H user-agent:iPhone'
    waypoint-ctl ... config-dump | clusters
    waypoint-ctl ... explain --as cluster.local/ns/shop/sa/frontend --from 10.244.1.5 \
        'GET http://reviews:9080/admin -H "authorization: Bearer $TOKEN"'
    waypoint-ctl --admin http://127.0.0.1:15000 explain ...   # any waypoint's admin
    waypoint-ctl -f dump.json explain ...                      # a saved /config_dump

On a meshlab cluster the waypoint's admin port (loopback inside its pod) is
reached from inside the pod's network namespace. ``explain`` decides with
the waypoint's own code (:mod:`waypoint.explain`) on its live configuration
and endpoint health, its filters included (local rate limit, JWT, RBAC, fault):
``--as`` is the HBONE peer identity assumed (default: none, an unauthenticated
connection), ``--from`` the source address (default: unknown). Exit codes: 0
explained, 1 the request would be refused or answered by the waypoint itself,
2 usage, 3 no answer.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import urllib.request
from typing import Any

from waypoint.config.dump import config_from_dump
from waypoint.explain import ExplainError, explain

FETCH = """
import sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:15000" + sys.argv[1], timeout=5) as r:
    sys.stdout.write(r.read().decode())
"""


class CtlError(Exception):
    pass


def _fetch(args: argparse.Namespace, path: str) -> str:
    if args.file:
        if path.startswith("/config_dump"):
            with open(args.file) as f:
                return f.read()
        raise CtlError(f"{path} needs a running waypoint (use --admin or a meshlab cluster)")
    if args.admin:
        with urllib.request.urlopen(args.admin.rstrip("/") + path, timeout=5) as r:
            return str(r.read().decode())
    from mesh.cluster.statefile import list_clusters, read_state

    name = args.cluster
    if name is None:
        running = list_clusters()
        if len(running) != 1:
            raise CtlError(
                "no single meshlab cluster running: give --cluster NAME, --admin URL or -f FILE"
            )
        name = running[0]
    state = read_state(name)
    pods = [
        p
        for p in state.pods
        if p.namespace == args.namespace
        and p.labels.get("gateway.networking.k8s.io/gateway-name") == args.gateway
    ]
    if not pods or not pods[0].netns:
        raise CtlError(f"no waypoint {args.namespace}/{args.gateway} runs in cluster {name}")
    done = subprocess.run(
        ["ip", "netns", "exec", pods[0].netns, sys.executable, "-c", FETCH, path],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    if done.returncode != 0:
        raise CtlError(f"the waypoint's admin did not answer: {done.stderr.strip()[-300:]}")
    return done.stdout


def _health(text: str) -> dict[str, dict[str, Any]]:
    doc = json.loads(text)
    out: dict[str, dict[str, Any]] = {}
    for c in doc.get("cluster_statuses") or []:
        for h in c.get("host_statuses") or []:
            sa = h["address"]["socket_address"]
            address = f"{sa['address']}:{sa['port_value']}"
            stats = {s["name"]: s["value"] for s in h.get("stats") or []}
            out.setdefault(c["name"], {})[address] = {
                "ejected": h.get("health_status", {}).get("failed_outlier_check", False),
                "active": stats.get("rq_active", 0),
            }
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="waypoint-ctl",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cluster", help="the meshlab cluster (default: the only one running)")
    p.add_argument("-n", "--namespace", default="default", help="the waypoint's namespace")
    p.add_argument("--gateway", default="waypoint", help="the waypoint Gateway's name")
    p.add_argument("--admin", help="a waypoint's admin URL instead of a meshlab pod")
    p.add_argument("-f", "--file", help="a saved /config_dump instead of a live waypoint")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="where one request goes, and why")
    ex.add_argument("request", help="'METHOD URL [-H name:value]...'")
    ex.add_argument(
        "--as",
        dest="peer_identity",
        default="",
        metavar="SPIFFE_ID",
        help="the HBONE peer identity assumed, e.g. spiffe://cluster.local/ns/shop/sa/frontend "
        "(default: none, an unauthenticated connection)",
    )
    ex.add_argument(
        "--from",
        dest="source_ip",
        default=None,
        metavar="IP",
        help="the source address assumed (default: unknown: no address rule matches it)",
    )
    sub.add_parser("config-dump", help="the waypoint's /config_dump (Envoy's shape)")
    sub.add_parser("clusters", help="clusters, endpoints, health and ejections")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config-dump":
            print(_fetch(args, "/config_dump?include_eds"))
            return 0
        if args.command == "clusters":
            print(
                _fetch(args, "/clusters" + ("?format=json" if args.output == "json" else "")),
                end="",
            )
            return 0
        config = config_from_dump(json.loads(_fetch(args, "/config_dump?include_eds")))
        health = {} if args.file else _health(_fetch(args, "/clusters?format=json"))
        result = explain(
            config,
            args.request,
            namespace=args.namespace,
            health=health,
            peer_identity=args.peer_identity,
            source_ip=args.source_ip,
        )
    except (CtlError, OSError, ValueError) as e:
        print(f"waypoint-ctl: {e}", file=sys.stderr)
        return 2 if isinstance(e, ExplainError) else 3
    print(json.dumps(result.to_dict(), indent=1) if args.output == "json" else result.text())
    return 0 if result.verdict.get("kind") in ("forward", "tcp", "redirect") else 1


if __name__ == "__main__":
    sys.exit(main())
