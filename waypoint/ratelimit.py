"""Envoy's local rate limit filter (``envoy.filters.http.local_ratelimit``) at request time.

The decision, in Envoy's order (``local_ratelimit.cc`` decodeHeaders): the
route's ``typed_per_filter_config`` replaces the filter's config; a config that
is not enabled (``filter_enabled``, 0% unless set) lets the request through
without counting it; otherwise a token is taken from the config's bucket; with
none left the request is limited only if ``filter_enforced`` says so: then
``status`` (429) with body ``local_rate_limited``, details
``local_rate_limited``, flag ``RL`` and the config's ``response_headers_to_add``.

A bucket starts full (``max_tokens``) and refills continuously at
``tokens_per_fill`` per ``fill_interval`` (Envoy's atomic token bucket), up to
``max_tokens``. Buckets are per waypoint instance (shared by all its
connections, as Envoy's default ``local_rate_limit_per_downstream_connection:
false``) and keyed by where the config is (the filter of a chain, or a route)
and the bucket's settings: a config update that leaves them alone keeps the
bucket and its tokens; one that changes them starts a new, full bucket.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable

from waypoint.config.model import LocalRateLimit, TokenBucket
from waypoint.headers import mutate
from waypoint.http.messages import LocalReply

BODY = b"local_rate_limited"
MAX_BUCKETS = 65536  # forget the oldest beyond this (configs long gone)


class Bucket:
    __slots__ = ("max_tokens", "rate", "stamp", "tokens")

    def __init__(self, settings: TokenBucket, now: float) -> None:
        self.max_tokens = float(settings.max_tokens)
        self.rate = settings.tokens_per_fill / settings.fill_interval_s
        self.tokens = self.max_tokens
        self.stamp = now

    def take(self, now: float) -> bool:
        if now > self.stamp:
            self.tokens = min(self.max_tokens, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class RateLimiter:
    """The buckets of one waypoint instance."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.buckets: dict[Hashable, Bucket] = {}

    def bucket(self, where: Hashable, settings: TokenBucket) -> Bucket:
        key = (where, settings)
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= MAX_BUCKETS:
                del self.buckets[next(iter(self.buckets))]
            b = self.buckets[key] = Bucket(settings, self.clock())
        return b

    def check(
        self, config: LocalRateLimit, where: Hashable, rng: random.Random
    ) -> LocalReply | None:
        """None to let the request through, else the local reply that limits it."""
        if config.bucket is None or not _sampled(config.enabled_ppm, rng):
            return None
        if self.bucket(where, config.bucket).take(self.clock()):
            return None
        if not _sampled(config.enforced_ppm, rng):
            return None
        headers = mutate([], config.response_headers) if config.response_headers else []
        return LocalReply(
            config.status,
            BODY,
            flag="RL",
            details="local_rate_limited",
            headers=tuple(headers),
        )


def _sampled(ppm: int, rng: random.Random) -> bool:
    if ppm >= 1_000_000:
        return True
    if ppm <= 0:
        return False
    return rng.randrange(1_000_000) < ppm
