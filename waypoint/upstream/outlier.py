"""Outlier detection, as Envoy's: eject endpoints that keep failing, for a growing while.

Pure over the hosts of one cluster and the times the caller passes in:

* every response counts: a 5xx (or a failure to connect or a reset, which
  Envoy counts as a 5xx too) adds to the host's consecutive 5xx, a 502, 503
  or 504 to its consecutive gateway failures, anything else clears both;
* reaching ``consecutive_5xx`` (or, when enforced, ``consecutive_gateway_failure``)
  ejects the host, unless as many hosts as ``max_ejection_percent`` allows
  are out already (one may always go when none is);
* an ejection lasts ``base_ejection_time`` times the number of times the host
  has been ejected (at most ``max_ejection_time``) and ends on the next
  ``interval`` tick after that; a tick also lowers the count of a host that
  stayed in.
"""

from __future__ import annotations

from collections.abc import Iterable

from waypoint.config.model import OutlierConfig
from waypoint.upstream.lb import Host


def record(
    config: OutlierConfig, hosts: Iterable[Host], host: Host, status: int, now: float
) -> bool:
    """Count one outcome for ``host`` (status 0: connect failure or reset); True if it
    was ejected by it."""
    failed = status == 0 or status >= 500
    gateway = status == 0 or status in (502, 503, 504)
    if not failed:
        host.consecutive_5xx = 0
        host.consecutive_gateway = 0
        return False
    host.consecutive_5xx += 1
    if gateway:
        host.consecutive_gateway += 1
    else:
        host.consecutive_gateway = 0
    if host.ejected:
        return False
    by_5xx = config.enforcing_consecutive_5xx > 0 and host.consecutive_5xx >= config.consecutive_5xx
    by_gateway = (
        config.enforcing_consecutive_gateway_failure > 0
        and host.consecutive_gateway >= config.consecutive_gateway_failure
    )
    if not (by_5xx or by_gateway):
        return False
    hosts = list(hosts)
    out = sum(1 for h in hosts if h.ejected)
    if hosts and 100.0 * out / len(hosts) >= config.max_ejection_percent and out > 0:
        return False
    host.ejected = True
    host.times_ejected += 1
    duration = min(config.base_ejection_time_s * host.times_ejected, config.max_ejection_time_s)
    host.ejected_until = now + duration
    host.consecutive_5xx = 0
    host.consecutive_gateway = 0
    return True


def tick(config: OutlierConfig, hosts: Iterable[Host], now: float) -> list[Host]:
    """The interval timer: bring back hosts whose ejection is over; returns them."""
    back = []
    for host in hosts:
        if host.ejected:
            if now >= host.ejected_until:
                host.ejected = False
                back.append(host)
        elif host.times_ejected > 0:
            host.times_ejected -= 1
    return back
