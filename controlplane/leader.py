"""Leader election on Kubernetes: what only one meshd replica may do, one replica does.

Every replica serves xDS and the CA: those are per replica, as every
istiod's are. What replicas would fight over are the waypoint deployer's
writes (:mod:`controlplane.deployer`): the waypoints' instances, the Gateway
and route status, the ``istio-ca-root-cert`` ConfigMaps. Only the holder of
the ``coordination.k8s.io/v1`` Lease ``istio-system/meshd-leader`` makes
them, and each one asks :meth:`Elector.writing` first.

The lease is taken and kept as client-go's ``tools/leaderelection`` does:

* **acquire** when there is none (create it), when its ``holderIdentity`` is
  empty (released), or when the record has not changed for its
  ``leaseDurationSeconds``, counted on this replica's monotonic clock from
  when it first saw the record as it is (client-go's ``observedTime``), not
  from the holder's ``renewTime``: clocks that disagree elect no second
  leader. (So a replica that has just started waits one lease duration
  before it takes a lease that a crashed holder left.)
* **renew** every ``retry_period_s``: a PUT of the lease as last written,
  with its ``resourceVersion``. A 409 there means someone wrote it since: it
  is read again and decided on (client-go's slow path). A 409 on the write
  that would take it, or on a create, means another replica won: a loss,
  not an error.
* **fail safe**: leadership lasts until ``renew_deadline_s`` after the start
  of the last successful write of the lease, and that is checked at each
  guarded write, however late this loop runs. The others wait
  ``lease_duration_s`` from when they saw that write, which is later still;
  the difference is the margin for a write already in flight.
* **release** on shutdown: stop leading, wait for the writes in flight, then
  clear ``holderIdentity`` (with ``leaseDurationSeconds: 1``, as client-go's
  ``ReleaseOnCancel``), so that a peer takes over at its next try rather
  than a lease duration later.

Timings (:class:`ElectionSettings`) are those of kube-controller-manager and
kube-scheduler (``--leader-elect-lease-duration=15s``, ``-renew-deadline=10s``,
``-retry-period=2s``): a crashed leader is replaced 15 to 20 s later, a
released lease is taken within 2 to 4.4 s (a candidate waits the retry
period times 1 to 2.2, client-go's ``JitterFactor``), and a leader has four
tries to renew before its deadline, where istiod's (30 s, 15 s, 7.5 s) would
give it one. The identity is the pod's name (``POD_NAME``, from the downward API;
else the host name, which in a pod is the same) and a random suffix, as
client-go's ``hostname_uuid``. istiod holds three elections for these duties
(a Lease ``istio-gateway-deployment-<revision>`` for its deployment
controller, ConfigMap locks ``istio-gateway-status-leader`` and
``istio-namespace-controller-election``); meshd holds one, of its own name,
since it takes no part in istiod's.

*Sans-I/O*: :class:`Candidate` decides, from a lease read and a clock, what
to write and whether it leads; :class:`Elector` is the shell: the requests
(blocking, in a thread, as the rest of the Kubernetes code), the loop, the
write gate and the release.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import kubernetes.client
import urllib3
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)
Obj = dict[str, Any]

NAMESPACE = "istio-system"  # meshd's, as the CA Secret's
LEASE_NAME = "meshd-leader"
LEASES = "/apis/coordination.k8s.io/v1"
# metav1.MicroTime: the API server parses exactly six fractional digits. (The official
# client's models write a whole-second datetime without any, which it refuses.)
MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
NEVER = -math.inf


class NotLeading(Exception):
    """A write only the leader may make, refused: this replica does not hold the lease."""


class WriteGate(Protocol):
    """What a writer needs of an election (:class:`Elector` is one)."""

    def leading(self) -> bool: ...

    def writing(self) -> contextlib.AbstractContextManager[None]: ...

    def listen(self, callback: Callable[[bool], None]) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ElectionSettings:
    """The lease and the timings (see the module's docstring for why these)."""

    namespace: str = NAMESPACE
    name: str = LEASE_NAME
    lease_duration_s: int = 15  # a whole number: leaseDurationSeconds is an integer
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    jitter: float = 1.2  # a candidate waits retry_period_s * (1 + random() * jitter)
    request_timeout_s: float = 5.0  # each request's, whole: two fit in the renew deadline
    release_wait_s: float = 5.0  # for the writes in flight and the last try, on shutdown

    def __post_init__(self) -> None:
        # client-go's checks (NewLeaderElector): the deadline ends before the lease can
        # expire for the others, with room for more than one try.
        if not isinstance(self.lease_duration_s, int) or self.lease_duration_s < 1:
            raise ValueError("the lease duration is a whole number of seconds, at least 1")
        if not self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("the renew deadline must be shorter than the lease duration")
        if not 0 < self.retry_period_s * self.jitter < self.renew_deadline_s:
            raise ValueError(
                f"the renew deadline must be longer than {self.jitter} x the retry period"
            )


def identity(pod_name: str = "") -> str:
    """This replica's ``holderIdentity``: its pod's name (else the host's), and a suffix
    that tells a restarted meshd from the one before it."""
    return f"{pod_name or socket.gethostname()}_{uuid.uuid4()}"


def micro_time(wall: datetime) -> str:
    """``wall`` as a ``metav1.MicroTime``."""
    return wall.astimezone(UTC).strftime(MICRO_TIME)


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRecord:
    """What a Lease's spec says of its holder (client-go's LeaderElectionRecord)."""

    holder: str = ""  # "": released, or never held
    duration_s: int = 0
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_s=int(spec.get("leaseDurationSeconds") or 0),
            acquire_time=spec.get("acquireTime"),
            renew_time=spec.get("renewTime"),
            transitions=int(spec.get("leaseTransitions") or 0),
        )

    def spec(self) -> Obj:
        return {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": self.acquire_time,
            "renewTime": self.renew_time,
            "leaseTransitions": self.transitions,
        }


