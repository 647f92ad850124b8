"""Translated resources -> cache entries, re-packing only what changed.

Packing serializes and hashes every resource; doing that for 10,000
workloads on every change would dominate an incremental update, so values
equal to last time's keep last time's entry.
"""

from __future__ import annotations

from collections.abc import Mapping

from controlplane.ads.cache import Entry, pack
from controlplane.translate import Resources
from mesh.model import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Policy, Service, Workload

TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)


class Feed:
    """Keeps the last packed entries so unchanged resources are not packed again."""

    def __init__(self) -> None:
        self._values: dict[str, Workload | Service | Policy] = {}
        self._entries: dict[str, Entry] = {}

    def entries(self, resources: Resources) -> dict[str, dict[str, Entry]]:
        addresses: dict[str, Entry] = {}
        policies: dict[str, Entry] = {}
        values: dict[str, Workload | Service | Policy] = {}
        entries: dict[str, Entry] = {}

        def keep(key: str, value: Workload | Service | Policy, type_url: str) -> Entry:
            old = self._values.get(key)
            # Identity first: the translator hands back the same object when
            # nothing changed, which makes the common case a pointer check.
            entry = self._entries.get(key) if (old is value or old == value) else None
            if entry is None:
                entry = pack(value.to_proto(), type_url)
            values[key] = value
            entries[key] = entry
            return entry

        for name, workload in resources.workloads.items():
            addresses[name] = keep(f"w:{name}", workload, ADDRESS_TYPE_URL)
        for name, service in resources.services.items():
            addresses[name] = keep(f"s:{name}", service, ADDRESS_TYPE_URL)
        for name, policy in resources.policies.items():
            policies[name] = keep(f"p:{name}", policy, AUTHORIZATION_TYPE_URL)
        self._values, self._entries = values, entries
        return {ADDRESS_TYPE_URL: addresses, AUTHORIZATION_TYPE_URL: policies}


def by_type(resources: Resources) -> Mapping[str, Mapping[str, Entry]]:
    """One-off packing (tests, tools)."""
    return Feed().entries(resources)
