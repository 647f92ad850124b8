"""How the waypoint reaches endpoints: HBONE to a mesh pod's ztunnel, plain TCP otherwise.

An endpoint in the mesh (the EDS tunnel marker, or for the pod an
ORIGINAL_DST cluster sends to, the cluster's) is reached as Istio's waypoint
reaches it: an HBONE CONNECT to ``podIP:15008`` with ``:authority``
``podIP:port``, under the waypoint's own identity, the pod's identity
checked; connections to one pod are pooled by the HBONE client pool.
Anything that goes wrong is a connect failure in Envoy's words, with the
reason (the ztunnel's refusal status, the TLS error) kept for the log.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from mesh.hbone import HBONE_PORT, HboneClientPool, HboneError, LocalSocket, PoolKey, StatusError
from mesh.identity import IdentityError, SpiffeId
from waypoint.config.model import Endpoint
from waypoint.upstream.pool import ConnectFailed, TcpConnector

P = TypeVar("P", bound=asyncio.Protocol)


class MeshConnector:
    """HBONE for endpoints in the mesh, TCP for the rest."""

    def __init__(self, pool: HboneClientPool, identity: SpiffeId) -> None:
        self.pool = pool
        self.identity = identity
        self.tcp = TcpConnector()

    async def open(self, endpoint: Endpoint, timeout_s: float, factory: Callable[[], P]) -> P:
        if not endpoint.hbone:
            return await self.tcp.open(endpoint, timeout_s, factory)
        try:
            expected = (SpiffeId.parse(endpoint.identity),) if endpoint.identity else ()
        except IdentityError as e:
            raise ConnectFailed("local connection failure", f"bad endpoint identity: {e}") from e
        key = PoolKey(
            source=self.identity,
            destination=(endpoint.ip, HBONE_PORT),
            destination_identities=expected,
        )
        protocol = factory()
        socket = LocalSocket(protocol, {"peername": (endpoint.ip, endpoint.port)})
        try:
            async with asyncio.timeout(timeout_s or None):
                await self.pool.connect(key, endpoint.address, (), plain=socket)
        except TimeoutError as e:
            raise ConnectFailed("connection timeout", f"HBONE to {endpoint.address}") from e
        except StatusError as e:
            raise ConnectFailed(
                "remote connection failure", f"HBONE CONNECT to {endpoint.address}: {e}"
            ) from e
        except (HboneError, OSError) as e:
            raise ConnectFailed("remote connection failure", f"HBONE: {e}") from e
        return protocol
