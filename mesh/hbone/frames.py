"""HTTP/2 wire pieces for HBONE: frame layout, codes, settings, header blocks.

Header blocks are *decoded* with the ``hpack`` library (any peer may use the
dynamic table and Huffman coding). They are *encoded* here as HPACK literals
without indexing and without Huffman: legal for every decoder, stateless on
our side, and a handful of byte concatenations for the five fields a CONNECT
carries, where a full encoder spent more time than the rest of the request.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

from hpack.table import HeaderTable

# Frame types (RFC 9113 section 6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
DEFAULT_MAX_FRAME = 16384
MAX_STREAM_ID = 2**31 - 1

HEADER = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id
_U32 = struct.Struct(">I")
_RST = struct.Struct(">IBII")
_WINDOW = struct.Struct(">IBII")
_GOAWAY = struct.Struct(">IBIII")


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6
    ENABLE_CONNECT_PROTOCOL = 0x8


def code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"0x{code:x}"


# ----------------------------------------------------------------- frames


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack((len(payload) << 8) | kind, flags, stream_id) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    payload = b"".join(struct.pack(">HI", k, v) for k, v in values.items())
    return frame(SETTINGS, 0, 0, payload)


SETTINGS_ACK = frame(SETTINGS, FLAG_ACK, 0)


def rst_stream(stream_id: int, code: int) -> bytes:
    return _RST.pack((4 << 8) | RST_STREAM, 0, stream_id, code)


def window_update(stream_id: int, increment: int) -> bytes:
    return _WINDOW.pack((4 << 8) | WINDOW_UPDATE, 0, stream_id, increment)


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return _GOAWAY.pack(((8 + len(debug)) << 8) | GOAWAY, 0, 0, last_stream_id, code) + debug


def ping(opaque: bytes, ack: bool = False) -> bytes:
    return frame(PING, FLAG_ACK if ack else 0, 0, opaque)


def u32(data: bytes, offset: int = 0) -> int:
    return int(_U32.unpack_from(data, offset)[0])


# ------------------------------------------------------------- HPACK out

# Static-table indexes (RFC 7541 appendix A) of the names and pairs we send.
_STATIC_NAME = {b":authority": 1, b":method": 2, b":status": 8}
_STATIC_STATUS = {200: 8, 204: 9, 206: 10, 304: 11, 400: 12, 404: 13, 500: 14}


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK integer with an N-bit prefix; ``first`` carries the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    index = _STATIC_NAME.get(name)
    if index is not None:
        head = _integer(index, 4, 0x00)  # literal without indexing, indexed name
    else:
        head = b"\x00" + _integer(len(name), 7, 0x00) + name
    return head + _integer(len(value), 7, 0x00) + value


def encode_request(authority: bytes, fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    block = _literal(b":method", b"CONNECT") + _literal(b":authority", authority)
    for name, value in fields:
        block += _literal(name, value)
    return block


def encode_response(status: int, fields: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    index = _STATIC_STATUS.get(status)
    block = (
        bytes([0x80 | index]) if index is not None else _literal(b":status", str(status).encode())
    )
    for name, value in fields:
        block += _literal(name, value)
    return block


TABLE_SIZE_ZERO = _integer(0, 5, 0x20)  # "dynamic table size update: 0"


# -------------------------------------------------------------- HPACK in

_STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE


def _read_integer(block: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[i] & limit
    i += 1
    if value < limit:
        return value, i
    shift = 0
    while True:
        byte = block[i]  # IndexError on a truncated block: the caller falls back
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
        if shift > 28:
            raise IndexError("integer too long")


def decode_simple(block: bytes, max_list_size: int) -> list[tuple[bytes, bytes]] | None:
    """Decode a header block that leaves the dynamic table alone, or return None.

    Static-table references and literals without indexing, without Huffman
    coding, are what our own peers send; decoding them needs no state, so
    doing it here (and leaving everything else to ``hpack``) keeps the
    decoder's table exactly as the library would have it. Any other
    representation, or anything odd, returns None and goes to ``hpack``.
    """
    fields: list[tuple[bytes, bytes]] = []
    size = 0
    i = 0
    n = len(block)
    try:
        while i < n:
            byte = block[i]
            if byte & 0x80:
                index, i = _read_integer(block, i, 7)
                if not 1 <= index <= len(_STATIC):
                    return None
                field = _STATIC[index - 1]
            elif byte & 0xE0:
                return None  # incremental indexing, or a table size update
            else:
                index, i = _read_integer(block, i, 4)
                if index:
                    if index > len(_STATIC):
                        return None
                    name = _STATIC[index - 1][0]
                else:
                    if block[i] & 0x80:
                        return None  # Huffman
                    length, i = _read_integer(block, i, 7)
                    name = block[i : i + length]
                    i += length
                if block[i] & 0x80:
                    return None
                length, i = _read_integer(block, i, 7)
                value = block[i : i + length]
                i += length
                if i > n:
                    return None
                field = (name, value)
            size += len(field[0]) + len(field[1]) + 32
            if size > max_list_size:
                return None  # let hpack refuse it, with its error
            fields.append(field)
    except IndexError:
        return None
    return fields


# ------------------------------------------------------ header validation

_CONNECTION_SPECIFIC = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
}
_REQUEST_PSEUDO = {b":method", b":scheme", b":authority", b":path", b":protocol"}


class MalformedHeaders(ValueError):
    """A header block that is not a valid HTTP/2 request or response."""


def check_fields(fields: Sequence[tuple[bytes, bytes]], *, request: bool) -> dict[bytes, bytes]:
    """Validate decoded fields (RFC 9113 8.2, 8.3); return the pseudo-headers."""
    pseudo: dict[bytes, bytes] = {}
    regular = False
    for name, value in fields:
        if not name:
            raise MalformedHeaders("empty field name")
        if name.startswith(b":"):
            if regular:
                raise MalformedHeaders(f"pseudo-header {name!r} after regular fields")
            allowed = _REQUEST_PSEUDO if request else {b":status"}
            if name not in allowed:
                raise MalformedHeaders(f"pseudo-header {name!r} not allowed here")
            if name in pseudo:
                raise MalformedHeaders(f"pseudo-header {name!r} repeated")
            pseudo[name] = value
            continue
        regular = True
        if name != name.lower():
            raise MalformedHeaders(f"field name {name!r} is not lowercase")
        if name in _CONNECTION_SPECIFIC:
            raise MalformedHeaders(f"connection-specific field {name!r}")
        if name == b"te" and value != b"trailers":
            raise MalformedHeaders("te other than 'trailers'")
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise MalformedHeaders(f"field {name!r} has a forbidden character")
    if request:
        method = pseudo.get(b":method")
        if method is None:
            raise MalformedHeaders("request without :method")
        if method == b"CONNECT" and b":protocol" not in pseudo:
            if b":authority" not in pseudo:
                raise MalformedHeaders("CONNECT without :authority")
            if b":scheme" in pseudo or b":path" in pseudo:
                raise MalformedHeaders("CONNECT with :scheme or :path")
        elif b":scheme" not in pseudo or b":path" not in pseudo:
            raise MalformedHeaders("request without :scheme or :path")
    else:
        status = pseudo.get(b":status", b"")
        if len(status) != 3 or not status.isdigit():
            raise MalformedHeaders(f"response with :status {status!r}")
    return pseudo
