"""``Settings``: everything ``meshlab app echo`` is told, parsed once from flags and environment."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# The first line of the package docstring, for ``--help``.
DESCRIPTION = "An echo server in the shape of the Gateway API conformance echo server (echo-basic)."


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything ``meshlab app echo`` is told, from its flags and environment."""

    ports: tuple[int, ...] = (8080,)
    address: str = "0.0.0.0"
    status: int | None = None
    version: str = ""
    grpc_port: int | None = None
    log: bool = False
    namespace: str = ""
    ingress: str = ""
    service: str = ""
    pod: str = ""
    node: str = ""
    ip: str = ""
    max_delay_s: float = 60.0
    drain_timeout_s: float = 5.0

    @classmethod
    def from_argv(
        cls, argv: Sequence[str] | None, environ: Mapping[str, str] = os.environ
    ) -> Settings:
        parser = argparse.ArgumentParser(prog="meshlab app echo", description=DESCRIPTION)
        parser.add_argument("--port", type=_port, action="append", help="repeat to listen on more")
        parser.add_argument("--address", default="0.0.0.0")
        parser.add_argument("--status", type=_status_flag, help="answer every request with CODE")
        parser.add_argument("--version", default=environ.get("VERSION", ""))
        parser.add_argument("--grpc", type=_port, metavar="PORT", help="also serve gRPC echo")
        parser.add_argument("--log", action="store_true", help="one line per request on stderr")
        args = parser.parse_args(argv)
        return cls(
            ports=tuple(args.port or [8080]),
            address=args.address,
            status=args.status,
            version=args.version,
            grpc_port=args.grpc,
            log=args.log,
            namespace=environ.get("POD_NAMESPACE") or environ.get("NAMESPACE", ""),
            ingress=environ.get("INGRESS_NAME", ""),
            service=environ.get("SERVICE_NAME", ""),
            pod=environ.get("POD_NAME", ""),
            node=environ.get("NODE_NAME", ""),
            ip=environ.get("POD_IP", ""),
        )


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port (0-65535)")
    return port


def _status_flag(text: str) -> int:
    code = int(text)
    if not 200 <= code <= 599:
        raise argparse.ArgumentTypeError(f"{text} is not a final HTTP status (200-599)")
    return code