@dataclass(frozen=True, slots=True)
class Write:
    """A write of the lease: create it (POST), or replace it (PUT, with the resourceVersion
    it carries, so that the API server refuses it if anyone wrote in between)."""

    lease: Obj
    create: bool = False


class Candidate:
    """One replica's side of the election, without I/O.

    ``now`` is monotonic seconds (when a lease expires, and when leadership ends);
    ``wall`` is the time written into the lease, for people to read.
    """

    def __init__(self, identity: str, settings: ElectionSettings) -> None:
        self.identity = identity
        self.settings = settings
        self.lease: Obj | None = None  # as last read or written; None: to be read first
        self.record: LeaseRecord | None = None
        self.observed_at = NEVER  # when ``record`` was first seen as it is
        self.valid_until = NEVER  # it leads until then (when the record names it)
        self.resigned = False

    def leading(self, now: float) -> bool:
        return self.holder == self.identity and now < self.valid_until

    @property
    def holder(self) -> str:
        return self.record.holder if self.record is not None else ""

    def renewal(self, wall: datetime) -> Write | None:
        """The renewal of a lease it holds, from the lease as last written, without reading
        it first (client-go's fast path); None when it does not hold one."""
        if self.lease is None or self.holder != self.identity or self.resigned:
            return None
        return Write(self._claim(self.lease, wall))

    def read(self, lease: Mapping[str, Any] | None, now: float, wall: datetime) -> Write | None:
        """The lease as just read (None: there is none): the write that takes or keeps it,
        or None while someone else holds it."""
        self._observe(lease, now)
        if self.resigned:
            return None
        if lease is None:
            meta = {"name": self.settings.name, "namespace": self.settings.namespace}
            return Write(self._claim({"metadata": meta}, wall), create=True)
        holder = self.holder
        if holder and holder != self.identity:
            self.valid_until = NEVER
            if self.record is not None and now < self.observed_at + self.record.duration_s:
                return None  # held, and renewed within its duration as we count it
        return Write(self._claim(lease, wall))

    def wrote(self, lease: Mapping[str, Any], started: float) -> None:
        """A write of the lease succeeded (``lease``: the API server's answer); it was sent
        at ``started``. Leading lasts from then until the renew deadline."""
        self._observe(lease, started)
        if not self.resigned and self.holder == self.identity:
            self.valid_until = started + self.settings.renew_deadline_s

    def lost(self) -> None:
        """A 409 on a write that would have taken the lease: someone else wrote first. It
        leads no more, and reads the lease before it writes again."""
        self.valid_until = NEVER
        self.lease = None

    def resign(self) -> None:
        """Stop leading now, and never again (shutdown)."""
        self.resigned = True
        self.valid_until = NEVER

    def release(self, wall: datetime) -> Write | None:
        """The write that gives up the lease it holds (after :meth:`resign`), or None."""
        if self.lease is None or self.record is None or self.holder != self.identity:
            return None
        now = micro_time(wall)
        record = LeaseRecord(
            duration_s=1, acquire_time=now, renew_time=now, transitions=self.record.transitions
        )
        return Write({**self.lease, "spec": {**(self.lease.get("spec") or {}), **record.spec()}})

    def _observe(self, lease: Mapping[str, Any] | None, now: float) -> None:
        record = LeaseRecord.of(lease) if lease is not None else None
        if record != self.record:
            self.observed_at = now
        self.lease = dict(lease) if lease is not None else None
        self.record = record

    def _claim(self, lease: Mapping[str, Any], wall: datetime) -> Obj:
        """``lease`` naming this replica its holder, renewed at ``wall``."""
        old = LeaseRecord.of(lease) if lease.get("spec") else None
        now = micro_time(wall)
        if old is not None and old.holder == self.identity:
            acquired, transitions = old.acquire_time or now, old.transitions
        else:
            acquired, transitions = now, (old.transitions + 1 if old is not None else 0)
        record = LeaseRecord(
            holder=self.identity,
            duration_s=self.settings.lease_duration_s,
            acquire_time=acquired,
            renew_time=now,
            transitions=transitions,
        )
        return {
            **lease,
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "spec": {**(lease.get("spec") or {}), **record.spec()},  # others' fields kept
        }


