"""TLS over a raw TCP transport with ``ssl.MemoryBIO``: the handshake in our hands.

asyncio's and uvloop's TLS layers report a failed server-side handshake
nowhere (an ``SSLError`` is an ``OSError``, logged only in debug mode), and
uvloop's ``start_tls`` stalled on the server side in our tests, so an
operator could never learn that a client came without a certificate or with
one from another CA. Driving OpenSSL through memory BIOs ourselves costs
nothing measurable (a few Python calls per 256 KiB read; the work is the
cipher, in OpenSSL either way) and gives:

* one log line per failed handshake, naming the peer and OpenSSL's reason;
* a handshake deadline of our own;
* decryption straight into the application's buffer (``SSLObject.read``
  into a memoryview), many records per callback;
* plaintext handed to ``SSLObject.write`` is consumed at once, so no slice
  of a caller's buffer is ever retained by the TLS layer.

:class:`TlsTransport` looks like an asyncio transport to the application
protocol (a :class:`asyncio.BufferedProtocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterable
from typing import Any, cast

from mesh.hbone.tls import describe_tls_error

# Ciphertext is read into one buffer for all TLS sockets of the process: it is
# copied into the connection's memory BIO before the callback returns.
_FLUSH_AT_ONCE = 64 * 1024
_SHARED_RAW_BUFFER = memoryview(bytearray(256 * 1024))


class TlsTransport(asyncio.BufferedProtocol):
    """The raw socket's protocol and, toward the application, its transport."""

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        app_factory: Callable[[], asyncio.BufferedProtocol],
        handshake_timeout_s: float,
        on_handshake_failed: Callable[[TlsTransport, str, BaseException], None] | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side)
        self._server_side = server_side
        self._app_factory = app_factory
        self.app: asyncio.BufferedProtocol | None = None
        # The application protocol, kept after the connection is gone.
        self.protocol: asyncio.BufferedProtocol | None = None
        self._timeout_s = handshake_timeout_s
        self._on_failed = on_handshake_failed
        self._raw: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.handshake_done = False
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = False
        self._error: BaseException | None = None
        self._app_paused_reading = False
        self._flush_scheduled = False
        self._loop = asyncio.get_running_loop()
        self.peer = "?"
        # Called at the end of a loop iteration, just before its ciphertext is written:
        # the last chance to add to that write (the tunnel reads its short-read sockets).
        self.before_flush: Callable[[], None] | None = None

    # ------------------------------------------------- raw transport side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._raw = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = f"{peer[0]}:{peer[1]}"
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._timeout_s, self._handshake_timeout)
        self._do_handshake()

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SHARED_RAW_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self._incoming.write(_SHARED_RAW_BUFFER[:nbytes])
        if not self.handshake_done:
            self._do_handshake()
        if self.handshake_done:
            self._read_app()

    def eof_received(self) -> bool:
        self._incoming.write_eof()
        if not self.handshake_done:
            self._handshake_failed(ConnectionResetError("connection closed during the handshake"))
            return False
        self._read_app()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if not self.handshake_done:
            if not self.handshake.done():
                error = exc or ConnectionResetError("connection closed during the handshake")
                self._report_failure(error)
                self.handshake.set_exception(error)
                self.handshake.exception()  # retrieved: logged by us already
            return
        if self.app is not None:
            app, self.app = self.app, None
            app.connection_lost(cast(Exception, self._error) or exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # -------------------------------------------------------- handshake

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ssl.CertificateError, ValueError) as e:
            self._flush()  # the alert telling the peer why
            self._handshake_failed(e)
            return
        self._flush()
        self.handshake_done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.app = self.protocol = self._app_factory()
        self.app.connection_made(cast(asyncio.Transport, self))
        if not self.handshake.done():
            self.handshake.set_result(None)

    def _handshake_timeout(self) -> None:
        if not self.handshake_done:
            self._handshake_failed(
                TimeoutError(f"handshake not finished within {self._timeout_s:g}s")
            )

    def _handshake_failed(self, exc: BaseException) -> None:
        if self.handshake.done():
            return
        self._report_failure(exc)
        self.handshake.set_exception(exc)
        self.handshake.exception()
        if self._raw is not None:
            self._raw.close()

    def _report_failure(self, exc: BaseException) -> None:
        if self._on_failed is not None:
            self._on_failed(self, describe_tls_error(exc), exc)

    # ------------------------------------------------------- application

    def _read_app(self) -> None:
        app = self.app
        if app is None or self._app_paused_reading:
            return
        read = self._ssl.read
        while app is self.app:
            buffer = app.get_buffer(-1)
            view = memoryview(buffer)
            size = len(view)
            filled = 0
            eof = False
            try:
                while filled < size:
                    # With a buffer, SSLObject.read returns a count (typeshed says bytes).
                    n: int = read(size - filled, view[filled:])  # type: ignore[assignment]
                    if n == 0:
                        eof = True
                        break
                    filled += n
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or a bare FIN: HTTP/2 framing notices truncation itself.
                eof = True
            except ssl.SSLError as e:
                # e.g. the server's alert refusing our certificate (TLS 1.3
                # reports it after the client finished its handshake).
                self._error = e
                if filled:
                    app.buffer_updated(filled)
                self._flush()
                if self._raw is not None:
                    self._raw.abort()
                return
            if filled:
                app.buffer_updated(filled)
            if eof:
                if self.app is not None and not self.app.eof_received():
                    self.close()
                return
            if filled < size:
                break
        self._flush_soon()  # post-handshake messages (key updates) may need an answer

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._outgoing.read())

    # ------------------------------------------- the transport interface

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._encrypt(data)
        self._flush_soon()

    def writelines(self, items: Iterable[bytes | bytearray | memoryview]) -> None:
        if self._closing:
            return
        for item in items:
            self._encrypt(item)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Send the ciphertext at the end of this loop iteration, in one write.

        The plaintext is already encrypted (nothing of the caller's buffer is
        kept); deferring only the socket write lets every stream that had
        something to say in this iteration share one syscall: with many
        tunnels on one connection that halves the CPU per small message.

        Bulk data goes out at once, though: libuv calls a socket's read
        callback up to 32 times in a row, and holding all of that back
        turned a steady stream into bursts that stalled on the window.
        """
        if self._outgoing.pending >= _FLUSH_AT_ONCE:
            self._flush()
        else:
            self.flush_soon()

    def flush_soon(self) -> None:
        """Make sure a write (and ``before_flush``) happens at the end of this iteration."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if self.before_flush is not None and not self._closing:
            self.before_flush()
        self._flush()

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        # A memory BIO never blocks, so OpenSSL takes everything at once; the
        # loop only guards the contract. Nothing of ``data`` is kept.
        written = self._ssl.write(data)
        while written < len(data):
            data = memoryview(data)[written:]
            written = self._ssl.write(data)

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.handshake_done:
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._ssl.unwrap()  # queue our close_notify
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def get_write_buffer_size(self) -> int:
        raw = self._raw.get_write_buffer_size() if self._raw is not None else 0
        return raw + self._outgoing.pending

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high=high, low=low)

    def pause_reading(self) -> None:
        self._app_paused_reading = True
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        self._app_paused_reading = False
        if self._raw is not None:
            self._raw.resume_reading()
        self._read_app()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert()
        if name == "cipher":
            return self._ssl.cipher()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)
