"""Choosing an endpoint, as Envoy's load balancers do; pure (the caller passes the randomness).

* the candidates are the healthy endpoints (EDS healthy and not ejected);
  when they are fewer than the panic threshold's share of all endpoints,
  every endpoint is a candidate (Envoy's panic mode), and with a threshold of
  0 an empty set stays empty (503 ``no healthy upstream``);
* LEAST_REQUEST: two draws with replacement, the one with fewer requests in
  flight wins (the first on a tie); ROUND_ROBIN from a random start; RANDOM;
  RING_HASH (and MAGLEV, served by the same ring here) by the request's hash;
* with ``previous_hosts`` a retry draws again, up to the policy's number of
  attempts, while the pick is one it already tried, and keeps the last pick.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from waypoint.config.model import Cluster, Endpoint, LbPolicy


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Envoy uses xxHash64)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass(slots=True, eq=False)
class Host:
    """One endpoint of a cluster and what the waypoint counts about it (mutable)."""

    endpoint: Endpoint
    active: int = 0  # requests in flight
    ejected_until: float = 0.0
    ejected: bool = False
    times_ejected: int = 0
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    total: int = 0
    failures: int = 0

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def healthy(self) -> bool:
        return self.endpoint.healthy and not self.ejected


@dataclass(slots=True)
class Balancer:
    """The load balancer state of one cluster: its hosts and the round-robin position."""

    cluster: Cluster
    hosts: list[Host]
    rr_index: int = 0
    _ring: list[tuple[int, Host]] | None = field(default=None, repr=False)

    def candidates(self) -> list[Host]:
        healthy = [h for h in self.hosts if h.healthy]
        if not self.hosts:
            return []
        panic = self.cluster.healthy_panic_percent
        if panic > 0 and 100.0 * len(healthy) / len(self.hosts) < panic:
            return list(self.hosts)  # panic: Envoy spreads over all hosts
        return healthy

    def _once(self, hosts: Sequence[Host], rng: random.Random, hash_key: int | None) -> Host:
        policy = self.cluster.lb
        if policy in (LbPolicy.RING_HASH, LbPolicy.MAGLEV) and hash_key is not None:
            return self._by_ring(hosts, hash_key)
        if policy is LbPolicy.LEAST_REQUEST:
            best = hosts[rng.randrange(len(hosts))]
            for _ in range(self.cluster.choice_count - 1):
                other = hosts[rng.randrange(len(hosts))]
                if other.active < best.active:
                    best = other
            return best
        if policy is LbPolicy.ROUND_ROBIN:
            host = hosts[self.rr_index % len(hosts)]
            self.rr_index += 1
            return host
        return hosts[rng.randrange(len(hosts))]

    def _by_ring(self, hosts: Sequence[Host], key: int) -> Host:
        if self._ring is None:
            size = max(1, self.cluster.minimum_ring_size // max(1, len(self.hosts)))
            self._ring = sorted(
                ((stable_hash(f"{h.address}_{i}"), h) for h in self.hosts for i in range(size)),
                key=lambda entry: entry[0],
            )
        allowed = set(map(id, hosts))
        ring = self._ring
        start = bisect.bisect_left(ring, key, key=lambda entry: entry[0]) if ring else 0
        for i in range(len(ring)):
            host = ring[(start + i) % len(ring)][1]
            if id(host) in allowed:
                return host
        return hosts[0]

    def choose(
        self,
        rng: random.Random,
        *,
        hash_key: int | None = None,
        tried: Sequence[Host] = (),
        attempts: int = 0,
    ) -> Host | None:
        """An endpoint for one attempt, or None when there is no candidate at all."""
        hosts = self.candidates()
        if not hosts:
            return None
        pick = self._once(hosts, rng, hash_key)
        # Envoy draws up to host_selection_retry_max_attempts more times.
        for _ in range(max(0, attempts if tried else 0)):
            if pick not in tried:
                break
            pick = self._once(hosts, rng, hash_key)
        return pick


def new_balancer(cluster: Cluster, endpoints: Sequence[Endpoint], rng: random.Random) -> Balancer:
    hosts = [Host(endpoint=e) for e in endpoints]
    return Balancer(cluster=cluster, hosts=hosts, rr_index=rng.randrange(1 << 16) if hosts else 0)
