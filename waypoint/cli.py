"""``waypoint``: the L7 proxy of one waypoint Gateway.

    waypoint --gateway NS/NAME --xds-address HOST:15012 --root-cert ROOT.pem
             --token-file TOKEN [--listen 0.0.0.0:15008]

It runs as the Gateway's instance (on meshlab, the pod named after the
Gateway; on Kubernetes, its Deployment's pods): its identity is
``spiffe://<trust domain>/ns/<namespace>/sa/<service account>`` (the
service account named by ``--service-account`` or ``SERVICE_ACCOUNT``,
default the Gateway's name), its certificate comes from meshd's CA with the
pod's token, its configuration from meshd's feed. Ports as Istio's: HBONE
15008, admin 15000 (loopback), metrics 15020, readiness 15021.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
import uvloop

from mesh.caclient import CaClient
from mesh.identity import SpiffeId
from waypoint.admin import AdminServers
from waypoint.runtime import WaypointRuntime

log = logging.getLogger("waypoint")


def _address(text: str) -> tuple[str, int] | None:
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _gateway(text: str) -> tuple[str, str]:
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME")
    return ns, name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="waypoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gateway", type=_gateway, required=True, help="the Gateway, NAMESPACE/NAME")
    p.add_argument("--xds-address", required=True, help="meshd's xDS address, HOST:PORT")
    p.add_argument("--ca-address", help="meshd's CA address (default: the xDS address)")
    p.add_argument("--root-cert", type=Path, help="the mesh root (PEM), to check meshd's TLS")
    p.add_argument("--plaintext", action="store_true", help="xDS and CA without TLS (tests)")
    p.add_argument("--token-file", type=Path, required=True, help="the pod's token for the CA")
    p.add_argument("--service-account", default=os.environ.get("SERVICE_ACCOUNT", ""))
    p.add_argument("--pod-name", default=os.environ.get("POD_NAME", ""))
    p.add_argument("--pod-ip", default=os.environ.get("POD_IP", "0.0.0.0"))
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--listen", type=_address, default="0.0.0.0:15008", help="HBONE, HOST:PORT")
    p.add_argument("--admin-address", type=_address, default="127.0.0.1:15000")
    p.add_argument("--metrics-address", type=_address, default="0.0.0.0:15020")
    p.add_argument("--readiness-address", type=_address, default="0.0.0.0:15021")
    p.add_argument("--drain-seconds", type=float, default=5.0)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--access-log",
        action="store_true",
        help="one line per request (INFO), besides the access logs meshd's config asks for",
    )
    p.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="the --access-log line: Istio's text format or its JSON fields",
    )
    return p


async def run(args: argparse.Namespace) -> int:
    namespace, gateway = args.gateway
    secure = None
    if not args.plaintext:
        if args.root_cert is None:
            log.error("waypoint: --root-cert is needed to talk TLS to meshd (or --plaintext)")
            return 2
        secure = grpc.ssl_channel_credentials(args.root_cert.read_bytes())
    identity = SpiffeId(
        trust_domain=args.trust_domain,
        namespace=namespace,
        service_account=args.service_account or gateway,
    )
    ca = CaClient(
        args.ca_address or args.xds_address,
        lambda: args.token_file.read_text().strip(),
        credentials=secure,
    )
    runtime = WaypointRuntime(
        namespace=namespace,
        gateway=gateway,
        pod=args.pod_name or gateway,
        pod_ip=args.pod_ip,
        identity=identity,
        fetch_certificate=ca.fetch,
        xds_target=args.xds_address,
        xds_credentials=secure,
        freeze_gc=True,
        log_json=args.log_format == "json",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = AdminServers(runtime, quit=stop.set)
    try:
        await servers.start(
            admin=args.admin_address, metrics=args.metrics_address, readiness=args.readiness_address
        )
    except OSError as e:
        log.error("waypoint: cannot listen: %s", e)
        await ca.close()
        return 1
    host, port = args.listen
    main = asyncio.ensure_future(runtime.run(host, port))
    stopper = asyncio.ensure_future(stop.wait())
    log.info("waypoint: %s/%s as %s, xDS %s", namespace, gateway, identity, args.xds_address)
    try:
        done, _ = await asyncio.wait({main, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if main in done:
            main.result()
            return 1
        log.info("waypoint: stopping, draining for up to %g s", args.drain_seconds)
        await runtime.drain(args.drain_seconds)
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
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("waypoint.access").setLevel(
        logging.INFO if args.access_log else logging.WARNING
    )
    try:
        return uvloop.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
