"""Processes in namespaces: run, spawn detached, find and stop.

Every process meshlab starts carries ``MESHLAB_CLUSTER=<name>`` in its
environment. ``down`` stops every process that either carries the marker or
lives in one of the cluster's network namespaces, so nothing survives a crash
of ``meshlab`` itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from meshlab.errors import HostToolMissingError, MeshlabError
from meshlab.names import PROCESS_MARKER_ENV

NETNS_DIR = Path("/run/netns")


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HostToolMissingError(
            f"{name!r} is not installed (Debian package {package}; `make deps` installs it)"
        )
    return path


def run_in(netns: str, argv: Sequence[str], *, timeout_s: float = 30.0) -> str:
    """Run a short command inside ``netns`` and return its output; raise on failure."""
    ip = require_tool("ip", "iproute2")
    try:
        done = subprocess.run(
            [ip, "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise MeshlabError(f"{' '.join(argv)} in {netns!r} timed out after {timeout_s}s") from e
    if done.returncode != 0:
        raise MeshlabError(
            f"{' '.join(argv)} in {netns!r} failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def sysctl(netns: str, key: str, value: str) -> None:
    # /proc/sys/net is per network namespace: the write lands in the namespace
    # of the process that opens the file, hence the exec into it.
    run_in(netns, ["sysctl", "-q", "-w", f"{key}={value}"])


def spawn(
    netns: str | None,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cgroup: Path | None = None,
    host_mounts: bool = False,
) -> int:
    """Start ``argv`` detached inside ``netns`` (own session, output to ``log_path``);
    ``netns`` None is the root namespace. With ``cgroup`` (a pod's), the process
    starts in that cgroup v2 directory. ``ip netns exec`` gives the process a /sys
    of the namespace (which hides the host's cgroup and bpf mounts) and the
    namespace's /etc/netns files, as a pod has; ``host_mounts`` enters only the
    network namespace, as a DaemonSet pod with hostPath /sys/fs mounts sees them.

    A short-lived launcher (``python -m meshlab.spawn``) starts the process and
    exits, so the app is re-parented to init and never lingers as our zombie.
    Returns the app's pid.
    """
    if not argv:
        raise MeshlabError("empty command")
    if shutil.which(argv[0], path=env.get("PATH")) is None:
        raise MeshlabError(f"command {argv[0]!r} not found on PATH {env.get('PATH')!r}")
    request = json.dumps(
        {
            "netns": netns,
            "argv": list(argv),
            "env": dict(env),
            "log": str(log_path),
            "cgroup": str(cgroup) if cgroup is not None and cgroup.is_dir() else None,
            "host_mounts": host_mounts,
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "meshlab.spawn"],
        input=request,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise MeshlabError(f"cannot start {argv[0]!r} in {netns!r}: {done.stderr.strip()}")
    return int(done.stdout.strip())


def exec_in(
    netns: str, argv: Sequence[str], env: Mapping[str, str], cgroup: Path | None = None
) -> None:
    """Replace this process with ``argv`` inside ``netns`` (for ``meshlab exec``), in
    the pod's ``cgroup`` when given (as ``kubectl exec`` runs in the pod's)."""
    ip = require_tool("ip", "iproute2")
    if cgroup is not None and cgroup.is_dir():
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    os.execve(ip, [ip, "netns", "exec", netns, *argv], dict(env))


def netns_inode(name: str) -> int | None:
    try:
        return (NETNS_DIR / name).stat().st_ino
    except FileNotFoundError:
        return None


def _pid_netns_inode(pid: int) -> int | None:
    try:
        link = str(Path(f"/proc/{pid}/ns/net").readlink())  # "net:[4026532283]"
    except OSError:
        return None
    return int(link[link.index("[") + 1 : -1])


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may hold spaces.
    return stat[stat.rindex(")") + 2] not in "ZX"


def is_alive(pid: int) -> bool:
    return _is_alive(pid)


def is_running_in(pid: int, netns: str) -> bool:
    """True when ``pid`` is alive and still inside ``netns`` (guards against pid reuse)."""
    inode = netns_inode(netns)
    return inode is not None and _is_alive(pid) and _pid_netns_inode(pid) == inode


def cluster_pids(cluster: str, netns_names: Iterable[str]) -> list[int]:
    """Every live process that belongs to ``cluster``: by netns or by marker."""
    inodes = {i for i in (netns_inode(n) for n in netns_names) if i is not None}
    marker = f"{PROCESS_MARKER_ENV}={cluster}".encode()
    me = os.getpid()
    found: list[int] = []
    for pid in _all_pids():
        if pid == me or not _is_alive(pid):
            continue
        if _pid_netns_inode(pid) in inodes:
            found.append(pid)
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(pid)
    return found


def terminate(pids: Iterable[int], *, grace_s: float = 3.0) -> list[int]:
    """SIGTERM, then SIGKILL whatever is left after ``grace_s``. Returns the pids killed."""
    pids = [p for p in pids if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_is_alive(p) for p in pids):
        time.sleep(0.05)
    stubborn = [p for p in pids if _is_alive(p)]
    for pid in stubborn:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(_is_alive(p) for p in stubborn):
        time.sleep(0.05)
    return pids
