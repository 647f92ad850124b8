"""The node agent's side of ZDS: it keeps the enrolled pods and hands them to the proxy.

:meth:`ZdsAgent.add` returns only when the proxy has acked the pod (the CNI
plugin waits on it, so the pod's app starts after enrollment), and raises
:class:`ZdsError` with the reason when there is no proxy or the proxy
refused. A proxy that (re)connects is sent every enrolled pod, then
``SnapshotSent``; the newest proxy connection is the one used, an older one
is closed once the newer has its snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ztunnel.zds import protocol
from ztunnel.zds.channel import Channel
from ztunnel.zds.protocol import PodInfo, ZdsError

log = logging.getLogger("ztunnel.zds")


@dataclass(frozen=True, slots=True)
class Enrolled:
    pod: PodInfo
    netns: Path  # e.g. /proc/<pid>/ns/net or /run/netns/<name>


class _Proxy:
    """One connected proxy: requests go out one at a time, each waits for its ack."""

    def __init__(self, channel: Channel, ack_timeout_s: float) -> None:
        self.channel = channel
        self.ack_timeout_s = ack_timeout_s
        self.lock = asyncio.Lock()
        self.acks: asyncio.Queue[str] = asyncio.Queue()
        self.gone = asyncio.Event()

    async def read(self) -> None:
        try:
            while True:
                data, fds = await self.channel.recv()
                for fd in fds:
                    os.close(fd)
                try:
                    await self.acks.put(protocol.decode_ack(data))
                except ZdsError as e:
                    log.warning("zds: ignoring a packet from the proxy: %s", e)
        except (EOFError, ZdsError, OSError):
            pass
        finally:
            self.gone.set()

    async def request(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        async with self.lock:
            if self.gone.is_set():
                raise ZdsError("the proxy disconnected")
            await self.channel.send(data, fds)
            ack = asyncio.ensure_future(self.acks.get())
            gone = asyncio.ensure_future(self.gone.wait())
            try:
                done, _ = await asyncio.wait(
                    {ack, gone}, timeout=self.ack_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                gone.cancel()
            if ack not in done:
                ack.cancel()
                if gone in done:
                    raise ZdsError("the proxy disconnected before acking")
                # Acks carry no id: a late one would be taken for the next request's.
                # Drop the connection (the serving task closes it on ``gone``); the
                # proxy reconnects and gets a fresh snapshot.
                self.gone.set()
                raise ZdsError(f"the proxy did not ack within {self.ack_timeout_s:g} s")
            error = ack.result()
            if error:
                raise ZdsError(f"the proxy refused: {error}")


class ZdsAgent:
    def __init__(self, path: Path, *, ack_timeout_s: float = 15.0) -> None:
        self.path = path
        self.ack_timeout_s = ack_timeout_s
        self.pods: dict[str, Enrolled] = {}
        self.refused: dict[str, str] = {}  # pods the proxy refused in a snapshot: uid -> why
        self._proxy: _Proxy | None = None
        self._server: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # One change at a time: a pod added during a snapshot goes to the new proxy.
        self._lock = asyncio.Lock()
        self.proxy_ready = asyncio.Event()  # a proxy holds the current snapshot

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on :attr:`path` (mode 0600: only root may hand pods around)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        server.bind(str(self.path))
        self.path.chmod(0o600)
        server.listen(8)
        server.setblocking(False)
        self._server = server
        asyncio.get_running_loop().add_reader(server.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._server is not None
        try:
            sock, _ = self._server.accept()
        except (BlockingIOError, InterruptedError):
            return
        task = asyncio.ensure_future(self._serve(Channel(sock)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            asyncio.get_running_loop().remove_reader(self._server.fileno())
            self._server.close()
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    # -- a proxy connection -----------------------------------------------------------------

    async def _serve(self, channel: Channel) -> None:
        proxy = _Proxy(channel, self.ack_timeout_s)
        reader: asyncio.Task[None] | None = None
        try:
            try:
                data, fds = await asyncio.wait_for(channel.recv(), self.ack_timeout_s)
                for fd in fds:
                    os.close(fd)
                protocol.check_hello(data)
            except (ZdsError, EOFError, TimeoutError) as e:
                log.warning("zds: refusing a proxy connection: %s", e or "no hello in time")
                return
            reader = asyncio.ensure_future(proxy.read())
            async with self._lock:
                try:
                    await self._send_snapshot(proxy)
                except ZdsError as e:
                    log.warning("zds: the proxy did not take the snapshot: %s", e)
                    return
                previous, self._proxy = self._proxy, proxy
                self.proxy_ready.set()
            log.info("zds: proxy connected, %d pods handed over", len(self.pods))
            if previous is not None:
                previous.channel.close()
            await proxy.gone.wait()
            log.warning("zds: the proxy disconnected")
        finally:
            if self._proxy is proxy:
                self._proxy = None
                self.proxy_ready.clear()
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            channel.close()

    async def _send_snapshot(self, proxy: _Proxy) -> None:
        for uid, enrolled in list(self.pods.items()):
            try:
                fd = os.open(enrolled.netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                # The pod is going away, or its namespace is out of reach for now:
                # the proxy keeps what it has for it rather than tearing it down.
                log.info("zds: keeping %s (its netns %s: %s)", uid, enrolled.netns, e.strerror)
                await proxy.request(protocol.encode_keep(uid))
                continue
            try:
                await proxy.request(protocol.encode_add(uid, enrolled.pod), (fd,))
            except ZdsError as e:
                if proxy.gone.is_set():
                    raise
                # One pod the proxy cannot take (no certificate yet, say) must not keep
                # the others from it: note it for the caller to retry, and go on.
                log.warning("zds: the proxy did not take %s: %s", uid, e)
                self.refused[uid] = str(e)
                continue
            finally:
                os.close(fd)
            self.refused.pop(uid, None)
        await proxy.request(protocol.encode_snapshot_sent())

    # -- what the CNI plugin and the label watcher call --------------------------------------

    async def add(self, uid: str, pod: PodInfo, netns: Path) -> None:
        """Enroll ``uid``: returns once the proxy has it, raises :class:`ZdsError` if not."""
        async with self._lock:
            self.pods[uid] = Enrolled(pod, netns)
            proxy = self._proxy
            if proxy is None:
                raise ZdsError("no ztunnel is connected to take the pod")
            try:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ZdsError(f"cannot open the pod's netns {netns}: {e.strerror}") from e
            try:
                await proxy.request(protocol.encode_add(uid, pod), (fd,))
            finally:
                os.close(fd)
            self.refused.pop(uid, None)

    async def delete(self, uid: str) -> None:
        """Un-enroll ``uid``; the proxy is told if one is connected."""
        async with self._lock:
            self.refused.pop(uid, None)
            if self.pods.pop(uid, None) is None:
                return
            proxy = self._proxy
            if proxy is not None:
                await proxy.request(protocol.encode_delete(uid))
