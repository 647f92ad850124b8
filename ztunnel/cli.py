"""``ztunnel``: the node's proxy, fed by meshd and handed pods by the node agent.

    ztunnel --node NODE --xds-address HOST:15012 --root-cert ROOT.pem \\
            --token-file TOKEN --zds-socket /var/run/ztunnel/zds.sock

xDS and certificates come from meshd (or istiod) over TLS checked against
the mesh root; ``--plaintext`` uses 15010 without TLS, for xDS only (the CA
is never asked over plaintext unless ``--ca-plaintext`` says so, for a local
cluster). The node's token authenticates certificate requests; it is read
again on every request, so a rotated token is used. SIGTERM (or SIGINT)
stops accepting and lets live connections finish for ``--drain-seconds``;
so does ``POST /quitquitquit`` on the admin port.

Ports, as Istio's: admin 127.0.0.1:15000, metrics :15020, readiness :15021
(each ``--*-address HOST:PORT`` or ``off``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from pathlib import Path

import grpc
import uvloop

from mesh import logs
from mesh.caclient import CaClient
from mesh.xds import XdsClient
from ztunnel.admin.server import AdminServers
from ztunnel.dns import upstreams_from_resolv_conf
from ztunnel.runtime import Ztunnel

log = logging.getLogger("ztunnel")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ztunnel", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--node", required=True, help="this node's name")
    p.add_argument("--xds-address", required=True, help="meshd's xDS address, HOST:PORT")
    p.add_argument("--ca-address", help="meshd's CA address (default: the xDS address)")
    p.add_argument("--root-cert", type=Path, help="the mesh root (PEM), to check meshd's TLS")
    p.add_argument("--plaintext", action="store_true", help="xDS without TLS (port 15010)")
    p.add_argument(
        "--ca-plaintext",
        action="store_true",
        help="ask the CA without TLS too (local clusters only: the token crosses in clear)",
    )
    p.add_argument("--token-file", type=Path, required=True, help="the node agent's token")
    p.add_argument("--zds-socket", type=Path, required=True, help="the node agent's ZDS socket")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument(
        "--dns-upstream",
        action="append",
        metavar="IP[:PORT]",
        help="where the pods' DNS proxy forwards names it does not own "
        "(default: the nameservers of /etc/resolv.conf)",
    )
    p.add_argument(
        "--bpf-dir",
        type=Path,
        default=Path("/sys/fs/bpf/ztunnel"),
        help="the node's pinned eBPF capture (the node agent's --bpf-dir), read for the "
        "pods it captures",
    )
    p.add_argument("--drain-seconds", type=float, default=5.0)
    p.add_argument(
        "--admin-address", type=_listen, default="127.0.0.1:15000", help="HOST:PORT or 'off'"
    )
    p.add_argument(
        "--metrics-address", type=_listen, default="0.0.0.0:15020", help="HOST:PORT or 'off'"
    )
    p.add_argument(
        "--readiness-address", type=_listen, default="0.0.0.0:15021", help="HOST:PORT or 'off'"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _dns_upstreams(given: list[str] | None) -> list[tuple[str, int]]:
    if not given:
        try:
            return upstreams_from_resolv_conf()
        except OSError as e:
            log.warning("ztunnel: no DNS upstream (/etc/resolv.conf: %s)", e.strerror)
            return []
    return [_upstream(text) for text in given]


def _upstream(text: str) -> tuple[str, int]:
    """``IP``, ``IPv4:PORT`` or ``[IPv6]:PORT``."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = int(number)
    try:
        ipaddress.ip_address(host)
    except ValueError as e:
        raise SystemExit(f"ztunnel: --dns-upstream {text!r}: not an IP address") from e
    return host, port


def _listen(text: str) -> tuple[str, int] | None:
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT or 'off'")
    return host.strip("[]") or "0.0.0.0", int(port)


def _token(path: Path) -> str:
    return path.read_text().strip()


async def run(args: argparse.Namespace) -> int:
    secure = None
    if not args.plaintext or not args.ca_plaintext:
        if args.root_cert is None:
            log.error("ztunnel: --root-cert is needed to talk TLS to meshd (or --plaintext)")
            return 2
        secure = grpc.ssl_channel_credentials(args.root_cert.read_bytes())
    ca = CaClient(
        args.ca_address or args.xds_address,
        lambda: _token(args.token_file),
        credentials=None if args.ca_plaintext else secure,
    )
    xds = XdsClient(
        args.xds_address,
        node_id=f"ztunnel~{args.node}",
        credentials=None if args.plaintext else secure,
    )
    ztunnel = Ztunnel(
        xds=xds,
        fetch_certificate=ca.fetch,
        zds_path=str(args.zds_socket),
        trust_domain=args.trust_domain,
        dns_upstreams=_dns_upstreams(args.dns_upstream),
        bpf_dir=args.bpf_dir,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = AdminServers(ztunnel, node=args.node, xds_address=args.xds_address, quit=stop.set)
    try:
        await servers.start(
            admin=args.admin_address, metrics=args.metrics_address, readiness=args.readiness_address
        )
    except OSError as e:
        log.error("ztunnel: cannot listen: %s", e)
        await ca.close()
        return 1
    main = asyncio.ensure_future(ztunnel.run())
    stopper = asyncio.ensure_future(stop.wait())
    log.info("ztunnel: node %s, xDS %s, ZDS %s", args.node, args.xds_address, args.zds_socket)
    try:
        done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if main in done:
            main.result()
            return 1
        log.info("ztunnel: stopping, draining for up to %g s", args.drain_seconds)
        await ztunnel.drain(args.drain_seconds)
        return 0
    finally:
        stopper.cancel()
        main.cancel()
        with contextlib.suppress(BaseException):
            await main
        await servers.close()
        await ca.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level.upper())
    try:
        return uvloop.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
