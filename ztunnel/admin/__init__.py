"""What an operator reaches on a node: admin (15000), metrics (15020), readiness (15021).

* ``dump``: ``/config_dump``, Istio ztunnel's JSON shape (the model's codec
  is :mod:`mesh.model.dump`), with certificates and per-pod state;
* ``server``: the three HTTP servers (aiohttp).

The document and the endpoints are described in :mod:`ztunnel.ctl`, which
reads them. May import: ``mesh``, ``ztunnel`` (its runtime objects),
``aiohttp``, ``prometheus_client``.
"""
