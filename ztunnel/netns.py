"""Sockets inside a pod's network namespace, from the descriptor ZDS handed over.

A socket belongs to the namespace it was created in, for its whole life. So
the proxy enters the pod's namespace (``setns``) on a worker thread, makes
the sockets, and comes back; the event loop's thread never changes
namespace. This is how ztunnel listens on 15001/15006/15008/15053 inside
every enrolled pod from one process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

CLONE_NEWNET = 0x40000000
INPOD_MARK = 0x539
# ztunnel's connections to the app it delivers to (from the client's address): the
# in-pod mark and a bit above the 0xfff the iptables rules match, so the eBPF
# backend's routing rule can send the app's answers back to ztunnel (the accepted
# socket takes the SYN's mark with net.ipv4.tcp_fwmark_accept).
INPOD_DELIVER_MARK = INPOD_MARK | 0x100000
INPOD_DELIVER_MASK = 0xFFF | 0x100000

T = TypeVar("T")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def enter(fd: int) -> None:
    """Move the calling thread into ``fd``'s network namespace."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


_home = threading.local()


def in_netns_now(netns_fd: int, make: Callable[[], T]) -> T:
    """:func:`in_netns` for the event loop's own thread, for work of a few syscalls
    (making a socket): two ``setns`` calls cost far less than a hop to a worker
    thread and back. The thread's own namespace is opened once and kept."""
    home = getattr(_home, "fd", None)
    if home is None:
        home = _home.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    enter(netns_fd)
    try:
        return make()
    finally:
        enter(home)  # if this fails the thread is unusable: let it raise


def in_netns(netns_fd: int, make: Callable[[], T]) -> T:
    """Call ``make`` with this thread inside ``netns_fd``'s namespace, then come back.

    Blocking (it runs on the calling thread): call it through
    ``asyncio.to_thread``, never on the event loop's thread.
    """
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(netns_fd)
        try:
            return make()
        finally:
            enter(home)  # if this fails the thread is unusable: let it raise
    finally:
        os.close(home)


@dataclass(frozen=True, slots=True)
class ListenSpec:
    port: int
    kind: int = socket.SOCK_STREAM  # or SOCK_DGRAM (DNS)
    transparent: bool = False  # IP_TRANSPARENT: bind to addresses that are not local
    host: str = "0.0.0.0"  # DNS: 127.0.0.1, where the pod's own redirected queries land


def listen_sockets(specs: Sequence[ListenSpec], backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets for ``specs`` in the *current* namespace (call inside
    :func:`in_netns`). Each has SO_REUSEPORT (more workers, and a restarted
    ztunnel, can listen beside) and ztunnel's mark."""
    made: list[socket.socket] = []
    try:
        for spec in specs:
            s = socket.socket(socket.AF_INET, spec.kind | socket.SOCK_CLOEXEC)
            made.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, INPOD_MARK)
            if spec.transparent:
                s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
            s.bind((spec.host, spec.port))
            if spec.kind == socket.SOCK_STREAM:
                s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in made:
            s.close()
        raise
    return made
