"""The xDS client of the proxies: Delta ADS to meshd, immutable snapshots out.

``state`` is sans I/O (responses in, :class:`XdsState` and ACK/NACK out);
``client`` keeps the gRPC stream alive, with backoff, and never drops the
last good state.

May import: ``mesh.model``, ``mesh.proto`` (generated), ``grpcio``,
``protobuf`` and ``xds-protos``.
"""

from mesh.xds.client import XdsClient
from mesh.xds.state import TYPE_URLS, Applied, XdsState, apply_response

__all__ = ["TYPE_URLS", "Applied", "XdsClient", "XdsState", "apply_response"]
