"""``python -m mesh.hbone``: probe and relay HBONE by hand.

    serve    terminate HBONE on --listen and forward every accepted CONNECT
             to its :authority over plain TCP
    forward  accept plain TCP on --listen and tunnel each connection over HBONE
             to --peer, asking for --target

Both take the workload's --cert/--key and the mesh roots --ca (PEM files).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from mesh.hbone.channel import PlainProtocol
from mesh.hbone.errors import HboneError
from mesh.hbone.forward import Forwarder
from mesh.hbone.pool import HboneClientPool, PoolKey
from mesh.hbone.server import ConnectRequest, HboneServer, open_upstream
from mesh.hbone.settings import HboneConfig
from mesh.hbone.tls import TlsIdentity
from mesh.hbone.tuning import tune_malloc
from mesh.identity import IdentityError, SpiffeId

log = logging.getLogger("mesh.hbone")


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _identity(text: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except IdentityError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.hbone",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--listen", type=_address, required=True, help="HOST:PORT to listen on")
        p.add_argument("--cert", type=Path, required=True, help="certificate chain (PEM)")
        p.add_argument("--key", type=Path, required=True, help="private key (PEM)")
        p.add_argument("--ca", type=Path, required=True, help="mesh root certificates (PEM)")
        p.add_argument(
            "--workers",
            type=int,
            default=1,
            help="processes sharing the port with SO_REUSEPORT (default 1)",
        )
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    serve = sub.add_parser("serve", help="terminate HBONE, relay each CONNECT to its authority")
    common(serve)
    fwd = sub.add_parser("forward", help="tunnel each plaintext connection over HBONE")
    common(fwd)
    fwd.add_argument("--peer", type=_address, required=True, help="HBONE peer HOST:PORT")
    fwd.add_argument("--target", required=True, help="the :authority to CONNECT to (IP:PORT)")
    fwd.add_argument(
        "--peer-identity",
        type=_identity,
        action="append",
        default=[],
        help="SPIFFE ID the peer must present (repeatable; default: any in our trust domain)",
    )
    return parser


async def _serve(
    args: argparse.Namespace, identity: TlsIdentity, ready: Callable[[], None], stop: asyncio.Event
) -> None:
    async def relay(request: ConnectRequest) -> PlainProtocol:
        return await open_upstream(request.host, request.port)

    server = HboneServer(identity=identity, handler=relay)
    host, port = await server.listen(*args.listen, reuse_port=args.workers > 1)
    log.info("hbone serve: listening on %s:%d as %s", host, port, identity.identity)
    ready()
    await stop.wait()
    await server.close()


async def _forward(
    args: argparse.Namespace,
    identity: TlsIdentity,
    ready: Callable[[], None],
    stop: asyncio.Event,
) -> None:
    pool = HboneClientPool(identities=identity, config=HboneConfig())
    key = PoolKey(
        source=identity.identity,
        destination=args.peer,
        destination_identities=tuple(args.peer_identity),
    )
    forwarder = Forwarder(pool, key, args.target)
    host, port = await forwarder.listen(*args.listen, reuse_port=args.workers > 1)
    log.info(
        "hbone forward: %s:%d -> %s via %s:%d as %s",
        host,
        port,
        args.target,
        *args.peer,
        identity.identity,
    )
    ready()
    await stop.wait()
    await forwarder.close(close_pool=True)


def _run(args: argparse.Namespace, identity: TlsIdentity) -> None:
    tune_malloc()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = _serve if args.command == "serve" else _forward
        await runner(args, identity, lambda: None, stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(main())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        identity = TlsIdentity.from_files(args.cert, args.key, args.ca)
        identity.server_context()
        _ = identity.identity
    except (OSError, HboneError, IdentityError) as e:
        print(f"mesh.hbone: error: {e}", file=sys.stderr)
        return 1
    if (args.command == "serve" and args.workers > 1) or (
        args.command == "forward" and (args.workers > 1)
    ):
        return _run_workers(args, identity)
    _run(args, identity)
    return 0


def _run_workers(args: argparse.Namespace, identity: TlsIdentity) -> int:
    """One process per worker, each with its own SO_REUSEPORT listener."""
    if not hasattr(socket, "SO_REUSEPORT"):
        print("mesh.hbone: error: --workers needs SO_REUSEPORT", file=sys.stderr)
        return 1
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            try:
                _run(args, identity)
            finally:
                os._exit(0)
        children.append(pid)

    def forward_signal(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward_signal)
    signal.signal(signal.SIGINT, forward_signal)
    for child in children:
        os.waitpid(child, 0)
    return 0
