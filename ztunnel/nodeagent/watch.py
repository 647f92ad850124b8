"""Telling the node agent at once when the node's CNI directories change (inotify).

istio-cni watches its conf and bin dirs with fsnotify and repairs its entry
as soon as the primary CNI rewrites the conflist; polling alone leaves a
window of a whole pass in which a pod's ADD can run without ``ztunnel-cni``.
:class:`DirWatch` is Linux's inotify through libc (the standard library has
no binding, and the calls are three): a non-blocking descriptor the event
loop reads, watching each directory for files created, written, moved,
removed or changed in mode. The events themselves are not parsed: any of
them means "check again", and the check is cheap.

A directory that does not exist yet cannot be watched; :meth:`DirWatch.add`
says so and the agent keeps polling (and tries again on later passes).

Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
MASK = (
    IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    return _libc


class DirWatch:
    """An inotify descriptor watching directories; readable when one of them changed."""

    def __init__(self) -> None:
        fd = _lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd
        self.watched: dict[Path, int] = {}

    def add(self, directory: Path) -> str | None:
        """Watch ``directory``; None when watched, otherwise why it cannot be."""
        if directory in self.watched:
            return None
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(directory), MASK)
        if wd < 0:
            err = ctypes.get_errno()
            return f"cannot watch {directory}: {os.strerror(err)}"
        self.watched[directory] = wd
        return None

    def drain(self) -> bool:
        """Read every pending event; True if there was any. A watched directory that
        was removed or moved is forgotten (add it again once it is back)."""
        seen = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen = True
            for wd, mask in _events(data):
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                    self.watched = {d: w for d, w in self.watched.items() if w != wd}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.watched.clear()


def _events(data: bytes) -> list[tuple[int, int]]:
    """(wd, mask) of each ``struct inotify_event`` (wd, mask, cookie, len, name[len])."""
    events, i = [], 0
    while i + 16 <= len(data):
        wd = int.from_bytes(data[i : i + 4], sys.byteorder, signed=True)
        mask = int.from_bytes(data[i + 4 : i + 8], sys.byteorder)
        events.append((wd, mask))
        i += 16 + int.from_bytes(data[i + 12 : i + 16], sys.byteorder)
    return events
