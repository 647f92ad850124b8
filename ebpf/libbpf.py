"""The calls of libbpf (``libbpf.so.1``, Debian's ``libbpf1``) the capture backend
makes, through ctypes: open and load an object file, pin, attach to a cgroup,
query, and the map operations.

Every call that fails raises :class:`BpfError` naming the call, its object and
the kernel's reason; nothing here retries or guesses.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path

# enum bpf_attach_type (linux/bpf.h)
CGROUP_SOCK_OPS = 3
CGROUP_INET4_CONNECT = 10
CGROUP_UDP4_SENDMSG = 14
CGROUP_UDP4_RECVMSG = 19
F_ALLOW_MULTI = 2  # BPF_F_ALLOW_MULTI
ANY = 0  # BPF_ANY


class BpfError(OSError):
    """A libbpf call failed; the message says which, on what, and why."""


class _OpenOpts(ctypes.Structure):
    # struct bpf_object_open_opts of libbpf 1.x, up to pin_root_path (``sz`` says how
    # much of it we pass: libbpf takes a prefix of its options).
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
    ]


_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """libbpf, loaded once; :class:`BpfError` when the node does not have it."""
    global _lib
    with _lock:
        if _lib is None:
            name = ctypes.util.find_library("bpf") or "libbpf.so.1"
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as e:
                raise BpfError(f"libbpf ({name}) cannot be loaded: {e} (Debian: libbpf1)") from e
            vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
            sigs: dict[str, tuple[type | None, list[type]]] = {
                "bpf_object__open_file": (vp, [cp, ctypes.POINTER(_OpenOpts)]),
                "bpf_object__load": (i, [vp]),
                "bpf_object__close": (None, [vp]),
                "bpf_object__find_program_by_name": (vp, [vp, cp]),
                "bpf_program__fd": (i, [vp]),
                "bpf_obj_pin": (i, [i, cp]),
                "bpf_obj_get": (i, [cp]),
                "bpf_prog_attach": (i, [i, i, ctypes.c_int, ctypes.c_uint]),
                "bpf_prog_detach2": (i, [i, i, ctypes.c_int]),
                "bpf_prog_query": (
                    i,
                    [
                        i,
                        ctypes.c_int,
                        u32,
                        ctypes.POINTER(u32),
                        ctypes.POINTER(u32),
                        ctypes.POINTER(u32),
                    ],
                ),
                "bpf_obj_get_info_by_fd": (i, [i, vp, ctypes.POINTER(u32)]),
                "bpf_prog_get_fd_by_id": (i, [u32]),
                "bpf_map_lookup_elem": (i, [i, vp, vp]),
                "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
                "bpf_map_delete_elem": (i, [i, vp]),
                "bpf_map_get_next_key": (i, [i, vp, vp]),
            }
            for fn, (res, args) in sigs.items():
                f = getattr(lib, fn)
                f.restype, f.argtypes = res, args
            _lib = lib
        return _lib


def _err(call: str, what: object, rc: int | None = None) -> BpfError:
    code = ctypes.get_errno() or (-rc if rc is not None and rc < 0 else 0)
    return BpfError(code, f"{call}({what}): {os.strerror(code) if code else 'failed'}")


def _check(rc: int, call: str, what: object) -> int:
    if rc < 0:
        raise _err(call, what, rc)
    return rc


class BpfObject:
    """An object file opened and loaded; its maps pinned by name under ``pin_root``
    (an existing pin of the same map is reused, so state outlives the loader)."""

    def __init__(self, path: Path, pin_root: Path) -> None:
        lib = library()
        self._root = str(pin_root).encode()
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), pin_root_path=self._root)
        ctypes.set_errno(0)
        obj = lib.bpf_object__open_file(str(path).encode(), ctypes.byref(opts))
        if not obj:
            raise _err("bpf_object__open_file", path)
        self._obj: int | None = obj
        ctypes.set_errno(0)
        rc = lib.bpf_object__load(obj)
        if rc < 0:
            self.close()
            raise _err("bpf_object__load", f"{path}; the verifier's log is on stderr", rc)

    def program_fd(self, name: str) -> int:
        prog = library().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise BpfError(f"no program {name!r} in the object")
        return _check(library().bpf_program__fd(prog), "bpf_program__fd", name)

    def close(self) -> None:
        if self._obj:
            library().bpf_object__close(self._obj)
            self._obj = None


def pin(fd: int, path: Path) -> None:
    ctypes.set_errno(0)
    _check(library().bpf_obj_pin(fd, str(path).encode()), "bpf_obj_pin", path)


def get_pinned(path: Path) -> int:
    """A new descriptor of the object pinned at ``path``."""
    ctypes.set_errno(0)
    return _check(library().bpf_obj_get(str(path).encode()), "bpf_obj_get", path)


def attach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    ctypes.set_errno(0)
    rc = library().bpf_prog_attach(prog_fd, target_fd, attach_type, F_ALLOW_MULTI)
    _check(rc, "bpf_prog_attach", what)


def detach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    ctypes.set_errno(0)
    _check(library().bpf_prog_detach2(prog_fd, target_fd, attach_type), "bpf_prog_detach2", what)


def attached(target_fd: int, attach_type: int, what: str) -> list[int]:
    """The ids of the programs attached to ``target_fd`` for ``attach_type``."""
    lib = library()
    flags, count = ctypes.c_uint32(0), ctypes.c_uint32(64)
    ids = (ctypes.c_uint32 * 64)()
    ctypes.set_errno(0)
    rc = lib.bpf_prog_query(
        target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)
    )
    _check(rc, "bpf_prog_query", what)
    return list(ids[: count.value])


def _prog_info(fd: int) -> bytes:
    # struct bpf_prog_info, up to its name: type, id, tag[8], ..., name[16] at 64.
    info = ctypes.create_string_buffer(80)
    size = ctypes.c_uint32(80)
    ctypes.set_errno(0)
    _check(library().bpf_obj_get_info_by_fd(fd, info, ctypes.byref(size)), "bpf_obj_get_info", fd)
    return info.raw


def prog_id(fd: int) -> int:
    """The kernel's id of the program behind ``fd``."""
    return int.from_bytes(_prog_info(fd)[4:8], "little")


