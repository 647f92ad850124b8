"""The ZDS exchange over a real SOCK_SEQPACKET socket, with real netns descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.unit.hbone.conftest import run
from ztunnel.zds import protocol
from ztunnel.zds.agent import Enrolled, ZdsAgent
from ztunnel.zds.channel import Channel
from ztunnel.zds.protocol import Add, Delete, Keep, PodInfo, ZdsError
from ztunnel.zds.proxy import Event, Snapshot, ZdsProxy

NETNS = Path("/proc/self/ns/net")  # a real network namespace anyone may open
WEB = PodInfo("web-1", "shop", "web")
NETNS_INODE = NETNS.stat().st_ino


def netns_inode(fd: int) -> int:
    return os.fstat(fd).st_ino


class Recorder:
    """A proxy handler that records what it was told and can be made to refuse."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.inodes: dict[str, int] = {}
        self.refuse: str | None = None
        self.changed = asyncio.Event()

    async def __call__(self, event: Event) -> None:
        if self.refuse:
            raise RuntimeError(self.refuse)
        if isinstance(event, Add):
            self.inodes[event.uid] = netns_inode(event.netns_fd)
        self.events.append(event)
        self.changed.set()

    def snapshot_done(self) -> bool:
        return bool(self.events) and isinstance(self.events[-1], Snapshot)

    async def until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(5):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def agent_and_proxy(
    tmp: Path, recorder: Recorder
) -> AsyncIterator[tuple[ZdsAgent, ZdsProxy]]:
    agent = ZdsAgent(tmp / "zds" / "ztunnel.sock", ack_timeout_s=2)
    agent.start()
    proxy = ZdsProxy(str(agent.path), recorder, backoff_initial_s=0.02)
    task = asyncio.ensure_future(proxy.run())
    try:
        async with asyncio.timeout(5):
            await agent.proxy_ready.wait()
        yield agent, proxy
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.close()


