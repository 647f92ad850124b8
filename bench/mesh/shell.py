"""Running commands (from the venv, in the pods' network namespaces and cgroups), waiting,
the bench's error."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

WAIT_S = 60.0

Log = Callable[[str], None]


class BenchError(RuntimeError):
    """The cluster or a placement is not as it must be to measure."""


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run(argv: list[str], timeout_s: float = 60, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and done.returncode != 0:
        raise BenchError(
            f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}"
        )
    return done.stdout


def in_netns(netns: str, argv: list[str], timeout_s: float = 60, check: bool = True) -> str:
    return run(["ip", "netns", "exec", netns, *argv], timeout_s, check)


# `sh -c SCRIPT CGROUP ARGV...`: the shell joins the cgroup ($0), then becomes ARGV (so the
# pid of what is started is the pid of ARGV's program, as with a plain `ip netns exec`).
_JOIN_CGROUP = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


def pod_argv(netns: str, cgroup: Path | None, argv: list[str]) -> list[str]:
    """``argv`` as a process of the pod: in its network namespace and, when it has one, in
    its cgroup (v2) from the start, as a container's process is. The eBPF capture acts on
    the sockets of the processes in the pod's cgroup only: one started by a bare ``ip
    netns exec`` would pass uncaptured."""
    inside = ["ip", "netns", "exec", netns, *argv]
    if cgroup is None:
        return inside
    return ["sh", "-c", _JOIN_CGROUP, str(cgroup), *inside]


def in_pod(
    netns: str,
    cgroup: Path | None,
    argv: list[str],
    timeout_s: float = 60,
    check: bool = True,
) -> str:
    """Run ``argv`` as a process of the pod (:func:`pod_argv`); its output."""
    return run(pod_argv(netns, cgroup, argv), timeout_s, check)


def wait_until(what: str, check: Callable[[], str | None], timeout_s: float = WAIT_S) -> None:
    """Until ``check()`` returns None (all well); it returns what is still wrong."""
    deadline = time.monotonic() + timeout_s
    while True:
        wrong = check()
        if wrong is None:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: still not so after {timeout_s:g} s: {wrong}")
        time.sleep(0.1)
