"""meshlab: a local cluster of Linux network namespaces standing in for Kubernetes.

Owns: creating and removing clusters (an underlay bridge, node namespaces,
pod namespaces wired by the real CNI plugins, pod processes), the cluster
state file, the ``meshlab`` command and the small apps pods run (``meshlab
app echo``), and with ``--mesh`` meshd, the node agents and the ztunnels as
processes (``meshlab.mesh``), or with ``--image`` as podman containers of the
image (``meshlab.containers``).

May import: ``mesh`` (the cluster model lives in ``mesh.cluster`` so meshd can
read the same state), ``pyroute2``, ``yaml`` and the standard library. Never
``controlplane``, ``ztunnel`` or ``waypoint``: it runs them as programs.
"""