def test_an_added_pod_reaches_the_proxy_with_its_netns_and_add_waits_for_the_ack(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        recorder = Recorder()
        async with agent_and_proxy(tmp_path, recorder) as (agent, _):
            assert recorder.events == [Snapshot(frozenset())]
            await agent.add("uid-web", WEB, NETNS)
            # add() returned: the proxy already has it, with the right namespace.
            add = recorder.events[-1]
            assert isinstance(add, Add) and add.pod == WEB
            assert recorder.inodes["uid-web"] == NETNS_INODE
            await agent.delete("uid-web")
            assert recorder.events[-1] == Delete("uid-web")
            assert agent.path.stat().st_mode & 0o777 == 0o600

    run(body, timeout_s=20)


def test_a_reconnecting_proxy_gets_the_snapshot_and_unreachable_pods_are_kept(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        agent = ZdsAgent(tmp_path / "ztunnel.sock", ack_timeout_s=2)
        agent.start()
        # Enrolled while no proxy was connected (each add() failed, the pods stay).
        agent.pods["uid-web"] = Enrolled(WEB, NETNS)
        agent.pods["uid-db"] = Enrolled(PodInfo("db-0", "shop", "db"), tmp_path / "gone")
        try:
            for _ in range(2):  # a proxy, then a restarted one
                recorder = Recorder()
                proxy = ZdsProxy(str(agent.path), recorder, backoff_initial_s=0.02)
                task = asyncio.ensure_future(proxy.run())
                try:
                    await recorder.until(recorder.snapshot_done)
                    kinds = [type(e).__name__ for e in recorder.events]
                    assert kinds == ["Add", "Keep", "Snapshot"]
                    assert recorder.events[1] == Keep("uid-db")
                    assert recorder.events[2] == Snapshot(frozenset({"uid-web", "uid-db"}))
                finally:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                await asyncio.sleep(0.05)
        finally:
            await agent.close()

    run(body, timeout_s=20)


def test_a_refusal_comes_back_to_the_agent_with_its_reason(tmp_path: Path) -> None:
    async def body() -> None:
        recorder = Recorder()
        async with agent_and_proxy(tmp_path, recorder) as (agent, proxy):
            recorder.refuse = "no certificate for shop/web"
            with pytest.raises(ZdsError, match="no certificate for shop/web"):
                await agent.add("uid-web", WEB, NETNS)
            recorder.refuse = None
            await agent.add("uid-web", WEB, NETNS)  # the exchange went on
            assert proxy.refused == 1

    run(body, timeout_s=20)


class RefuseOne(Recorder):
    """Refuses the Add of one uid only."""

    def __init__(self, uid: str) -> None:
        super().__init__()
        self.uid = uid

    async def __call__(self, event: Event) -> None:
        if isinstance(event, Add) and event.uid == self.uid:
            raise RuntimeError(f"no certificate for {event.pod.namespace}/{event.pod.name}")
        await super().__call__(event)


def test_a_pod_refused_in_the_snapshot_does_not_keep_the_others_from_the_proxy(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        agent = ZdsAgent(tmp_path / "ztunnel.sock", ack_timeout_s=2)
        agent.start()
        agent.pods["uid-bad"] = Enrolled(PodInfo("bad-0", "shop", "bad"), NETNS)
        agent.pods["uid-web"] = Enrolled(WEB, NETNS)
        recorder = RefuseOne("uid-bad")
        proxy = ZdsProxy(str(agent.path), recorder, backoff_initial_s=0.02)
        task = asyncio.ensure_future(proxy.run())
        try:
            await recorder.until(recorder.snapshot_done)
            assert [type(e).__name__ for e in recorder.events] == ["Add", "Snapshot"]
            assert isinstance(recorder.events[0], Add) and recorder.events[0].uid == "uid-web"
            async with asyncio.timeout(5):
                await agent.proxy_ready.wait()  # the proxy holds the snapshot, less one pod
            # The refusal is kept, with its reason, for the node agent to retry.
            assert set(agent.refused) == {"uid-bad"}
            assert "no certificate for shop/bad-0" in agent.refused["uid-bad"]
            recorder.uid = ""
            await agent.add("uid-bad", PodInfo("bad-0", "shop", "bad"), NETNS)
            assert agent.refused == {}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await agent.close()

    run(body, timeout_s=20)


def test_without_a_proxy_adding_fails_with_the_reason(tmp_path: Path) -> None:
    async def body() -> None:
        agent = ZdsAgent(tmp_path / "ztunnel.sock")
        agent.start()
        try:
            with pytest.raises(ZdsError, match="no ztunnel is connected"):
                await agent.add("uid-web", WEB, NETNS)
        finally:
            await agent.close()

    run(body, timeout_s=10)


def test_a_client_that_does_not_say_hello_is_refused_and_others_go_on(tmp_path: Path) -> None:
    async def body() -> None:
        recorder = Recorder()
        async with agent_and_proxy(tmp_path, recorder) as (agent, _):
            rogue = await Channel.connect(str(agent.path))
            try:
                await rogue.send(b"\xff\xff garbage")
                with pytest.raises(EOFError):
                    async with asyncio.timeout(5):
                        await rogue.recv()  # the agent hangs up on it
            finally:
                rogue.close()
            await agent.add("uid-web", WEB, NETNS)
            assert isinstance(recorder.events[-1], Add)

    run(body, timeout_s=20)


def test_malformed_requests_are_refused_and_stray_descriptors_closed() -> None:
    with pytest.raises(ZdsError, match="not a WorkloadRequest"):
        protocol.decode_request(b"\xff\xff\xff", [])
    with pytest.raises(ZdsError, match="came with 0 descriptors"):
        protocol.decode_request(protocol.encode_add("u", WEB), [])
    stray = os.open(NETNS, os.O_RDONLY)
    with pytest.raises(ZdsError, match="came with descriptors"):
        protocol.decode_request(protocol.encode_delete("u"), [stray])
    with pytest.raises(OSError):
        os.fstat(stray)  # closed, not leaked
    with pytest.raises(ZdsError, match="without a uid"):
        protocol.decode_request(protocol.encode_keep(""), [])


def test_the_proxy_acks_garbage_with_an_error_and_keeps_serving(tmp_path: Path) -> None:
    """Talk to the proxy as a misbehaving agent would, over a raw socket."""

    async def body() -> None:
        path = tmp_path / "raw.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server.bind(str(path))
        server.listen(1)
        server.setblocking(False)
        recorder = Recorder()
        proxy = ZdsProxy(str(path), recorder, backoff_initial_s=0.02)
        task = asyncio.ensure_future(proxy.run())
        loop = asyncio.get_running_loop()
        try:
            sock, _ = await loop.sock_accept(server)
            channel = Channel(sock)
            hello, _ = await channel.recv()
            protocol.check_hello(hello)
            await channel.send(b"\x0a\x03bad")
            ack, _ = await channel.recv()
            assert "not a WorkloadRequest" in protocol.decode_ack(ack)
            await channel.send(protocol.encode_snapshot_sent())
            ack, _ = await channel.recv()
            assert protocol.decode_ack(ack) == ""
            assert recorder.events == [Snapshot(frozenset())]
            channel.close()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            server.close()

    run(body, timeout_s=20)