def prog_name(fd: int) -> str:
    """The program's name (as loaded, at most 15 characters)."""
    return _prog_info(fd)[64:80].split(b"\0", 1)[0].decode(errors="replace")


def prog_by_id(prog: int) -> int:
    """A new descriptor of the program with kernel id ``prog``."""
    ctypes.set_errno(0)
    return _check(library().bpf_prog_get_fd_by_id(prog), "bpf_prog_get_fd_by_id", prog)


class Map:
    """A map by descriptor, with fixed-size keys and values as bytes."""

    def __init__(self, fd: int, key_size: int, value_size: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.key_size, self.value_size = key_size, value_size
        self._lib = library()
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)

    @classmethod
    def pinned(cls, path: Path, key_size: int, value_size: int) -> Map:
        return cls(get_pinned(path), key_size, value_size, str(path))

    def get(self, key: bytes) -> bytes | None:
        """The value under ``key``, or None. Not thread-safe (one buffer per map)."""
        ctypes.memmove(self._key, key, self.key_size)
        if self._lib.bpf_map_lookup_elem(self.fd, self._key, self._value) < 0:
            return None
        return self._value.raw

    def take(self, key: bytes) -> bytes | None:
        """The value under ``key``, removed from the map; None when there was none. One
        lookup and one delete, on the map's own buffers (a connection's hot path)."""
        ctypes.memmove(self._key, key, self.key_size)
        if self._lib.bpf_map_lookup_elem(self.fd, self._key, self._value) < 0:
            return None
        self._lib.bpf_map_delete_elem(self.fd, self._key)
        return self._value.raw

    def put(self, key: bytes, value: bytes) -> None:
        k = ctypes.create_string_buffer(key, self.key_size)
        v = ctypes.create_string_buffer(value, self.value_size)
        ctypes.set_errno(0)
        _check(self._lib.bpf_map_update_elem(self.fd, k, v, ANY), "bpf_map_update_elem", self.name)

    def delete(self, key: bytes) -> bool:
        """Remove ``key``; False when it was not there."""
        k = ctypes.create_string_buffer(key, self.key_size)
        ctypes.set_errno(0)
        rc = self._lib.bpf_map_delete_elem(self.fd, k)
        if rc < 0:
            if ctypes.get_errno() == 2:  # ENOENT
                return False
            raise _err("bpf_map_delete_elem", self.name, rc)
        return True

    def keys(self) -> list[bytes]:
        found: list[bytes] = []
        prev: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while self._lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            found.append(nxt.raw)
            prev = ctypes.create_string_buffer(nxt.raw, self.key_size)
        return found

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
