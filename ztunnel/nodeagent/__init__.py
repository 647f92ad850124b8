"""The node agent: which pods of this node are in the mesh, and their capture.

Istio splits the node's work in two: the CNI node agent, which follows the
cluster, captures pods and hands them over, and ztunnel, which proxies. We
keep that split (two processes, joined by the ZDS exchange), so ztunnel can
restart while capture stays in place and pods are re-adopted from the
agent's snapshot.

* ``records``: the pods the CNI plugin has seen on this node, on disk;
* ``plugin``: ``ztunnel-cni``'s calls, checked (the binary is ``cni_shim.c``, C,
  static: it runs on the node and forwards to the agent);
* ``install``: putting the plugin into the node's CNI, and keeping it there;
* ``watch``: inotify on the node's CNI dirs, so a rewrite is repaired at once;
* ``discover``: the node's mesh pods the plugin never saw, and their namespaces;
* ``view``: what the agent follows of the cluster (namespace and pod labels);
* ``reconcile``: the pure decision, which pods to enroll and un-enroll;
* ``service``: the agent itself (plugin socket, ZDS server, reconcile loop);
* ``cli``: ``ztunnel-node-agent``.

May import: ``mesh``, ``ztunnel.capture``, ``ztunnel.zds``. ``plugin``,
``records``, ``install`` and ``watch`` import only the standard library.
"""
