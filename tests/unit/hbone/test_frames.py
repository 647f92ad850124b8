"""Header blocks: what we encode any decoder reads, and our stateless decoder
agrees with hpack wherever it answers at all."""

from __future__ import annotations

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.hbone import frames as f

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
_value = st.binary(min_size=0, max_size=300).filter(lambda b: b"\r" not in b and b"\n" not in b)


@given(
    authority=st.from_regex(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}:\d{1,5}", fullmatch=True),
    fields=st.lists(st.tuples(_token, _value), max_size=8),
)
def test_our_request_blocks_decode_with_hpack(
    authority: str, fields: list[tuple[str, bytes]]
) -> None:
    raw = [(k.encode(), v) for k, v in fields]
    block = f.encode_request(authority.encode(), raw)
    decoded = hpack.Decoder().decode(block, raw=True)
    assert decoded == [(b":method", b"CONNECT"), (b":authority", authority.encode()), *raw]
    assert f.decode_simple(block, 1 << 20) == decoded


@pytest.mark.parametrize("status", [200, 400, 401, 404, 503, 504])
def test_our_response_blocks_decode_with_hpack(status: int) -> None:
    block = f.encode_response(status)
    assert hpack.Decoder().decode(block, raw=True) == [(b":status", str(status).encode())]


@settings(max_examples=200)
@given(
    fields=st.lists(st.tuples(_token, _value), min_size=1, max_size=6),
    huffman=st.booleans(),
    sensitive=st.booleans(),
)
def test_the_stateless_decoder_agrees_with_hpack_or_declines(
    fields: list[tuple[str, bytes]], huffman: bool, sensitive: bool
) -> None:
    encoder = hpack.Encoder()
    decoder = hpack.Decoder()
    for _ in range(2):  # the second block may refer to the first one's table entries
        headers = [(k.encode(), v) for k, v in fields]
        if sensitive:
            headers = [hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers]
        block = encoder.encode(headers, huffman=huffman)
        simple = f.decode_simple(block, 1 << 20)
        full = decoder.decode(block, raw=True)
        if simple is not None:
            assert simple == [(bytes(k), bytes(v)) for k, v in full]


@pytest.mark.parametrize(
    "block",
    [b"\xbe", b"\x00\x85", b"\x0f", b"\x00\x03ab", b"\x40\x01a\x01b", b"\x3f\xe1\x1f"],
)
def test_the_stateless_decoder_declines_what_it_cannot_do_alone(block: bytes) -> None:
    # Dynamic-table references, Huffman strings, truncations, indexing, size updates.
    assert f.decode_simple(block, 1 << 20) is None


def test_the_stateless_decoder_leaves_oversized_lists_to_hpack() -> None:
    block = f.encode_request(b"1.2.3.4:5", [(b"x", b"y" * 1000)])
    assert f.decode_simple(block, 100) is None


def test_check_fields_knows_a_connect_from_a_malformed_request() -> None:
    ok = [(b":method", b"CONNECT"), (b":authority", b"1.2.3.4:5"), (b"baggage", b"k=v")]
    assert f.check_fields(ok, request=True)[b":authority"] == b"1.2.3.4:5"
    bad = [
        [(b":method", b"CONNECT")],
        [(b":method", b"CONNECT"), (b":authority", b"a"), (b":path", b"/")],
        [(b":authority", b"a"), (b":method", b"CONNECT"), (b"X-Up", b"1")],
        [(b":method", b"CONNECT"), (b":authority", b"a"), (b"connection", b"close")],
        [(b"a", b"1"), (b":method", b"CONNECT"), (b":authority", b"a")],
        [(b":method", b"CONNECT"), (b":method", b"CONNECT"), (b":authority", b"a")],
        [(b":method", b"GET"), (b":authority", b"a")],
    ]
    for fields in bad:
        with pytest.raises(f.MalformedHeaders):
            f.check_fields(fields, request=True)
    with pytest.raises(f.MalformedHeaders):
        f.check_fields([(b":status", b"20")], request=False)


def test_connect_headers_are_what_ztunnel_sends() -> None:
    from mesh.hbone.headers import connect_headers, parse_authority

    headers = dict(
        connect_headers(client=("10.0.0.7", 41000), source_baggage={"k8s.namespace.name": "client"})
    )
    assert headers["forwarded"] == 'for="10.0.0.7:41000"'
    assert headers["baggage"] == "k8s.namespace.name=client"
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, flags) == ("00", "00") and len(trace_id) == 32 and len(span_id) == 16
    assert dict(connect_headers(client=("fd00::1", 5)))["forwarded"] == 'for="[fd00::1]:5"'
    assert parse_authority("[fd00:0::1]:80") == ("fd00::1", 80)
    for bad in ("", "1.2.3.4", "1.2.3:80", "host:80", "1.2.3.4:0", "1.2.3.4:70000", "[::1]80"):
        with pytest.raises(ValueError):
            parse_authority(bad)
