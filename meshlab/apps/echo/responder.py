"""``Responder``: the reply to a request, decided from the request and the settings, no I/O.

Both HTTP shells turn what they parsed into a ``Request`` and send the ``Reply``
this returns, adding only framing; the gRPC servicer does not use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from meshlab.apps.echo.settings import Settings

_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Headers a client may not set through X-Echo-Set-Header: they frame the message.
_FRAMING = frozenset(
    {"connection", "content-length", "content-type", "keep-alive"}
    | {"proxy-connection", "te", "transfer-encoding", "upgrade"}
)
_NO_BODY = frozenset([204, 304])
_COMPACT = (",", ":")


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One request as either HTTP version delivered it."""

    method: str
    target: str
    host: str
    proto: str
    headers: dict[str, list[str]]
    body_bytes: int
    client: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What to send: the shells add only framing (``Connection: close``, ``:status``)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delay_s: float = 0.0


_canonical_cache: dict[str, str] = {}


def canonical_header_key(name: str) -> str:
    """Go's ``textproto.CanonicalMIMEHeaderKey``: ``x-foo-BAR`` is ``X-Foo-Bar``.

    A name that is not an HTTP token is returned unchanged, as Go does.
    """
    key = _canonical_cache.get(name)
    if key is None:
        if name and all(c in _TOKEN for c in name):
            key = "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))
        else:
            key = name
        if len(_canonical_cache) < 4096:  # bounded: names come from clients
            _canonical_cache[name] = key
    return key


_GO_DURATION = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.ParseDuration`` string (``1h2m``, ``250ms``, ``0``)."""
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _GO_DURATION.finditer(body):
        if match.start() != pos:
            break
        total += float(match[1]) * _GO_UNITS[match[2]]
        pos = match.end()
    if pos == 0 or pos != len(body):
        raise ValueError(f"time: invalid duration {text!r}")
    return 0.0 if text[:1] == "-" else total  # a negative sleep is no sleep, as in Go


class Responder:
    """Decides the reply to a request: pure, so it is tested without sockets."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        pod = {
            "namespace": settings.namespace,
            "ingress": settings.ingress,
            "service": settings.service,
            "pod": settings.pod,
            "node": settings.node,
            "ip": settings.ip,
            "version": settings.version,
        }
        # The pod's fields never change: serialised once, spliced into every body.
        self._pod_json = json.dumps(pod, separators=_COMPACT)[1:]

    def __call__(self, request: Request) -> Reply:
        path, _, query = request.target.partition("?")
        status, delay_s = 200, 0.0
        if path.startswith("/status/"):
            code = path[8:]
            status = int(code) if len(code) == 3 and code.isdigit() and code[0] in "2345" else 400
        elif path.startswith("/delay/"):
            try:
                delay_s = float(path[7:])
            except ValueError:
                delay_s = math.nan
            if not delay_s >= 0:  # also NaN
                return self._reply(request, 400, json_message(f"bad delay {path[7:]!r}"), 0.0)
        if "delay=" in query:
            for key, value in parse_qsl(query):
                if key == "delay":
                    try:
                        delay_s = parse_go_duration(value)
                    except ValueError as exc:
                        return self._reply(request, 500, json_message(str(exc)), 0.0)
        body = (
            json.dumps(
                {
                    "path": request.target,
                    "host": request.host,
                    "method": request.method,
                    "proto": request.proto,
                    "headers": request.headers,
                    "client": request.client,
                    "bodyBytes": request.body_bytes,
                },
                separators=_COMPACT,
            )[:-1]
            + ","
            + self._pod_json
            + "\n"
        ).encode()
        return self._reply(request, status, body, min(delay_s, self.settings.max_delay_s))

    def _reply(self, request: Request, status: int, body: bytes, delay_s: float) -> Reply:
        if self.settings.status is not None:
            status = self.settings.status
        headers = [("Content-Type", "application/json"), ("X-Content-Type-Options", "nosniff")]
        if status in _NO_BODY:
            body = b""
        else:
            headers.append(("Content-Length", str(len(body))))
        headers += _echo_set_headers(request.headers.get("X-Echo-Set-Header", ()))
        if request.method == "HEAD":
            body = b""
        return Reply(status=status, headers=tuple(headers), body=body, delay_s=delay_s)


def json_message(text: str) -> bytes:
    """``{"message": text}``, the body of an error reply."""
    return json.dumps({"message": text}, separators=_COMPACT).encode() + b"\n"


def _echo_set_headers(values: Sequence[str]) -> list[tuple[str, str]]:
    """echo-basic's ``X-Echo-Set-Header: A:1,B:2``; a repeated name joins with ``,``."""
    chosen: dict[str, str] = {}
    for item in (kv.strip() for value in values for kv in value.split(",")):
        name, _, value = item.partition(":")
        value = value.strip()
        if not name or not all(c in _TOKEN for c in name) or name.lower() in _FRAMING:
            continue
        if "\r" in value or "\n" in value:
            continue
        chosen[name] = f"{chosen[name]},{value}" if name in chosen else value
    return list(chosen.items())
