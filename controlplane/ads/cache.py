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
from dataclasses import dataclass, field
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


EMPTY: Mapping[str, Entry] = MappingProxyType({})
GLOBAL = ""
"""The scope of resources every subscriber may see (workloads, services, policies)."""

# (scope, type URL): where a changed name lives. Global resources have scope "".
ChangeKey = tuple[str, str]
Changes = Mapping[ChangeKey, frozenset[str]]
Types = Mapping[str, Mapping[str, Entry]]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole feed at one generation.

    ``types`` holds what every subscriber sees; ``scopes`` holds, per scope
    (a waypoint, ``namespace/name``), the resources only that scope's
    subscribers see: each waypoint receives its own listeners, routes and
    clusters, under names that need only be unique within it.
    """

    generation: int
    types: Types
    scopes: Mapping[str, Types] = field(default_factory=lambda: MappingProxyType({}))

    def entries(self, type_url: str, scope: str = GLOBAL) -> Mapping[str, Entry]:
        if scope == GLOBAL:
            return self.types.get(type_url, EMPTY)
        return self.scopes.get(scope, MappingProxyType({})).get(type_url, EMPTY)


Listener = Callable[[Snapshot, Changes], None]


class SnapshotCache:
    """The current snapshot, and who to tell when it changes.

    ``type_urls`` are the global types; ``scoped_type_urls`` those served per
    scope (a subscriber of another scope, or of none, sees none of them).
    """

    def __init__(self, type_urls: Iterable[str], scoped_type_urls: Iterable[str] = ()) -> None:
        self.type_urls = tuple(type_urls)
        self.scoped_type_urls = tuple(scoped_type_urls)
        self._snapshot = Snapshot(
            0, MappingProxyType({t: MappingProxyType({}) for t in self.type_urls})
        )
        self._listeners: set[Listener] = set()
        # No response goes out before the first state from the source: a proxy
        # must never take an empty world for the whole one and call itself synced.
        self.ready = False

    @property
    def served_type_urls(self) -> tuple[str, ...]:
        return self.type_urls + self.scoped_type_urls

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, listener: Listener) -> None:
        self._listeners.add(listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def update(self, types: Types, scopes: Mapping[str, Types] | None = None) -> Changes:
        """Replace the whole state; return (and announce) the changed names.

        ``scopes`` None keeps the scoped resources as they are (a caller that
        only has global ones); an empty mapping removes them all.
        """
        old = self._snapshot
        became_ready = not self.ready
        self.ready = True
        changed: dict[ChangeKey, frozenset[str]] = {}
        for type_url in self.type_urls:
            names = _diff(old.entries(type_url), types.get(type_url, EMPTY))
            if names:
                changed[(GLOBAL, type_url)] = names
        new_scopes = old.scopes
        if scopes is not None:
            for scope in set(old.scopes) | set(scopes):
                for type_url in self.scoped_type_urls:
                    after = scopes.get(scope, {}).get(type_url, EMPTY)
                    names = _diff(old.entries(type_url, scope), after)
                    if names:
                        changed[(scope, type_url)] = names
            new_scopes = MappingProxyType(
                {
                    scope: MappingProxyType(
                        {
                            t: MappingProxyType(dict(by_type.get(t, {})))
                            for t in self.scoped_type_urls
                        }
                    )
                    for scope, by_type in scopes.items()
                }
            )
        if not changed:
            if became_ready:
                for listener in list(self._listeners):
                    listener(self._snapshot, {})
            return {}
        self._snapshot = Snapshot(
            old.generation + 1,
            MappingProxyType({t: MappingProxyType(dict(types.get(t, {}))) for t in self.type_urls}),
            new_scopes,
        )
        for listener in list(self._listeners):
            listener(self._snapshot, changed)
        return changed


def _diff(before: Mapping[str, Entry], after: Mapping[str, Entry]) -> frozenset[str]:
    names = {n for n, e in after.items() if (b := before.get(n)) is None or b.version != e.version}
    names.update(n for n in before if n not in after)
    return frozenset(names)
