"""An echo server in the shape of the Gateway API conformance echo server (echo-basic).

``meshlab app echo`` answers every HTTP request with one JSON object saying
what it received and which pod answered:

* echo-basic's fields: ``path`` (the request target, query included),
  ``host`` (``Host`` or ``:authority``), ``method``, ``proto`` (``HTTP/1.1``,
  ``HTTP/2.0``), ``headers`` (name in Go's canonical form, ``User-Agent``,
  ``X-Header-Set``, to the list of its values; ``Host`` and
  ``Transfer-Encoding`` left out as Go's ``net/http`` does), ``namespace``
  (``POD_NAMESPACE``, else echo-basic's ``NAMESPACE``), ``ingress``
  (``INGRESS_NAME``), ``service`` (``SERVICE_NAME``), ``pod`` (``POD_NAME``);
* ours: ``node`` (``NODE_NAME``), ``ip`` (``POD_IP``), ``client`` (the peer
  address the server saw, ``ip:port``), ``bodyBytes`` (the request body's
  length) and ``version`` (``--version``, else ``VERSION``; echo-basic has no
  such field, it is there to tell the versions of a traffic split apart).

Routes: ``/status/CODE`` answers with that status (200-599, else 400), the body
still the echo; ``/delay/SECONDS`` (a float, at most 60) waits, then echoes;
echo-basic's ``?delay=DURATION`` (Go syntax, ``250ms``, ``1.5s``) does the same,
a bad one answers 500 as echo-basic does. echo-basic's ``X-Echo-Set-Header:
Name:value,...`` request header sets those response headers. ``--status CODE``
overrides the status of every response (a pod that always fails; gRPC calls
then fail with the status gRPC maps that HTTP code to). 204 and 304 carry no
body, nor does a reply to HEAD (its ``Content-Length`` is the GET body's).

Every ``--port`` serves HTTP/1.1 (keep-alive, pipelining, chunked bodies,
``Expect: 100-continue``) and HTTP/2 over cleartext with prior knowledge: a
connection that opens with the HTTP/2 preface is handed to the ``h2`` state
machine. HTTP/1.1 is parsed by ``httptools``.

``--grpc PORT`` also serves echo-basic's gRPC service ``Echo`` and ``EchoTwo``
with ``grpcio``, without generated code (the message layout is in ``grpc``'s docstring);
``decode_echo_response`` reads a response back, for tests and demos.

Layout: ``settings`` (``Settings``, from flags and environment); ``responder``
(``Responder`` decides a reply from a ``Request`` and the settings and does no
I/O); ``connection`` (what both HTTP shells share), ``http1`` (over ``httptools``)
and ``http2`` (over ``h2``), the shells around it; ``grpc`` (the protobuf wire
format by hand and the gRPC servicer); ``server`` (``EchoServer``: the listeners,
the graceful stop, ``serve`` and ``main``).

May import: ``httptools``, ``h2``, ``hyperframe``, ``grpcio`` (lazily, only with
``--grpc``), ``uvloop`` (if installed) and the standard library.
"""

from meshlab.apps.echo.grpc import (
    GRPC_SERVICE,
    decode_echo_response,
    encode_echo_response,
    grpc_status_for,
)
from meshlab.apps.echo.responder import (
    Reply,
    Request,
    Responder,
    canonical_header_key,
    parse_go_duration,
)
from meshlab.apps.echo.server import EchoServer, main, serve
from meshlab.apps.echo.settings import Settings

__all__ = [
    "GRPC_SERVICE",
    "EchoServer",
    "Reply",
    "Request",
    "Responder",
    "Settings",
    "canonical_header_key",
    "decode_echo_response",
    "encode_echo_response",
    "grpc_status_for",
    "main",
    "parse_go_duration",
    "serve",
]
