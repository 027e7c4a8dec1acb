"""The client's receive side: a buffered protocol that can hand a data frame's payload to its consumer.

Normally :class:`ClientStream` works like :class:`ferry.aio.ChunkStream`: ``read()`` returns the
received bytes chunk by chunk for the wire decoder. For the bulk of a download the reader task
switches it into *raw mode* for the rest of one data frame (:meth:`ClientStream.start_raw`): those
payload bytes then bypass the decoder and the route queue, and the consumer takes them itself with
:meth:`ClientStream.readinto` into its own large buffers. The transport, TLS included, writes the
bytes straight into them through :class:`asyncio.BufferedProtocol`: no ``bytes`` object per read,
no join, and one call into this protocol per read of up to a few hundred KiB (uvloop's TLS
decrypts record after record into the same buffer before calling it).

(``os.splice`` socket -> pipe -> file was tried for plain TCP and measured 2x *slower* on the
benchmark VM: the kernel copies the pipe's pages into tmpfs with a slow in-kernel memcpy, while
``recv_into`` + ``pwrite`` use the fast user-copy routines. See docs/performance.md.)

Raw mode never reads past the frame: every buffer offered to the transport is cut at the frame's
end, so the next frame header is again received normally. The reader task learns how many bytes
were taken (:meth:`ClientStream.end_raw`) and tells the sans-IO decoder to skip them.

Why not subclass ``asyncio.streams.FlowControlMixin`` like ChunkStream: it is an
``asyncio.Protocol``, and uvloop treats any ``asyncio.Protocol`` as a non-buffered protocol.

TLS and a TCP close without close_notify: both TLS implementations drop what they still hold
when TCP ends before a close_notify, though the bytes were received. asyncio's (3.11 sslproto)
then makes one ``get_buffer()``/``buffer_updated()`` round (none at all if reading is paused),
calls ``eof_received()`` and closes; uvloop's closes at once and calls only
``connection_lost()``. Reading pauses between raw buffers and after each frame header and offers
buffers cut at the frame's end, so the rest of a reply the server sent completely was lost and
the download failed. :meth:`ClientStream._drain_tls` therefore takes those bytes from the
transport's ``ssl_object`` when the connection ends (it is not read by the transport any more
then). Truncation is still caught: the wire protocol's own frames, sizes and digests decide
whether a reply is complete. Memory stays bounded by the TLS transport's read buffer (~0.5 MiB).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any

from ferry.aio import ChunkQueue
from ferry.ratelimit import RateLimiter
from ferry.wire.frames import HEADER_SIZE

SCRATCH = 1 << 18  # normal-mode read size: what uvloop reads per call anyway


class ClientStream(ChunkQueue, asyncio.BufferedProtocol):
    """Receive side of the client connection (see the module docstring).

    Reading pauses above ``limit`` buffered bytes (normal mode) and whenever raw mode has no buffer
    to fill, so memory stays bounded and the sender is pushed back by TCP.
    """

    def __init__(self, limit: int = 1 << 22) -> None:
        self._loop = asyncio.get_running_loop()
        self._init_queue(limit)
        self._transport: Any = None
        self._ssl_object: ssl.SSLObject | None = None  # TLS: for _drain_tls()
        self._reading_paused = False
        self._scratch = memoryview(bytearray(SCRATCH))
        # write-side flow control (what StreamWriter.drain() needs)
        self._write_paused = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lost = False
        # raw mode: payload bytes of the current frame still owed to the raw consumer
        self._raw_left = 0
        self._raw_taken = 0
        self._raw_active = False
        self._spill: collections.deque[bytes] = collections.deque()  # raw bytes read with no target
        self._target: memoryview | None = None
        self._filled = 0
        self._target_waiter: asyncio.Future[int] | None = None
        # After a raw payload that ended its frame the next bytes are a frame header: read just
        # the header and hold, so that the next frame's payload can go raw as a whole (TLS
        # servers send 1 MiB frames; without this ~256 KiB of each would take the slow path).
        self._header_next = False
        self._hold = False
        #: ``--bwlimit`` on what we receive (None: no limit); reading pauses while it says wait
        self.limiter: RateLimiter | None = None
        self._throttled = False

    # --- transport callbacks ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = transport
        # Kept now: asyncio's TLS transport cannot answer get_extra_info() once closed twice.
        ssl_object = transport.get_extra_info("ssl_object")
        self._ssl_object = ssl_object if isinstance(ssl_object, ssl.SSLObject) else None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._raw_active:
            if self._target is not None:
                # Cut at the frame's end: the next header must go through the decoder.
                end = min(len(self._target), self._filled + self._raw_left)
                return self._target[self._filled : end]
            # Only if the transport delivers once more after pause_reading(): kept, in order.
            return self._scratch[: min(SCRATCH, self._raw_left)]
        if self._header_next:
            return self._scratch[:HEADER_SIZE]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self.limiter is not None:
            self._throttle(self.limiter.take(nbytes))
        if self._raw_active:
            self._raw_left -= nbytes
            self._raw_taken += nbytes
            if self._target is None:
                self._spill.append(self._scratch[:nbytes].tobytes())
            else:
                self._filled += nbytes
                if self._filled == len(self._target) or self._raw_left == 0:
                    self._finish_target()
            return
        self._push(self._scratch[:nbytes].tobytes())
        if self._header_next:
            self._header_next = False
            self._hold = True  # until the reader has looked at the header (see _before_wait())
        self._sync_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._drain_tls()  # asyncio's TLS: called just before it drops what it still holds
        self._wake()
        self._finish_target()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None:
            self._exc = exc
        self._eof = True
        self._drain_tls()  # uvloop's TLS: no eof_received() without close_notify
        self._wake()
        self._finish_target()
        for waiter in self._drain_waiters:
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _drain_tls(self) -> int:
        """Take the plaintext a TLS transport still holds when the connection ends (see the
        module docstring) as if the transport had delivered it; returns how many bytes."""
        sslobj = self._ssl_object
        if sslobj is None:  # plain TCP: the kernel kept everything for us
            return 0
        total = 0
        while True:
            try:
                data = sslobj.read(SCRATCH)
            except ssl.SSLError:  # SSLWantReadError: all taken; or a broken record: stop there
                return total
            if not data:  # after close_notify
                return total
            total += len(data)
            view = memoryview(data)
            while view:
                buf = self.get_buffer(len(view))
                if not buf:  # raw mode at the frame's end: the rest goes through read()
                    self._push(view.tobytes())
                    break
                n = min(len(buf), len(view))
                buf[:n] = view[:n]
                self.buffer_updated(n)
                view = view[n:]

    # --- what asyncio.StreamWriter expects of its protocol -----------------------------------

    async def _drain_helper(self) -> None:
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if not self._write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)

    # --- normal mode ------------------------------------------------------------------------

    def _throttle(self, delay: float) -> None:
        """``--bwlimit``: stop reading for ``delay`` seconds (TCP then slows the sender down)."""
        if delay <= 0 or self._throttled:
            return
        self._throttled = True
        self._sync_reading()

        def again() -> None:
            self._throttled = False
            self._sync_reading()

        self._loop.call_later(delay, again)

    def _sync_reading(self) -> None:
        """Pause or resume the transport: paused above the limit, or in raw mode without a target,
        or while a bandwidth limit says wait."""
        if self._throttled:
            want_paused = True
        elif self._raw_active:
            want_paused = self._target is None
        elif self._hold:
            want_paused = True
        elif self._reading_paused:
            want_paused = self._size > self._limit // 2
        else:
            want_paused = self._size > self._limit
        # After EOF the transport delivers nothing more (only _drain_tls), and asyncio's TLS
        # transport would run its shutdown again on resume_reading() (a call on a closed transport).
        if want_paused == self._reading_paused or self._transport is None or self._lost or self._eof:
            return
        self._reading_paused = want_paused
        if want_paused:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    @property
    def has_chunks(self) -> bool:
        """True while received chunks wait to be read."""
        return bool(self._chunks)

    def _before_wait(self) -> None:
        if self._hold:  # the reader has looked at the header and wants more: read on
            self._hold = False
            self._sync_reading()

    # --- raw mode ---------------------------------------------------------------------------

    def start_raw(self, nbytes: int) -> None:
        """Owe the next ``nbytes`` received bytes (the rest of a data frame) to a raw consumer.

        Only with no chunk waiting in :meth:`read` (those bytes come first). Reading pauses until
        the consumer offers a buffer or takes the bytes from the socket itself.
        """
        if self._chunks or self._raw_active or nbytes <= 0:
            raise RuntimeError("start_raw() with chunks pending, twice, or for nothing")
        self._raw_active = True
        self._hold = self._header_next = False
        self._raw_left = nbytes
        self._raw_taken = 0
        self._sync_reading()

    @property
    def raw_left(self) -> int:
        """Raw bytes still owed to the consumer (0 outside raw mode)."""
        return self._raw_left if self._raw_active else 0

    def end_raw(self) -> int:
        """Leave raw mode; returns how many payload bytes the consumer took (the rest, if any,
        arrives through :meth:`read` again)."""
        if not self._raw_active:
            return 0
        self._finish_target()
        taken = self._raw_taken
        spilled = list(self._spill)
        self._spill.clear()
        self._header_next = self._raw_left == 0 and not spilled
        self._raw_active = False
        self._raw_left = 0
        self._raw_taken = 0
        # Bytes read but not consumed go back in front of the normal queue, in order.
        for chunk in reversed(spilled):
            taken -= len(chunk)
            self._chunks.appendleft(chunk)
            self._size += len(chunk)
        if spilled:
            self._wake()
        self._sync_reading()
        return taken

    async def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with raw payload bytes; returns how many arrived.

        Less than ``len(view)`` only at the frame's end, at EOF (possibly 0) or when the
        connection broke (its error is raised instead if nothing arrived).
        """
        if not self._raw_active or self._target is not None:
            raise RuntimeError("readinto() outside raw mode or twice at once")
        n = 0
        want = min(len(view), self._raw_left + sum(len(c) for c in self._spill))
        while self._spill and n < want:  # bytes already read come first
            chunk = self._spill.popleft()
            k = min(len(chunk), want - n)
            view[n : n + k] = chunk[:k]
            if k < len(chunk):
                self._spill.appendleft(chunk[k:])
            n += k
        if n == want or self._raw_left == 0:
            return n
        if self._eof or self._exc is not None:
            if n == 0 and self._exc is not None:
                raise self._exc
            return n
        self._target = view[n:want]
        self._filled = 0
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._target_waiter = waiter
        self._sync_reading()
        try:
            got = await waiter
        finally:
            # Cancelled or not: no byte may land in the caller's buffer after this returns.
            self._finish_target()
        if got == 0 and n == 0 and self._exc is not None:
            raise self._exc
        return n + got

    def _finish_target(self) -> None:
        if self._target is None:
            return
        self._target = None
        waiter, self._target_waiter = self._target_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._filled)
        self._filled = 0
        self._sync_reading()


async def open_client_connection(
    host: str, port: int, *, ssl: Any = None, server_hostname: str | None = None
) -> tuple[ClientStream, asyncio.StreamWriter]:
    """Like ``asyncio.open_connection`` but the reader is a :class:`ClientStream`."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        ClientStream, host, port, ssl=ssl, server_hostname=server_hostname
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return protocol, writer
