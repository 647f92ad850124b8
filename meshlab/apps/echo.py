"""An HTTP echo server that says which pod answered and who asked.

Every response is one JSON object: the pod's name, namespace, node and IP
(from the environment meshlab gives pod processes) and the client's address
as the server saw it, which is what later tests use to tell whether the
source address survived the mesh.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType


class _Handler(BaseHTTPRequestHandler):
    server_version = "meshlab-echo/1"
    protocol_version = "HTTP/1.1"

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body_in = self.rfile.read(length) if length else b""
        body = (
            json.dumps(
                {
                    "pod": os.environ.get("POD_NAME", ""),
                    "namespace": os.environ.get("POD_NAMESPACE", ""),
                    "node": os.environ.get("NODE_NAME", ""),
                    "ip": os.environ.get("POD_IP", ""),
                    "client": f"{self.client_address[0]}:{self.client_address[1]}",
                    "method": self.command,
                    "path": self.path,
                    "bodyBytes": len(body_in),
                }
            ).encode()
            + b"\n"
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _reply
    do_POST = _reply
    do_PUT = _reply

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.client_address[0]} {format % args}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshlab app echo", description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--address", default="0.0.0.0")
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.address, args.port), _Handler)
    server.daemon_threads = True

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    print(f"echo: listening on {args.address}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
