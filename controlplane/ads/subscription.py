"""One Delta ADS stream's state, sans I/O: requests in, the next response out.

Per type URL it tracks what the subscriber holds (its *view*, name ->
version), what it asked for (wildcard or names), the one response in flight
(nonce and content) and the versions it refused. Only one response per type
is in flight at a time: changes that arrive meanwhile only mark names dirty,
so a slow subscriber is sent the latest state when it is ready, never a
queue of stale ones.

A NACK (``error_detail`` set) leaves the subscriber on its last good
versions. Our own client lists the names it refused in the error details (a
``google.protobuf.ListValue``) and applied the rest; a client that does not
(Envoy) is taken to have refused the whole response. Either way a refused
version is not sent again; the next change of that resource is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3.base_pb2 import Node
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DeltaDiscoveryResponse
from google.protobuf import struct_pb2

from controlplane.ads.cache import GLOBAL, Changes, Entry, Snapshot

WILDCARD = "*"
# Resources per response: an initial response for 10,000 workloads stays a
# few MB, under gRPC's message limits, and the rest follows on the ACK.
MAX_RESOURCES_PER_RESPONSE = 2000


class InvalidRequest(ValueError):
    """A request that breaks the protocol; the stream is ended with INVALID_ARGUMENT."""


@dataclass
class Nack:
    type_url: str
    nonce: str
    message: str
    refused: tuple[str, ...]


@dataclass(slots=True)
class _TypeState:
    type_url: str
    subscribed: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    view: dict[str, str] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)
    inflight_nonce: str | None = None
    inflight: dict[str, str | None] = field(default_factory=dict)
    first_response_sent: bool = False
    acks: int = 0
    nacks: int = 0

    def interested(self, name: str) -> bool:
        return self.wildcard or name in self.names


_nonces = itertools.count(1)


ScopeOf = Callable[[Node], str]


def no_scope(node: Node) -> str:
    return GLOBAL


class Subscription:
    """The state of one subscriber (one ADS stream).

    ``scoped_types`` are served per scope: ``scope_of`` names the subscriber's
    scope from the node of its first request (a waypoint's ``namespace/name``),
    and only that scope's resources of those types are ever sent to it.
    """

    def __init__(
        self,
        served_types: Iterable[str],
        peer: str = "?",
        *,
        scoped_types: Iterable[str] = (),
        scope_of: ScopeOf = no_scope,
        resend_with: Mapping[str, str] | None = None,
    ) -> None:
        """``resend_with``: a type whose resources, when sent, have the same-named
        resource of another type sent again after them (Envoy warms a changed Cluster
        until its ClusterLoadAssignment comes again, and does not ask for it)."""
        self.resend_with = dict(resend_with or {})
        self.scoped = frozenset(scoped_types)
        self.served = frozenset(served_types) | self.scoped
        self.peer = peer
        self.node_id = ""
        self.scope = GLOBAL
        self._scope_of = scope_of
        self._scope_known = False
        self._types: dict[str, _TypeState] = {}
        self.nacks: list[Nack] = []
        self.responses_sent = 0
        self.resources_sent = 0

    # ---------------------------------------------------------------- input

    def on_request(self, request: DeltaDiscoveryRequest, snapshot: Snapshot) -> Nack | None:
        """Apply one request; returns the NACK it carried, if any."""
        type_url = request.type_url
        if not type_url:
            raise InvalidRequest("DeltaDiscoveryRequest without a type_url")
        if request.HasField("node") and request.node.id:
            self.node_id = request.node.id
            if not self._scope_known:
                self._scope_known = True
                self.scope = self._scope_of(request.node)
        state = self._types.get(type_url)
        first = state is None
        if state is None:
            state = self._types[type_url] = _TypeState(type_url)
        nack: Nack | None = None
        if request.response_nonce:
            nack = self._answer(state, request)
        subscribe = list(request.resource_names_subscribe)
        if first:
            state.subscribed = True
            # An empty first subscription means "everything" (legacy wildcard).
            state.wildcard = not subscribe or WILDCARD in subscribe
            state.view = dict(request.initial_resource_versions)
            state.dirty.update(self._entries(snapshot, type_url))
            state.dirty.update(state.view)
        elif request.initial_resource_versions:
            raise InvalidRequest("initial_resource_versions after the first request of a type")
        for name in subscribe:
            if name == WILDCARD:
                state.wildcard = True
                state.dirty.update(self._entries(snapshot, type_url))
            else:
                state.names.add(name)
                state.dirty.add(name)
                if not first:
                    # A name asked for again is to be sent again, even unchanged: Envoy
                    # re-subscribes to a cluster's endpoints when the cluster changes
                    # and warms the cluster until they come.
                    state.view.pop(name, None)
                    state.rejected.pop(name, None)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                state.wildcard = False
                state.dirty.update(state.view)
            else:
                state.names.discard(name)
                if not state.interested(name):
                    state.view.pop(name, None)
                    state.dirty.discard(name)
        return nack

    def _answer(self, state: _TypeState, request: DeltaDiscoveryRequest) -> Nack | None:
        if request.response_nonce != state.inflight_nonce:
            return None  # a late answer to a response already superseded
        inflight, state.inflight, state.inflight_nonce = state.inflight, {}, None
        error = request.error_detail
        if not error.code and not error.message:
            state.acks += 1
            refused: set[str] = set()
        else:
            state.nacks += 1
            refused = _refused_names(error.details) or set(inflight)
        for name, version in inflight.items():
            if name in refused and version is not None:
                state.rejected[name] = version
            elif version is None:
                state.view.pop(name, None)
            else:
                state.view[name] = version
                state.rejected.pop(name, None)
        if not refused:
            return None
        nack = Nack(state.type_url, request.response_nonce, error.message, tuple(sorted(refused)))
        self.nacks.append(nack)
        del self.nacks[:-20]
        return nack

    def _entries(self, snapshot: Snapshot, type_url: str) -> Mapping[str, Entry]:
        if type_url in self.scoped:
            if self.scope == GLOBAL:
                return {}
            return snapshot.entries(type_url, self.scope)
        return snapshot.entries(type_url)

    def on_change(self, changed: Changes) -> None:
        for (scope, type_url), names in changed.items():
            if scope != (self.scope if type_url in self.scoped else GLOBAL):
                continue
            state = self._types.get(type_url)
            if state is not None and state.subscribed:
                state.dirty.update(n for n in names if state.interested(n))

    # --------------------------------------------------------------- output

    def next_response(self, snapshot: Snapshot) -> DeltaDiscoveryResponse | None:
        """The next response to send, or None when the subscriber is up to date."""
        for state in self._types.values():
            if state.inflight_nonce is not None or not state.subscribed:
                continue
            if not state.dirty and state.first_response_sent:
                continue
            response = self._build(state, snapshot)
            if response is not None:
                return response
        return None

    def _build(self, state: _TypeState, snapshot: Snapshot) -> DeltaDiscoveryResponse | None:
        entries = self._entries(snapshot, state.type_url)
        response = DeltaDiscoveryResponse(
            type_url=state.type_url, system_version_info=str(snapshot.generation)
        )
        inflight: dict[str, str | None] = {}
        count = 0
        for name in sorted(state.dirty):
            if count >= MAX_RESOURCES_PER_RESPONSE:
                break
            state.dirty.discard(name)
            entry = entries.get(name)
            have = state.view.get(name)
            if entry is None or not state.interested(name):
                if have is not None:
                    response.removed_resources.append(name)
                    inflight[name] = None
                    count += 1
            elif entry.version != have and state.rejected.get(name) != entry.version:
                resource = response.resources.add()
                resource.name = name
                resource.version = entry.version
                resource.resource.CopyFrom(entry.resource)
                inflight[name] = entry.version
                count += 1
        if not inflight and state.first_response_sent:
            return None
        follower = self.resend_with.get(state.type_url)
        if follower is not None and follower in self._types:
            after = self._types[follower]
            for name, version in inflight.items():
                if version is not None and after.interested(name):
                    after.view.pop(name, None)
                    after.dirty.add(name)
        # The first response goes out even when empty: it tells the proxy
        # that it now holds the whole state, so it can report itself ready.
        state.first_response_sent = True
        nonce = f"{next(_nonces):x}"
        response.nonce = nonce
        state.inflight_nonce = nonce
        state.inflight = inflight
        self.responses_sent += 1
        self.resources_sent += len(response.resources)
        return response

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "node": self.node_id,
            "scope": self.scope,
            "types": {
                t: {
                    "resources": len(s.view),
                    "wildcard": s.wildcard,
                    "pending": len(s.dirty) + len(s.inflight),
                    "acks": s.acks,
                    "nacks": s.nacks,
                }
                for t, s in self._types.items()
            },
            "responsesSent": self.responses_sent,
            "resourcesSent": self.resources_sent,
            "lastNacks": [n.__dict__ for n in self.nacks[-5:]],
        }

    def in_sync(self, snapshot: Snapshot) -> bool:
        """True when the subscriber holds every resource of ``snapshot`` it asked for."""
        for state in self._types.values():
            if state.inflight_nonce is not None or state.dirty:
                return False
            entries = self._entries(snapshot, state.type_url)
            for name, entry in entries.items():
                if (
                    state.interested(name)
                    and state.view.get(name) != entry.version
                    and (state.rejected.get(name) != entry.version)
                ):
                    return False
        return True


def _refused_names(details: Iterable[object]) -> set[str]:
    names: set[str] = set()
    for detail in details:
        value = struct_pb2.ListValue()
        if getattr(detail, "Unpack", None) and detail.Unpack(value):  # type: ignore[attr-defined]
            names.update(v.string_value for v in value.values if v.string_value)
    return names
