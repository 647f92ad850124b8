"""W3C baggage on the HBONE CONNECT: what ztunnel encodes and what it reads from a peer."""

from __future__ import annotations

import pytest

from mesh.hbone.headers import (
    MAX_BAGGAGE_BYTES,
    MAX_BAGGAGE_MEMBERS,
    baggage,
    connect_headers,
    parse_baggage,
)

ISTIO = {
    "k8s.cluster.name": "Kubernetes",
    "k8s.namespace.name": "client",
    "k8s.pod.name": "sleep",
    "service.name": "sleep",
    "service.version": "v1",
}


def test_a_round_trip_gives_back_every_member_in_order() -> None:
    header = baggage(ISTIO)
    assert header == (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=client,k8s.pod.name=sleep,"
        "service.name=sleep,service.version=v1"
    )
    assert list(parse_baggage(header).items()) == list(ISTIO.items())


def test_values_are_percent_encoded_outside_rfc3986_unreserved() -> None:
    awkward = 'a b,c;d=e%f"g\\h/é~-._'
    header = baggage({"k": awkward, "empty": ""})
    value = header.split(",")[0].removeprefix("k=")
    assert value == "a%20b%2Cc%3Bd%3De%25f%22g%5Ch%2F%C3%A9~-._"
    assert all(c.isalnum() or c in "%~-._" for c in value)
    assert parse_baggage(header) == {"k": awkward, "empty": ""}
    # Unreserved characters pass untouched.
    assert baggage({"k": "Az09-._~"}) == "k=Az09-._~"


def test_keys_must_be_tokens() -> None:
    for bad in ("", "a b", "a,b", "a=b", "a;b", "é"):
        with pytest.raises(ValueError):
            baggage({bad: "v"})


def test_whitespace_and_properties_are_allowed_around_members() -> None:
    header = " a = 1 ;prop=x;flag , \tb=2\t,c=%41"
    assert parse_baggage(header) == {"a": "1", "b": "2", "c": "A"}


def test_malformed_members_are_skipped_and_the_rest_kept() -> None:
    header = ",".join(
        [
            "ok=1",
            "noequals",
            "=novalue",
            "bad key=2",
            'quoted="3"',  # '"' is not a baggage-octet
            "space=a b",
            "escape=%zz",
            "short=%4",
            "notutf8=%C3",
            "",
            "ok=dup",  # the first of a key counts
            "last=9",
        ]
    )
    assert parse_baggage(header) == {"ok": "1", "last": "9"}


def test_nothing_is_read_from_a_header_past_the_bounds() -> None:
    assert parse_baggage(None) == {} and parse_baggage("") == {}
    padded = "a=1,pad=" + "x" * (MAX_BAGGAGE_BYTES - len("a=1,pad="))
    assert len(padded) == MAX_BAGGAGE_BYTES and parse_baggage(padded)["a"] == "1"
    assert parse_baggage(padded + "x") == {}
    many = ",".join(f"k{i}=v" for i in range(MAX_BAGGAGE_MEMBERS))
    assert len(parse_baggage(many)) == MAX_BAGGAGE_MEMBERS
    assert parse_baggage(many + ",one=more") == {}
    # Non-ASCII counts in bytes, and never raises.
    assert parse_baggage("a=1,b=" + "é" * (MAX_BAGGAGE_BYTES // 2)) == {}
    assert parse_baggage("a=\udcff,b=2") == {"b": "2"}


def test_connect_headers_take_members_or_an_encoded_header() -> None:
    members = dict(connect_headers(client=None, source_baggage={"k": "a b"}))
    encoded = dict(connect_headers(client=None, source_baggage="k=a%20b"))
    assert members["baggage"] == encoded["baggage"] == "k=a%20b"
    assert "baggage" not in dict(connect_headers(client=None, source_baggage=""))
