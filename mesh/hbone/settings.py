"""HBONE's HTTP/2 and timing parameters, as Istio's ztunnel sets them.

One typed object with unit-suffixed names; the defaults are the wire
contract (``../shared/DESIGN.md``, "HBONE" row) and should only change in
tests.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1 << 10
MiB = 1 << 20

HBONE_PORT = 15008
ALPN = "h2"


@dataclass(frozen=True, slots=True, kw_only=True)
class Http2Settings:
    """What one side advertises and enforces on an HBONE connection."""

    stream_window: int = 4 * MiB
    connection_window: int = 16 * MiB
    max_frame_size: int = 1 * MiB
    max_concurrent_streams: int = 200
    max_header_list_size: int = 64 * KiB

    def __post_init__(self) -> None:
        if not 65535 <= self.stream_window <= 2**31 - 1:
            raise ValueError("stream_window must be 65535 .. 2^31-1")
        if not 65535 <= self.connection_window <= 2**31 - 1:
            raise ValueError("connection_window must be 65535 .. 2^31-1")
        if not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError("max_frame_size must be 16384 .. 2^24-1")


# ztunnel's server: 200 concurrent streams, 64 KiB of headers. Its client: 16 KiB.
SERVER_HTTP2 = Http2Settings()
CLIENT_HTTP2 = Http2Settings(max_concurrent_streams=100, max_header_list_size=16 * KiB)


@dataclass(frozen=True, slots=True, kw_only=True)
class HboneConfig:
    """Timers and limits of the asyncio shell around the HTTP/2 core."""

    ping_interval_s: float = 10.0
    # A connection that has sent nothing (not even a PING ACK) for this long is dead.
    ping_timeout_s: float = 20.0
    handshake_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    # Client pool: streams per connection before another connection opens.
    pool_max_streams: int = 100
    pool_idle_timeout_s: float = 300.0
    # Graceful shutdown: how long open streams may finish after GOAWAY.
    drain_timeout_s: float = 5.0
    # A peer that stops reading while making us answer (PING, SETTINGS, RST
    # floods) is cut off once this much is queued for it; DATA alone never
    # gets near it, since windows bound it to 16 MiB.
    max_write_buffer_bytes: int = 64 * MiB
