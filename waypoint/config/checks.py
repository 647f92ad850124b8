"""What every conversion shares: the strict field check, durations, percentages, RE2."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import re2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from waypoint.config import model as m


class Unsupported(ValueError):
    """A resource asks for something this waypoint does not do; the message names the field."""


def only(msg: Message, allowed: Iterable[str], where: str) -> None:
    allowed = set(allowed)
    for fd, _ in msg.ListFields():
        if fd.name not in allowed:
            raise Unsupported(f"{where}.{fd.name}: not supported by this waypoint")


def seconds(d: Any) -> float:
    return float(d.seconds) + float(d.nanos) / 1e9


def unpack(packed: any_pb2.Any, kind: type[Message], where: str) -> Any:
    message = kind()
    if not packed.Unpack(message):
        raise Unsupported(
            f"{where}: type {packed.type_url} is not supported (want {kind.DESCRIPTOR.full_name})"
        )
    return message


def regex(pattern: str, where: str) -> Any:
    try:
        return re2.compile(pattern)
    except re2.error as e:
        raise Unsupported(f"{where}: {pattern!r} is not an RE2 expression: {e}") from e


def ppm(p: percent_pb2.FractionalPercent) -> int:
    scale = {
        percent_pb2.FractionalPercent.HUNDRED: 10_000,
        percent_pb2.FractionalPercent.TEN_THOUSAND: 100,
        percent_pb2.FractionalPercent.MILLION: 1,
    }[p.denominator]
    return min(m.MILLION, int(p.numerator) * scale)
