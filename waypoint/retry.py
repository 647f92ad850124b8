"""Whether to try again, as Envoy's retry state decides it; pure (randomness passed in).

* by the response: ``5xx`` any 5xx, ``gateway-error`` 502/503/504,
  ``retriable-4xx`` 409, ``retriable-status-codes`` the policy's codes (none by
  default: Istio's default policy retries no status), and the gRPC
  conditions on the ``grpc-status`` of a headers-only answer;
* by a failure before the answer: ``connect-failure`` (connection refused,
  failed or timed out), ``refused-stream``, ``reset`` (any),
  ``reset-before-request`` (when nothing was sent), and ``5xx`` or
  ``gateway-error`` for any reset;
* a per-try timeout is a reset of our own: retried only under ``5xx``,
  ``gateway-error`` or ``reset``;
* each retry waits a fully jittered back-off: uniform in ``[0, interval)``,
  the interval starting at the base (25 ms) and doubling up to the maximum
  (250 ms).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from waypoint.config.model import RetryPolicy

GRPC_CONDITIONS = {
    "cancelled": 1,
    "deadline-exceeded": 4,
    "resource-exhausted": 8,
    "internal": 13,
    "unavailable": 14,
}
CONNECT_FAILURES = frozenset(
    {"remote connection failure", "local connection failure", "connection timeout"}
)


class RetryState:
    """The retries left for one request."""

    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.remaining = policy.num_retries
        self.retried = 0
        self._interval_ms = max(1, round(policy.base_interval_s * 1000))
        self._max_ms = max(self._interval_ms, round(policy.max_interval_s * 1000))

    def _allowed(self) -> bool:
        return self.remaining > 0

    def wants_status(self, status: int, headers: Sequence[tuple[str, str]] = ()) -> bool:
        on = self.policy.retry_on
        if (
            ("5xx" in on and status >= 500)
            or ("gateway-error" in on and status in (502, 503, 504))
            or ("retriable-4xx" in on and status == 409)
            or ("retriable-status-codes" in on and status in self.policy.status_codes)
        ):
            return True
        grpc = next((v for k, v in headers if k == "grpc-status"), None)
        if grpc is not None and grpc.isdigit():
            code = int(grpc)
            return any(GRPC_CONDITIONS.get(c) == code for c in on)
        return False

    def wants_reset(self, reason: str, sent: bool) -> bool:
        on = self.policy.retry_on
        if reason == "overflow":
            return False
        if "5xx" in on or "gateway-error" in on or "reset" in on:
            return True
        if "reset-before-request" in on and not sent:
            return True
        if "connect-failure" in on and reason in CONNECT_FAILURES:
            return True
        return "refused-stream" in on and reason == "remote refused stream reset"

    def wants_timeout(self) -> bool:
        on = self.policy.retry_on
        return "5xx" in on or "gateway-error" in on or "reset" in on

    def take(self) -> float | None:
        """Use one retry: the back-off to wait, in seconds; None when none is left."""
        if not self._allowed():
            return None
        self.remaining -= 1
        self.retried += 1
        wait_ms = self.rng.randrange(self._interval_ms)
        self._interval_ms = (
            self._interval_ms * 2 if self._interval_ms < self._max_ms / 2 else self._max_ms
        )
        return wait_ms / 1000.0
