"""Traffic capture: the rules that send a pod's traffic to its ztunnel listeners.

``inpod`` is Istio's in-pod iptables mode (>= 1.21): rules inside each pod's
network namespace, installed by the node agent before the pod is handed to
the proxy and removed, exactly, when it leaves the mesh. ``ebpf`` is the
other backend, behind the same calls (``backend.Capture``): the programs of
the ``ebpf`` package on the pod's cgroup (found by ``cgroups``) and on its
interfaces, and the routing they need. ``backend`` holds the node's choice.

May import: ``mesh``, ``ebpf``, ``ztunnel.netns``, ``pyroute2`` and the standard
library; runs ``iptables-restore`` / ``iptables-save`` inside the pod's namespace
with ``nsenter``.
"""
