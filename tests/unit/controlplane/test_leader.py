"""Leader election: one meshd replica writes what only one may, and hands over safely.

The decisions are tested as transcripts of :class:`Candidate` with a clock of
our own; then electors run against ``tests/support/fake_kube/`` through the
official client with short timings (a 1 s lease, 0.5 s renew deadline, 0.1 s
retry), each with a token of its own, so the server can refuse one of them and
tell their writes apart; then the deployer under an election it does not
win; last, two ``meshd`` processes, of which only the leader deploys a
waypoint and writes its status, and the other takes over when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import json
import logging
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest
from kubernetes.client.exceptions import ApiException

from bench.envoy import free_port
from controlplane.deployer import WaypointDeployer
from controlplane.l7.build import build
from controlplane.leader import (
    LEASE_NAME,
    NAMESPACE,
    Candidate,
    ElectionSettings,
    Elector,
    NotLeading,
    micro_time,
)
from controlplane.sources.kubernetes import KubernetesSource, api_client_from
from tests.support import fake_kube as k
from tests.support.fake_kube import FakeKube
from tests.unit.controlplane.test_kube_waypoints import SETTINGS, shop, waypoint

ApiClient = kubernetes.client.ApiClient
FAST = ElectionSettings(lease_duration_s=1, renew_deadline_s=0.5, retry_period_s=0.1)
WALL = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)  # whole seconds: the tricky case
MICRO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
LOGGER = "test.leader"


def lease_of(holder: str, rv: str = "7", *, renewed: str = "2020-01-01T00:00:00.000000Z") -> k.Obj:
    """A lease as the API server returns it, held by ``holder`` (renewed long ago, by the
    holder's clock: which must not matter)."""
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": LEASE_NAME, "namespace": NAMESPACE, "resourceVersion": rv},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 1,
            "acquireTime": renewed,
            "renewTime": renewed,
            "leaseTransitions": 3,
        },
    }


# -- the decisions, without I/O ---------------------------------------------------------------


def test_no_lease_is_created_then_renewed_from_what_was_written() -> None:
    me = Candidate("meshd-a_1", FAST)
    create = me.read(None, now=10.0, wall=WALL)
    assert create is not None and create.create
    spec = create.lease["spec"]
    assert spec == {
        "holderIdentity": "meshd-a_1",
        "leaseDurationSeconds": 1,
        "acquireTime": "2026-03-01T12:00:00.000000Z",  # six digits, even for 0 microseconds
        "renewTime": "2026-03-01T12:00:00.000000Z",
        "leaseTransitions": 0,
    }
    assert not me.leading(10.0)  # not before the API server says so
    me.wrote(
        {**create.lease, "metadata": {**create.lease["metadata"], "resourceVersion": "8"}}, 10.0
    )
    assert me.leading(10.49) and not me.leading(10.5)  # until the renew deadline
    later = WALL + dt.timedelta(seconds=3, microseconds=250)
    renew = me.renewal(later)
    assert renew is not None and not renew.create
    assert renew.lease["metadata"]["resourceVersion"] == "8"  # refused if anyone wrote since
    assert renew.lease["spec"]["acquireTime"] == "2026-03-01T12:00:00.000000Z"
    assert renew.lease["spec"]["renewTime"] == "2026-03-01T12:00:03.000250Z"
    assert renew.lease["spec"]["leaseTransitions"] == 0


def test_a_held_lease_expires_by_the_candidates_own_clock_not_the_holders() -> None:
    me = Candidate("meshd-b_2", FAST)
    # Renewed "six years ago" by the holder's clock: still held until it stays unchanged
    # for its duration as we count it.
    assert me.read(lease_of("meshd-a_1"), now=100.0, wall=WALL) is None
    assert me.read(lease_of("meshd-a_1"), now=100.9, wall=WALL) is None
    # The holder renews (a new record): the count starts again.
    renewed = lease_of("meshd-a_1", "9", renewed="2020-01-01T00:00:01.000000Z")
    assert me.read(renewed, now=100.95, wall=WALL) is None
    assert me.read(renewed, now=101.9, wall=WALL) is None
    take = me.read(renewed, now=101.95, wall=WALL)
    assert take is not None and not take.create
    assert take.lease["metadata"]["resourceVersion"] == "9"
    assert take.lease["spec"]["holderIdentity"] == "meshd-b_2"
    assert take.lease["spec"]["leaseTransitions"] == 4
    assert take.lease["spec"]["acquireTime"] == micro_time(WALL)


