"""Traffic capture: the rules that send a pod's traffic to its ztunnel listeners.

``inpod`` is Istio's in-pod iptables mode (>= 1.21): rules inside each pod's
network namespace, installed by the node agent before the pod is handed to
the proxy and removed, exactly, when it leaves the mesh. (The eBPF backend
will live in ``ebpf/`` behind the same calls.)

May import: ``mesh``, ``ztunnel.netns``, ``pyroute2`` and the standard library; runs
``iptables-restore`` / ``iptables-save`` inside the pod's namespace with
``nsenter``.
"""
