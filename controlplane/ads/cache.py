"""The resources meshd serves, by type URL, versioned by content.

A resource's version is a hash of its serialized bytes, so the same content
has the same version across meshd restarts: a proxy that reconnects with
``initial_resource_versions`` is sent only what really changed. The cache
holds one immutable snapshot; ``update`` swaps in a new one and tells every
subscriber which names changed, so each works out its next response from the
changes alone, not from the whole world.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf import any_pb2
from google.protobuf.message import Message


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource as sent: its version and its packed bytes."""

    version: str
    resource: any_pb2.Any


def pack(message: Message, type_url: str) -> Entry:
    payload = message.SerializeToString(deterministic=True)
    resource = any_pb2.Any(type_url=type_url, value=payload)
    return Entry(version=hashlib.sha256(payload).hexdigest()[:16], resource=resource)


@dataclass(frozen=True, slots=True)
class Snapshot:
    generation: int
    types: Mapping[str, Mapping[str, Entry]]

    def entries(self, type_url: str) -> Mapping[str, Entry]:
        return self.types.get(type_url, MappingProxyType({}))


Listener = Callable[[Snapshot, Mapping[str, frozenset[str]]], None]


class SnapshotCache:
    """The current snapshot, and who to tell when it changes."""

    def __init__(self, type_urls: Iterable[str]) -> None:
        self.type_urls = tuple(type_urls)
        self._snapshot = Snapshot(
            0, MappingProxyType({t: MappingProxyType({}) for t in self.type_urls})
        )
        self._listeners: set[Listener] = set()
        # No response goes out before the first state from the source: a proxy
        # must never take an empty world for the whole one and call itself synced.
        self.ready = False

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: Listener) -> None:
        self._listeners.add(listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def update(self, types: Mapping[str, Mapping[str, Entry]]) -> Mapping[str, frozenset[str]]:
        """Replace the whole state; return (and announce) the changed names per type."""
        old = self._snapshot
        became_ready = not self.ready
        self.ready = True
        changed: dict[str, frozenset[str]] = {}
        for type_url in self.type_urls:
            before = old.entries(type_url)
            after = types.get(type_url, {})
            names = {
                n
                for n, e in after.items()
                if (b := before.get(n)) is None or b.version != e.version
            }
            names.update(n for n in before if n not in after)
            if names:
                changed[type_url] = frozenset(names)
        if not changed:
            if became_ready:
                for listener in list(self._listeners):
                    listener(self._snapshot, {})
            return {}
        self._snapshot = Snapshot(
            old.generation + 1,
            MappingProxyType({t: MappingProxyType(dict(types.get(t, {}))) for t in self.type_urls}),
        )
        for listener in list(self._listeners):
            listener(self._snapshot, changed)
        return changed