def test_a_released_lease_is_taken_at_once() -> None:
    me = Candidate("meshd-b_2", FAST)
    released = lease_of("")
    take = me.read(released, now=5.0, wall=WALL)
    assert take is not None and take.lease["spec"]["holderIdentity"] == "meshd-b_2"


def test_a_conflict_is_a_loss_and_a_leader_that_sees_another_holder_follows() -> None:
    me = Candidate("meshd-a_1", FAST)
    write = me.read(lease_of(""), now=1.0, wall=WALL)
    assert write is not None
    me.lost()  # the PUT answered 409: someone else took it first
    assert not me.leading(1.0)
    assert me.renewal(WALL) is None  # it reads before it writes again
    me.wrote(lease_of("meshd-a_1", "10"), 2.0)
    assert me.leading(2.0)
    assert me.read(lease_of("meshd-c_3", "11"), now=2.1, wall=WALL) is None
    assert not me.leading(2.1)  # at once, not at its deadline


def test_a_resigned_candidate_gives_the_lease_up_and_never_takes_it_again() -> None:
    me = Candidate("meshd-a_1", FAST)
    me.wrote(lease_of("meshd-a_1", "10"), 2.0)
    me.resign()
    assert not me.leading(2.0)
    assert me.renewal(WALL) is None
    release = me.release(WALL)
    assert release is not None
    assert release.lease["metadata"]["resourceVersion"] == "10"
    assert release.lease["spec"]["holderIdentity"] == ""
    assert release.lease["spec"]["leaseDurationSeconds"] == 1
    assert release.lease["spec"]["leaseTransitions"] == 3
    assert me.read(lease_of(""), now=3.0, wall=WALL) is None


def test_timings_the_lease_cannot_cover_are_refused() -> None:
    for bad in (
        {"lease_duration_s": 1, "renew_deadline_s": 1.0},  # no margin before the others take it
        {"renew_deadline_s": 2.0, "retry_period_s": 2.0},  # no second try
        {"lease_duration_s": 0},
    ):
        with pytest.raises(ValueError):
            ElectionSettings(**bad)
    ElectionSettings()  # the kube components' 15 s / 10 s / 2 s


# -- against the API server ---------------------------------------------------------------------


@pytest.fixture
def kube() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@contextlib.contextmanager
def client_as(kube: FakeKube, tmp_path: Path, token: str) -> Iterator[ApiClient]:
    kubeconfig = kube.write_kubeconfig(tmp_path / f"kubeconfig-{token}", token=token)
    with contextlib.closing(api_client_from(str(kubeconfig))) as api:
        yield api


