"""The ZDS exchange: how the node agent hands enrolled pods to the proxy.

Istio's contract: a unix ``SOCK_SEQPACKET`` socket, one protobuf per packet
(``istio.workload.zds``). The proxy connects and says ``ZdsHello``; the
node agent sends a snapshot (``AddWorkload`` with the pod's network
namespace as a file descriptor by ``SCM_RIGHTS``, or ``KeepWorkload`` for a
pod whose namespace it cannot open), then ``SnapshotSent``, then changes as
they happen (``AddWorkload``, ``DelWorkload``). The proxy acks every request,
with an error string when it could not do it.

``protocol`` is sans I/O; ``channel`` moves packets and descriptors over an
asyncio loop; ``agent`` is the node agent's side, ``proxy`` the proxy's.

May import: ``mesh`` (the generated protobufs) and the standard library.
"""
