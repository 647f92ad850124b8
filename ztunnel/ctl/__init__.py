"""``ztunnel-ctl``: node diagnostics over ztunnel's admin API, and that API's contract.

Modules: ``fetch`` (where the dump comes from: a node's netns, a URL, a
file), ``tables`` (``istioctl ztunnel-config``'s tables), ``explain``
(``authz-check`` and ``trace``, pure over a dump), ``verify`` (the enrolled
pods' capture, listeners and certificates), ``cli`` (the command).

May import: ``mesh``, ``ztunnel`` (``index``, ``authz``, ``route``,
``netns``, ``capture``) and PyYAML.

The admin API
=============

ztunnel serves it on ``127.0.0.1:15000`` in its own network namespace (the
node's), HTTP/1.1, as Istio's ztunnel does (``src/admin.rs``):

``GET /config_dump`` → ``200``, ``application/json``::

    {
      "workloads": [...], "services": [...], "policies": [...],
      "certificates": [
        {"identity": "spiffe://cluster.local/ns/shop/sa/echo",
         "state": "Available" | "Initializing" | "Unavailable: <why>",
         "certChain": [Cert, ...],      # leaf first, then intermediates
         "rootCerts": [Cert, ...]}      # sorted by identity
      ],
      "workloadState": {
        "<pod uid>": {
          "state": "Up",
          "info": {"name": ..., "namespace": ..., "trustDomain": ...,
                   "serviceAccount": ...},
          "netns": "/proc/<ztunnel pid>/fd/<n>",   # ours: the pod's netns, openable
                                                   # by root on the node
          "connections": {"inbound": [Conn, ...], "outbound": [Conn, ...]}
        }
      },
      "config": {"node": "node1", "xdsAddress": "...", "trustDomain": "cluster.local",
                 "synced": true, "pid": 1234}       # ours
    }

    Cert = {"pem": ..., "serialNumber": "<decimal>",
            "validFrom": "2024-05-01T10:00:00Z", "expirationTime": "..."}  # RFC 3339 UTC
    Conn = {"src": "10.244.0.2:40000", "originalDst": "10.244.1.2:8080",
            "actualDst": "10.244.1.2:15008", "protocol": "HBONE" | "TCP",
            "srcIdentity": "spiffe://..." | "", "dstIdentity": "spiffe://..." | "",
            "bytesSent": 0, "bytesReceived": 0, "startedAt": "<RFC 3339>"}

``workloads``, ``services`` and ``policies`` are made by
:func:`mesh.model.dump.dump_state` (the entries' shapes are documented
there); the rest by the admin server. An inbound Conn's ``src`` is the
peer, ``actualDst`` the pod's address the app was connected to (``ip:port``
of the app), ``originalDst`` what the peer asked for; an outbound Conn's
``src`` is the app's socket, ``originalDst`` what it connected to,
``actualDst`` where ztunnel sent it (``ip:15008`` for HBONE).

``GET /logging`` → ``200`` text ``current log level is info\\n``.
``POST /logging?level=debug`` → ``200`` with the same line for the new level;
``400`` and the reason for an unknown level. Levels as ztunnel's: ``trace``,
``debug``, ``info``, ``warn``, ``error``, ``off``. (Istio's ztunnel answers
``GET`` with ``405``; ``ztunnel-ctl`` then asks with a bare ``POST``.)

``POST /quitquitquit`` → ``200`` ``shutdown now\\n``, then ztunnel drains and exits.

``GET /connections`` → ``200`` JSON ``{"connections": [Conn + {"workload":
"<ns>/<name>", "direction": "inbound" | "outbound"}, ...]}``: the same
connections as ``workloadState``, flat. (Istio's ztunnel has no such path:
on ``404`` ``ztunnel-ctl`` flattens ``workloadState`` itself.)

Anything else → ``404``.
"""
