"""The eBPF capture backend's BPF half: the programs and their loader.

Owns: ``capture.bpf.c`` (cgroup connect4/sockops/sendmsg4/recvmsg4 and a tc
ingress program, compiled by ``make ebpf`` into ``capture.bpf.o``), the ctypes
binding of the libbpf calls it needs (:mod:`ebpf.libbpf`), and the node's
pinned programs and maps with what one pod gets of them (:mod:`ebpf.capture`).
The rest of the backend (cgroups, routing, the node agent's choice) is
``ztunnel.capture``.

May import: ``mesh``, ``pyroute2`` (netlink objects passed in), ``libbpf.so.1``
through ctypes, and the standard library. Never the programs (``controlplane``,
``ztunnel``, ``waypoint``, ``meshlab``).
"""