@contextlib.asynccontextmanager
async def electing(elector: Elector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(elector.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(check: Callable[[], Any], within_s: float = 5.0) -> Any:
    deadline = time.monotonic() + within_s
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
    return value


def holder(kube: FakeKube) -> str:
    lease = kube.find("leases", LEASE_NAME, NAMESPACE)
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


class Watch:
    """Samples who leads, every few milliseconds, and fails at once if two ever do."""

    def __init__(self, **electors: Elector) -> None:
        self.electors = electors
        self.leaders: list[tuple[float, str]] = []  # (since, name or "")

    def sample(self) -> str:
        leading = [name for name, e in self.electors.items() if e.leading()]
        assert len(leading) <= 1, f"two leaders at once: {leading}"
        now = (leading or [""])[0]
        if not self.leaders or self.leaders[-1][1] != now:
            self.leaders.append((time.monotonic(), now))
        return now

    async def until(self, check: Callable[[], bool], within_s: float = 5.0) -> None:
        deadline = time.monotonic() + within_s
        while True:
            self.sample()
            if check():
                return
            assert time.monotonic() < deadline, f"condition not met; leaders: {self.leaders}"
            await asyncio.sleep(0.003)

    async def for_s(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        await self.until(lambda: time.monotonic() >= end, seconds + 1)


def elector(client: ApiClient, name: str, settings: ElectionSettings = FAST) -> Elector:
    return Elector(client, f"{name}_{name}", settings, logger=logging.getLogger(LOGGER))


def test_of_two_replicas_exactly_one_leads(kube: FakeKube, tmp_path: Path) -> None:
    with client_as(kube, tmp_path, "a") as ca, client_as(kube, tmp_path, "b") as cb:
        a, b = elector(ca, "a"), elector(cb, "b")
        watch = Watch(a=a, b=b)

        async def scenario() -> str:
            async with electing(a), electing(b):
                await watch.until(lambda: watch.sample() != "")
                first = kube.get("leases", LEASE_NAME, NAMESPACE)
                await watch.for_s(1.5)  # three lease durations
                last = kube.get("leases", LEASE_NAME, NAMESPACE)
                assert [name for _, name in watch.leaders] == ["", watch.leaders[1][1]]
                leader = {"a": a, "b": b}[watch.leaders[1][1]]
                assert first["spec"]["holderIdentity"] == leader.identity == holder(kube)
                assert last["spec"]["renewTime"] > first["spec"]["renewTime"]
                assert last["spec"]["leaseTransitions"] == 0
                assert last["spec"]["leaseDurationSeconds"] == 1
                assert MICRO.fullmatch(last["spec"]["renewTime"])
                assert (a.status()["leading"], b.status()["leading"]) == (
                    leader is a,
                    leader is b,
                )
                return watch.leaders[1][1]

        leader = asyncio.run(scenario())
        # The follower only read, but for the create it lost (409) if it raced for it, and
        # on its way out it had nothing to release.
        follower = [w for w in kube.writes("leases") if w.token != leader]
        assert [w.method for w in follower] in ([], ["POST"])
        assert holder(kube) == ""  # the leader released it


def test_when_the_leader_releases_the_other_takes_over_at_its_next_try(
    kube: FakeKube, tmp_path: Path
) -> None:
    with client_as(kube, tmp_path, "a") as ca, client_as(kube, tmp_path, "b") as cb:
        a, b = elector(ca, "a"), elector(cb, "b")
        watch = Watch(a=a, b=b)

        async def handover() -> float:
            ta = asyncio.create_task(a.run())
            tb = asyncio.create_task(b.run())
            try:
                await watch.until(lambda: watch.sample() != "")
                other, task = (b, ta) if a.leading() else (a, tb)
                await watch.for_s(0.3)
                task.cancel()  # a graceful shutdown: the lease is released
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                stopped = time.monotonic()
                released = [w.json for w in kube.writes("leases") if w.method == "PUT"][-1]
                assert released["spec"]["holderIdentity"] == ""
                await watch.until(other.leading)
                return time.monotonic() - stopped
            finally:
                for t in (ta, tb):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t

        took = asyncio.run(handover())
        # Within one retry (0.1 s, times up to 2.2 with the jitter), not a lease duration.
        assert took < 0.5, took
        assert holder(kube) == ""  # and the second one released it too, on its way out
        lease = kube.get("leases", LEASE_NAME, NAMESPACE)
        assert lease["spec"]["leaseTransitions"] == 1


def test_a_leader_that_cannot_renew_stops_before_its_lease_can_expire(
    kube: FakeKube, tmp_path: Path
) -> None:
    with client_as(kube, tmp_path, "a") as ca, client_as(kube, tmp_path, "b") as cb:
        a, b = elector(ca, "a"), elector(cb, "b")
        watch = Watch(a=a, b=b)

        async def scenario() -> None:
            async with electing(a):
                await watch.until(a.leading)
                async with electing(b):
                    await watch.for_s(0.3)  # b follows
                    with kube.refusing("a", "leases"):  # a's renewals fail from now on
                        cut = time.monotonic()
                        await watch.until(b.leading, within_s=3)
                        await watch.for_s(0.3)
                    await watch.for_s(0.5)  # a reaches the server again: and follows
                    assert not a.leading() and b.leading()
                    ended = next(t for t, name in watch.leaders if name == "" and t > cut)
                    began = next(t for t, name in watch.leaders if name == "b")
                    # a stopped within its renew deadline of its last renewal, made before the
                    # cut; b began a lease duration after it saw that renewal, so the two are
                    # the lease duration less the renew deadline apart (give or take our
                    # sampling, and a retry period before the cut).
                    slack = 0.1
                    assert ended - cut <= FAST.renew_deadline_s + slack
                    assert began - ended >= FAST.lease_duration_s - FAST.renew_deadline_s - slack
                    assert began - cut >= FAST.lease_duration_s - FAST.retry_period_s - slack

        asyncio.run(scenario())
        assert [name for _, name in watch.leaders] == ["", "a", "", "b"]


def test_a_conflicting_write_is_a_loss_not_a_crash(kube: FakeKube, tmp_path: Path) -> None:
    now = micro_time(dt.datetime.now(dt.UTC))
    intruder: k.Obj = {
        "metadata": {"name": LEASE_NAME, "namespace": NAMESPACE},
        "spec": {"holderIdentity": "intruder", "leaseDurationSeconds": 1, "renewTime": now},
    }
    with client_as(kube, tmp_path, "a") as ca:
        a = elector(ca, "a")
        watch = Watch(a=a)

        async def scenario(task: asyncio.Task[None]) -> None:
            # Between a's read (none there) and its create, another creates it: 409.
            await watch.until(lambda: holder(kube) == "intruder")
            await watch.for_s(0.5)
            assert not a.leading()  # a follows; the intruder does not renew, so
            await watch.until(a.leading, within_s=3)  # a takes over when it expires
            # Now a leads; another writes the lease between a's renewals: a's PUT is a 409.
            kube.before(
                "PUT",
                "leases",
                lambda: kube.update(
                    "leases",
                    {
                        **kube.get("leases", LEASE_NAME, NAMESPACE),
                        "spec": {
                            **intruder["spec"],
                            "renewTime": micro_time(dt.datetime.now(dt.UTC)),
                        },
                    },
                ),
            )
            await watch.until(lambda: not a.leading(), within_s=2)
            assert holder(kube) == "intruder"
            await watch.until(a.leading, within_s=3)
            assert not task.done()  # never crashed

        async def body() -> None:
            kube.before("POST", "leases", lambda: kube.add("leases", intruder))
            async with electing(a) as task:
                await scenario(task)

        asyncio.run(body())
        conflicts = [w for w in kube.writes("leases") if w.token == "a"]
        assert [w.method for w in conflicts][:2] == ["POST", "PUT"]
        assert [name for _, name in watch.leaders] == ["", "a", "", "a"]


def test_the_official_clients_lease_model_is_refused_as_the_api_server_refuses_it(
    kube: FakeKube, tmp_path: Path
) -> None:
    """Why leader.py writes raw JSON: the client's models write a whole-second datetime
    without the six digits a MicroTime needs, and the API server answers 400."""
    with client_as(kube, tmp_path, "a") as client:
        body = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(name="x"),
            spec=kubernetes.client.V1LeaseSpec(holder_identity="a", renew_time=WALL),
        )
        api = kubernetes.client.CoordinationV1Api(client)
        with pytest.raises(ApiException) as refused:
            api.create_namespaced_lease(NAMESPACE, body)
        assert refused.value.status == 400
        assert "2006-01-02T15:04:05.000000Z07:00" in str(refused.value.body)


# -- the deployer writes only while its replica leads ---------------------------------------


class Gate:
    """An election whose outcome the test decides."""

    def __init__(self) -> None:
        self.leads = True
        self.listeners: list[Callable[[bool], None]] = []

    def leading(self) -> bool:
        return self.leads

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        if not self.leads:
            raise NotLeading("the test says so")
        yield

    def listen(self, callback: Callable[[bool], None]) -> None:
        self.listeners.append(callback)

    def set(self, leads: bool) -> None:
        self.leads = leads
        for callback in self.listeners:
            callback(leads)


def test_a_deployer_pass_that_outlives_the_leadership_stops_writing(
    kube: FakeKube, tmp_path: Path
) -> None:
    shop(kube)
    kube.add("gateways", waypoint())
    gate = Gate()
    # The lease is lost as the ServiceAccount is being written: nothing after it is.
    kube.before("POST", "serviceaccounts", lambda: gate.set(False))

    async def scenario(client: ApiClient) -> None:
        logger = logging.getLogger(LOGGER)
        deployer = WaypointDeployer(client, SETTINGS, leader=gate, logger=logger)
        source = KubernetesSource(
            client, on_change=lambda s: deployer.offer(s, build(s)), logger=logger
        )
        tasks = [asyncio.create_task(source.run()), asyncio.create_task(deployer.run())]
        try:
            await eventually(lambda: kube.find("serviceaccounts", "waypoint", "shop"))
            await asyncio.sleep(0.5)
            assert kube.find("deployments", "waypoint", "shop") is None
            assert kube.find("services", "waypoint", "shop") is None
            assert not (kube.get("gateways", "waypoint", "shop").get("status") or {})
            passes = deployer.passes
            kube.add("pods", k.pod("reviews-v1-8x8x8", "shop", ip="10.244.1.6"))  # a change
            await asyncio.sleep(0.3)
            assert deployer.passes == passes  # no pass at all while another leads
            gate.set(True)  # a new term: it finishes the job
            await eventually(lambda: kube.find("deployments", "waypoint", "shop"))
            await eventually(
                lambda: (kube.get("gateways", "waypoint", "shop").get("status") or {}).get(
                    "addresses"
                )
            )
            assert not any(t.done() for t in tasks)
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    with client_as(kube, tmp_path, "a") as client:
        asyncio.run(scenario(client))


# -- meshd, two replicas -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def meshd(
    kubeconfig: Path, pod: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``meshd --source kubernetes`` as pod ``pod``, with a quick retry; its process and
    status port."""
    port, tls_port, status = free_port(), free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane.meshd",
        "--source=kubernetes",
        f"--kubeconfig={kubeconfig}",
        f"--listen=127.0.0.1:{port}",
        f"--tls-listen=127.0.0.1:{tls_port}",
        f"--status-listen=127.0.0.1:{status}",
        f"--pod-name={pod}",
        # A handover on shutdown takes a retry period (with its jitter); a lease long
        # enough that a loaded machine does not make a leader lose it in between.
        "--leader-elect-lease-duration=10s",
        "--leader-elect-renew-deadline=5s",
        "--leader-elect-retry-period=200ms",
    )
    try:
        yield process, status
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


def debug_status(port: int) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/debug/status")
        return dict(json.loads(connection.getresponse().read()))
    finally:
        connection.close()


async def status_of(port: int, within_s: float = 30) -> dict[str, Any]:
    """The replica's status document, once it serves it."""
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(OSError):
            return await asyncio.to_thread(debug_status, port)
        assert time.monotonic() < deadline, f"no status on port {port}"
        await asyncio.sleep(0.05)


def writes_by(kube: FakeKube, since: int = 0) -> set[str]:
    """The tokens of the clients that wrote anything but the lease and the CA Secret (which
    every replica reads, and creates when there is none) after the ``since``-th write."""
    return {
        w.token
        for w in kube.writes()[since:]
        if "/leases" not in w.path and "/secrets" not in w.path
    }


def test_of_two_meshd_replicas_only_the_leader_deploys_and_writes_status(
    kube: FakeKube, tmp_path: Path
) -> None:
    from tests.unit.hbone.conftest import run

    shop(kube)
    kube.add("gateways", waypoint())
    configs = {
        pod: kube.write_kubeconfig(tmp_path / pod, token=pod) for pod in ("meshd-a", "meshd-b")
    }

    async def body() -> None:
        async with (
            meshd(configs["meshd-a"], "meshd-a") as (pa, sa),
            meshd(configs["meshd-b"], "meshd-b") as (pb, sb),
        ):
            await eventually(
                lambda: (kube.get("gateways", "waypoint", "shop").get("status") or {}).get(
                    "addresses"
                ),
                30,
            )
            assert kube.find("deployments", "waypoint", "shop") is not None
            assert kube.find("configmaps", "istio-ca-root-cert", "shop") is not None
            leader = holder(kube).partition("_")[0]
            other = "meshd-b" if leader == "meshd-a" else "meshd-a"
            assert writes_by(kube) == {leader}
            # Both serve, both say who they are; one leads.
            statuses = {"meshd-a": await status_of(sa), "meshd-b": await status_of(sb)}
            for pod, status in statuses.items():
                assert status["leader"]["identity"].startswith(pod + "_")
                assert status["leader"]["leading"] is (pod == leader)

            # The leader goes (SIGTERM, as Kubernetes stops a pod): the other takes over.
            process = pa if leader == "meshd-a" else pb
            mark = len(kube.writes())
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            await eventually(lambda: holder(kube).startswith(other + "_"), 5)
            kube.delete("deployments", kube.get("deployments", "waypoint", "shop"))
            await eventually(lambda: kube.find("deployments", "waypoint", "shop"), 10)
            assert writes_by(kube, mark) == {other}

    run(body, timeout_s=60)
