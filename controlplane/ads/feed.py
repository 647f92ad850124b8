"""Translated resources -> cache entries, re-packing only what changed.

Packing serializes and hashes every resource; doing that for 10,000
workloads on every change would dominate an incremental update, so values
equal to last time's keep last time's entry. The translator hands back the
same object for what it did not redo, so "unchanged" is mostly a pointer
check, done in one comprehension per kind rather than a call per resource.
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

from controlplane.ads.cache import Entry, pack
from controlplane.translate import Resources
from mesh.model import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Policy, Service, Workload

TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)

Value = Workload | Service | Policy


class _Packed:
    """One kind's last values and their packed entries."""

    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.values: Mapping[str, Value] = {}
        self.entries: dict[str, Entry] = {}

    def update(self, values: Mapping[str, Value]) -> dict[str, Entry]:
        old = self.values
        if values is old:
            return self.entries
        entries = dict(self.entries)
        for key in self.entries.keys() - values.keys():
            del entries[key]
        for key in [k for k, v in values.items() if old.get(k) is not v]:
            value, before = values[key], old.get(key)
            if before is None or before != value or key not in entries:
                entries[key] = pack(value.to_proto(), self.type_url)
        self.values, self.entries = values, entries
        return entries


class Feed:
    """Keeps the last packed entries so unchanged resources are not packed again."""

    def __init__(self) -> None:
        self._workloads = _Packed(ADDRESS_TYPE_URL)
        self._services = _Packed(ADDRESS_TYPE_URL)
        self._policies = _Packed(AUTHORIZATION_TYPE_URL)

    def entries(self, resources: Resources) -> dict[str, dict[str, Entry]]:
        addresses = dict(self._workloads.update(resources.workloads))
        addresses.update(self._services.update(resources.services))
        return {
            ADDRESS_TYPE_URL: addresses,
            AUTHORIZATION_TYPE_URL: dict(self._policies.update(resources.policies)),
        }


def by_type(resources: Resources) -> Mapping[str, Mapping[str, Entry]]:
    """One-off packing (tests, tools)."""
    return Feed().entries(resources)


class ScopedFeed:
    """Each waypoint's Envoy resources as cache entries, per scope (``namespace/name``).

    Packing hashes the serialized bytes, so a resource that did not change
    keeps its version and is not sent again.
    """

    def entries(
        self, scopes: Mapping[str, Mapping[str, Mapping[str, Message]]]
    ) -> dict[str, dict[str, dict[str, Entry]]]:
        return {
            scope: {
                type_url: {name: pack(message, type_url) for name, message in items.items()}
                for type_url, items in by_type.items()
            }
            for scope, by_type in scopes.items()
        }
