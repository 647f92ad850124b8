"""Launcher used by :func:`meshlab.procs.spawn`; not a public command.

Reads ``{"netns", "argv", "env", "log", "cgroup", "host_mounts"}`` as JSON on stdin, starts the
command in its own session inside the namespace (the root one when ``netns`` is
null) and, when ``cgroup`` is given, in that cgroup v2 directory, prints its pid
and exits at once, so the command is adopted by init instead of staying a child
of meshlab.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


def main() -> int:
    request = json.load(sys.stdin)
    ip = shutil.which("ip")
    if ip is None:
        print("'ip' (iproute2) is not installed", file=sys.stderr)
        return 1
    with open(request["log"], "ab", buffering=0) as log:
        # `ip netns exec` execs the command, so the child's pid is the app's pid.
        # No netns: the root namespace (meshd, the control plane, runs there).
        prefix = [ip, "netns", "exec", request["netns"]] if request["netns"] else []
        if request["netns"] and request.get("host_mounts"):
            prefix = ["nsenter", f"--net=/run/netns/{request['netns']}"]
        cgroup = request.get("cgroup")
        if cgroup:
            # The launcher joins first: its child is born in the pod's cgroup.
            with open(f"{cgroup}/cgroup.procs", "w") as procs:
                procs.write(str(os.getpid()))
        child = subprocess.Popen(
            [*prefix, *request["argv"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=request["env"],
            start_new_session=True,
            close_fds=True,
        )
    print(child.pid)
    # Leave without waiting: the child is re-parented to init and reaped there.
    child.returncode = 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
