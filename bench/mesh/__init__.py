"""The mesh benchmark: pod to pod across two meshlab nodes, four placements.

The same client and server pods of a 2-node meshlab cluster are measured with
no mesh (``floor``), through our ztunnels with the iptables capture (``ours``)
and with the eBPF capture (``ebpf``), and through a pair of in-pod Envoys
speaking HBONE (``envoy``): iperf3 throughput, wrk keep-alive rates and
latencies, new connections per second and the proxies' CPU; the figures of
both backends of ours are reported as ratios to Envoy's. ``python -m
bench.mesh_bench`` (:mod:`bench.mesh_bench`) is the entry point and the only
importer of this package.

Modules, each importing only those before it: :mod:`.topology` (the pods,
ports, marks and placements), :mod:`.shell` (running commands, in the pods'
network namespaces and cgroups, waiting, :class:`~.shell.BenchError`),
:mod:`.envoy_pair` (the in-pod Envoys), :mod:`.lab` (the cluster and the
placements), :mod:`.load` (the loads), :mod:`.report` (targets, logs scan,
table, record), :mod:`.measure` (a whole run). Besides the standard library
they may import :mod:`bench.envoy` and :mod:`bench.hbone_bench` (shared with
the loopback benchmark), and ``mesh`` and ``meshlab`` (identities, the
cluster's state and processes), the latter inside the functions that use
them.
"""
