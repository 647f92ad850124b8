"""Typed access to a user's object (YAML or the API server's JSON), with field paths in errors.

Every refusal names the object, the field and the reason, the way the API
server's validation does: ``HTTPRoute shop/canary: spec.rules[0].matches[1].path.type:
'Glob' is not supported (Exact, PathPrefix, RegularExpression)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any


class InvalidObject(ValueError):
    """An object that cannot be used; ``kind``, ``name`` (namespace/name), ``path``, ``reason``."""

    def __init__(self, kind: str, name: str, path: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.path = path
        self.reason = reason
        super().__init__(f"{kind} {name}: {path}: {reason}" if path else f"{kind} {name}: {reason}")


class Reader:
    """One mapping of an object; ``at(key)`` descends, errors carry the whole path."""

    def __init__(self, raw: object, kind: str, name: str, path: str = "") -> None:
        self.kind = kind
        self.name = name
        self.path = path
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise self.error(f"must be a mapping, got {type(raw).__name__}")
        self.raw: Mapping[str, Any] = raw

    def error(self, reason: str, key: str | None = None) -> InvalidObject:
        return InvalidObject(self.kind, self.name, self.sub(key) if key else self.path, reason)

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def only(self, allowed: set[str], unsupported: Mapping[str, str] | None = None) -> Reader:
        """Refuse fields we do not know, and known ones we do not implement (with why)."""
        for key in self.raw:
            if unsupported and key in unsupported and self.raw[key] not in (None, [], {}):
                raise self.error(f"not supported: {unsupported[key]}", key)
            if key not in allowed and not (unsupported and key in unsupported):
                raise self.error(
                    f"unknown field; known fields are {', '.join(sorted(allowed))}", key
                )
        return self

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def child(self, key: str) -> Reader:
        return Reader(self.raw.get(key), self.kind, self.name, self.sub(key))

    def children(self, key: str, max_items: int | None = None) -> Iterator[Reader]:
        for i, item in enumerate(self.items(key, max_items)):
            yield Reader(item, self.kind, self.name, f"{self.sub(key)}[{i}]")

    def items(self, key: str, max_items: int | None = None) -> Sequence[Any]:
        value = self.raw.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(f"must be a list, got {type(value).__name__}", key)
        if max_items is not None and len(value) > max_items:
            raise self.error(f"at most {max_items} items are allowed, got {len(value)}", key)
        return value

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if value is None:
            raise self.error("is required", key)
        if not isinstance(value, str):
            raise self.error(f"must be a string, got {value!r}", key)
        return value

    def opt_text(self, key: str) -> str | None:
        return None if self.raw.get(key) is None else self.text(key)

    def strings(self, key: str) -> tuple[str, ...]:
        values = self.items(key)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise self.error(f"must be a string, got {v!r}", f"{key}[{i}]")
        return tuple(values)

    def integer(
        self,
        key: str,
        default: int | None = None,
        *,
        low: int | None = None,
        high: int | None = None,
    ) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise self.error("is required", key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"must be an integer, got {value!r}", key)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
            raise self.error(f"{value} is out of range ({bounds})", key)
        return value

    def opt_integer(
        self, key: str, *, low: int | None = None, high: int | None = None
    ) -> int | None:
        return None if self.raw.get(key) is None else self.integer(key, low=low, high=high)

    def number(self, key: str, *, low: float | None = None, high: float | None = None) -> float:
        value = self.raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"must be a number, got {value!r}", key)
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.error(f"{value} is out of range ({low}..{high})", key)
        return float(value)

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self.error(f"must be true or false, got {value!r}", key)
        return value

    def one_of(self, key: str, allowed: Sequence[str], default: str | None = None) -> str:
        value = self.text(key, default)
        if value not in allowed:
            raise self.error(f"{value!r} is not supported ({', '.join(allowed)})", key)
        return value

    def labels(self, key: str) -> dict[str, str]:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise self.error("must map strings to strings", key)
        return dict(value)


# Gateway API durations (GEP-2257): 1 to 4 of <digits><h|m|s|ms>, e.g. "1h30m", "500ms".
_GEP_DURATION = re.compile(r"^(?:[0-9]{1,5}(?:h|m|s|ms)){1,4}$")
_GEP_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
# Istio (protobuf JSON) durations: "1.5s", and Go's forms ("1m30s", "200ms").
_GO_DURATION = re.compile(r"^(?:[0-9]+(?:\.[0-9]+)?(?:h|m|s|ms|us|µs|ns))+$")
_GO_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def gep_duration(r: Reader, key: str) -> float | None:
    """A Gateway API duration in seconds (None when unset)."""
    value = r.opt_text(key)
    if value is None:
        return None
    if not _GEP_DURATION.match(value):
        raise r.error(f"{value!r} is not a Gateway API duration (e.g. 10s, 500ms, 1h30m)", key)
    return sum(int(n) * _UNIT_S[u] for n, u in _GEP_PART.findall(value))


def go_duration(r: Reader, key: str) -> float | None:
    """An Istio duration (``1.5s``, ``100ms``, ``1m30s``) in seconds (None when unset)."""
    value = r.opt_text(key)
    if value is None:
        return None
    if not _GO_DURATION.match(value):
        raise r.error(f"{value!r} is not a duration (e.g. 1s, 1.5s, 200ms, 1m30s)", key)
    return sum(float(n) * _UNIT_S[u] for n, u in _GO_PART.findall(value))


def object_name(obj: Mapping[str, Any], kind: str) -> tuple[str, str]:
    """(namespace, name) of an object; raises :class:`InvalidObject` without a name."""
    meta = obj.get("metadata") or {}
    if not isinstance(meta, Mapping):
        raise InvalidObject(kind, "?", "metadata", "must be a mapping")
    name = meta.get("name")
    namespace = str(meta.get("namespace") or "default")
    if not isinstance(name, str) or not name:
        raise InvalidObject(kind, f"{namespace}/?", "metadata.name", "is required")
    return namespace, name