class Elector:
    """Campaigns for the lease, holds it, gives it up: :meth:`run` on the loop, the
    requests in a thread; :meth:`writing` guards each write only the leader may make."""

    def __init__(
        self,
        api_client: kubernetes.client.ApiClient,
        identity: str,
        settings: ElectionSettings | None = None,
        *,
        logger: logging.Logger = log,
    ) -> None:
        self.api_client = api_client
        self.settings = settings or ElectionSettings()
        self.candidate = Candidate(identity, self.settings)
        self.log = logger
        self.terms = 0  # how many times it has become the leader
        # The candidate is read by the writers' threads and changed by the election's.
        self._cond = threading.Condition()
        self._writes = 0  # guarded writes in flight
        self._exchange = threading.Lock()  # one exchange with the API server at a time
        self._listeners: list[Callable[[bool], None]] = []
        self._told = False
        self._said = ""

    @property
    def identity(self) -> str:
        return self.candidate.identity

    @property
    def where(self) -> str:
        return f"{self.settings.namespace}/{self.settings.name}"

    def leading(self) -> bool:
        """Whether this replica holds the lease now (its renew deadline not passed)."""
        with self._cond:
            return self.candidate.leading(time.monotonic())

    def listen(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(leading)`` on the loop when leading begins or ends."""
        self._listeners.append(callback)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around a write only the leader may make: :class:`NotLeading` unless this replica
        leads now; the lease is not released while a write is inside."""
        with self._cond:
            if not self.candidate.leading(time.monotonic()):
                raise NotLeading(
                    f"{self.identity} does not hold the lease {self.where} "
                    f"(held by {self.candidate.holder or 'no one'})"
                )
            self._writes += 1
        try:
            yield
        finally:
            with self._cond:
                self._writes -= 1
                self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "lease": self.where,
                "identity": self.identity,
                "leading": self.candidate.leading(time.monotonic()),
                "holder": self.candidate.holder,
                "terms": self.terms,
            }

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Take the lease and keep it, or wait for it, until cancelled; then give it up."""
        self.log.info("leader election: %s campaigns for the lease %s", self.identity, self.where)
        try:
            while True:
                await asyncio.to_thread(self.step)
                self._tell()
                await asyncio.sleep(self._pause())
        finally:
            with self._cond:
                self.candidate.resign()
            self._tell()
            await asyncio.to_thread(self.release)

    def _pause(self) -> float:
        if self.leading():
            return self.settings.retry_period_s
        return self.settings.retry_period_s * (1 + random.random() * self.settings.jitter)

    def _tell(self) -> None:
        leading = self.leading()
        if leading == self._told:
            return
        self._told = leading
        if leading:
            self.terms += 1
            self.log.info("leader election: %s leads (lease %s)", self.identity, self.where)
        else:
            self.log.warning(
                "leader election: %s leads no more (lease %s, held by %s)",
                self.identity,
                self.where,
                self.candidate.holder or "no one",
            )
        for callback in list(self._listeners):
            callback(leading)

    # -- one exchange (blocking) ----------------------------------------------------------

    def step(self) -> None:
        """Renew the lease, or try to take it: one exchange with the API server. Blocking."""
        with self._exchange:
            try:
                self._step()
            except ApiException as e:
                self._say(f"cannot take or renew the lease {self.where}: {_reason(e)}")
                return
            except (urllib3.exceptions.HTTPError, OSError) as e:
                self._say(f"cannot reach the API server for the lease {self.where}: {e}")
                return
            except (ValueError, TypeError) as e:  # not JSON, or not a Lease: tried again
                self._say(f"the API server's answer for the lease {self.where} is unreadable: {e}")
                return
            self._say("")

    def _step(self) -> None:
        c = self.candidate
        with self._cond:
            write = c.renewal(datetime.now(UTC))
        if write is not None:
            started = time.monotonic()
            try:
                answer = self._send(write)
            except ApiException as e:
                if e.status != 409:
                    raise
                # Someone wrote the lease since: read it, and see whose it is now.
            else:
                with self._cond:
                    c.wrote(answer, started)
                return
        lease = self._read()
        with self._cond:
            write = c.read(lease, time.monotonic(), datetime.now(UTC))
        if write is None:
            return
        started = time.monotonic()
        try:
            answer = self._send(write)
        except ApiException as e:
            if e.status != 409:
                raise
            with self._cond:
                c.lost()  # another replica wrote first: theirs
            return
        with self._cond:
            c.wrote(answer, started)

    def release(self) -> None:
        """Give up the lease, if held, once the guarded writes in flight have ended. Blocking;
        on shutdown (after which it never leads again)."""
        deadline = time.monotonic() + self.settings.release_wait_s
        with self._cond:
            self.candidate.resign()
            while self._writes and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            busy = self._writes
        if busy or not self._exchange.acquire(timeout=max(0.0, deadline - time.monotonic())):
            self.log.warning(
                "leader election: the lease %s is not released (%s still in flight): "
                "another replica takes over when it expires",
                self.where,
                f"{busy} writes" if busy else "a renewal",
            )
            return
        try:
            with self._cond:
                write = self.candidate.release(datetime.now(UTC))
            if write is None:
                return
            try:
                self._send(write)
            except ApiException as e:
                if e.status != 409:  # 409: someone else holds it already
                    self.log.warning(
                        "leader election: cannot release the lease %s: %s", self.where, _reason(e)
                    )
                return
            except (urllib3.exceptions.HTTPError, OSError) as e:
                self.log.warning("leader election: cannot release the lease %s: %s", self.where, e)
                return
            self.log.info("leader election: %s released the lease %s", self.identity, self.where)
        finally:
            self._exchange.release()

    def _say(self, problem: str) -> None:
        """Each problem once, and once that it is over."""
        if problem and problem != self._said:
            self.log.warning("leader election: %s", problem)
        elif not problem and self._said:
            self.log.info("leader election: the lease %s can be reached again", self.where)
        self._said = problem

    # -- requests ----------------------------------------------------------------------------

    def _read(self) -> Obj | None:
        try:
            return self._call("GET", self._path(self.settings.name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _send(self, write: Write) -> Obj:
        if write.create:
            return self._call("POST", self._path(), write.lease)
        return self._call("PUT", self._path(self.settings.name), write.lease)

    def _path(self, name: str = "") -> str:
        out = f"{LEASES}/namespaces/{self.settings.namespace}/leases"
        return f"{out}/{name}" if name else out

    def _call(self, method: str, path: str, body: Obj | None = None) -> Obj:
        """One request, its JSON answer; ApiException for any status but 2xx. Raw JSON, not
        the client's models, whose datetimes are not always a MicroTime."""
        serialized = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        # One number: a bound on the whole request (a pair would bound connect and each read).
        timeout = self.settings.request_timeout_s
        response = self.api_client.call_api(*serialized, _request_timeout=timeout)
        data: bytes = response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise ApiException(
                status=response.status, reason=response.reason, body=data.decode(errors="replace")
            )
        return dict(json.loads(data or b"{}"))


def _reason(e: ApiException) -> str:
    message = ""
    with contextlib.suppress(ValueError, AttributeError):
        message = str(json.loads(e.body or "{}").get("message", ""))
    text = f"HTTP {e.status} {e.reason}" + (f": {message}" if message else "")
    if e.status in (401, 403):
        text += " (hint: meshd's Role in its namespace must allow get, create, update on leases)"
    return text
