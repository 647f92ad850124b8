"""``python -m mesh.xds``: subscribe to meshd as a node agent would, and print what arrives.

    python -m mesh.xds [--target 127.0.0.1:15012] [--root ROOT.pem | --plaintext]
                       [--node ztunnel~node1] [--watch]

Prints the workloads, services and policies of the feed once it is synced
(with ``--watch``, again at every change), so an operator sees exactly what
the proxies are told.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

import grpc

from mesh.xds.client import XdsClient
from mesh.xds.state import XdsState


def render(state: XdsState) -> str:
    lines = [f"{'WORKLOAD':<34} {'IP':<15} {'NODE':<10} {'PROTOCOL':<8} {'SERVICES / POLICIES'}"]
    for w in sorted(state.workloads.values(), key=lambda w: (w.namespace, w.name)):
        extras = [name.split("/", 1)[1].split(".", 1)[0] for name in w.services]
        extras += [f"policy:{p}" for p in w.authorization_policies]
        address = str(w.addresses[0]) if w.addresses else "-"
        lines.append(
            f"{w.namespace + '/' + w.name:<34} {address:<15} {w.node:<10} "
            f"{w.tunnel_protocol.name:<8} {', '.join(extras) or '-'}"
        )
    lines.append("")
    lines.append(f"{'SERVICE':<34} {'VIP':<15} {'PORTS':<12} WAYPOINT")
    for s in sorted(state.services.values(), key=lambda s: (s.namespace, s.name)):
        vip = str(s.addresses[0]) if s.addresses else "-"
        ports = ",".join(f"{p.service_port}->{p.target_port}" for p in s.ports) or "-"
        waypoint = str(s.waypoint.address) if s.waypoint else "-"
        lines.append(f"{s.namespace + '/' + s.name:<34} {vip:<15} {ports:<12} {waypoint}")
    if state.policies:
        lines.append("")
        lines.append(f"{'POLICY':<34} {'SCOPE':<18} {'ACTION':<6} RULES")
        for p in sorted(state.policies.values(), key=lambda p: (p.namespace, p.name)):
            lines.append(
                f"{p.namespace + '/' + p.name:<34} {p.scope.name:<18} {p.action.name:<6} "
                f"{len(p.rules)}"
            )
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    credentials = None
    if not args.plaintext:
        if args.root is None:
            print("mesh.xds: --root ROOT.pem (the mesh root) or --plaintext", file=sys.stderr)
            return 2
        credentials = grpc.ssl_channel_credentials(args.root.read_bytes())
    changed = asyncio.Event()
    client = XdsClient(
        args.target,
        node_id=args.node,
        credentials=credentials,
        on_update=lambda _state: changed.set(),
        backoff_initial_s=0.1,
    )
    task = asyncio.ensure_future(client.run())
    try:
        try:
            state = await client.wait_synced(args.timeout)
        except TimeoutError:
            print(
                f"mesh.xds: no synced feed from {args.target} in {args.timeout:g} s",
                file=sys.stderr,
            )
            return 1
        print(render(state), flush=True)
        while args.watch:
            changed.clear()
            await changed.wait()
            print(f"\n-- changed --\n{render(client.state)}", flush=True)
        return 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.xds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default="127.0.0.1:15012")
    parser.add_argument("--root", type=Path, help="the mesh root certificate (PEM)")
    parser.add_argument("--plaintext", action="store_true", help="for meshd's plaintext port")
    parser.add_argument("--node", default="ztunnel~node1", help="the node id to subscribe as")
    parser.add_argument("--watch", action="store_true")
    parser.add_argument("--timeout", type=float, default=15.0)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_main(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
