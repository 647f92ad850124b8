"""One ``/config_dump`` document, read the way ``istioctl`` reads it.

The tables work on the raw entries (so a dump from Istio's own ztunnel shows
too); ``authz-check`` and ``trace`` need the model, built once by
:meth:`Dump.index` through :func:`mesh.model.dump.load_state`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.model.dump import DumpError, each_entry, load_state
from ztunnel.ctl.errors import CtlError
from ztunnel.index import StateIndex

Entry = dict[str, Any]


@dataclass
class Dump:
    raw: dict[str, Any]
    origin: str  # where it came from, for messages
    _index: StateIndex | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, raw: object, origin: str) -> Dump:
        if not isinstance(raw, dict):
            raise CtlError(f"{origin}: not a ztunnel config dump (a JSON object was expected)")
        return cls(raw, origin)

    def _entries(self, key: str) -> list[Entry]:
        try:
            found = each_entry(self.raw.get(key), key)
        except DumpError as e:
            raise CtlError(f"{self.origin}: {e}") from e
        return [v for _, v in found if isinstance(v, dict)]

    def workloads(self) -> list[Entry]:
        return self._entries("workloads")

    def services(self) -> list[Entry]:
        return self._entries("services")

    def policies(self) -> list[Entry]:
        return self._entries("policies")

    def certificates(self) -> list[Entry]:
        return self._entries("certificates")

    def workload_state(self) -> dict[str, Entry]:
        # Go's JSON decoding is case-insensitive: istioctl reads "workloadstate" too.
        state = self.raw.get("workloadState", self.raw.get("workloadstate"))
        if not isinstance(state, dict):
            return {}
        return {uid: v for uid, v in state.items() if isinstance(v, dict)}

    @property
    def config(self) -> Entry:
        config = self.raw.get("config")
        return config if isinstance(config, dict) else {}

    def index(self) -> StateIndex:
        """The snapshot as the proxy's cores see it; a malformed entry is an error here."""
        if self._index is None:
            try:
                self._index = StateIndex.build(load_state(self.raw))
            except DumpError as e:
                raise CtlError(
                    f"{self.origin}: {e}",
                    "the dump's workloads, services and policies must be valid to reason on them",
                ) from e
        return self._index

    def connections(self) -> list[Entry]:
        """Every connection in ``workloadState``, flat, as ``GET /connections`` answers."""
        flat: list[Entry] = []
        states = sorted(
            self.workload_state().values(),
            key=lambda s: (_info(s).get("namespace", ""), _info(s).get("name", "")),
        )
        for state in states:
            info = _info(state)
            workload = f"{info.get('namespace', '')}/{info.get('name', '')}"
            conns = state.get("connections")
            if not isinstance(conns, dict):
                continue
            for direction in ("inbound", "outbound"):
                for conn in conns.get(direction) or []:
                    if isinstance(conn, dict):
                        flat.append({**conn, "workload": workload, "direction": direction})
        return flat


def _info(state: Entry) -> Entry:
    info = state.get("info")
    return info if isinstance(info, dict) else {}
