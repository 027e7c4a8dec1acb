"""The request multiplexer: one connection, many concurrent requests, one reader task.

Every feature of the client (downloads, uploads, trees, commands, ...) talks to the server through
a :class:`Mux` and nothing else: it :meth:`~Mux.open`\\ s a request (a fresh id and the queue its
events arrive on), :meth:`~Mux.send`\\ s messages and data, :meth:`~Mux.recv`\\ s its events, and
:meth:`~Mux.close_route`\\ s it; a one-reply request is one :meth:`~Mux.call`. The
:class:`~ferry.client.aclient.AsyncClient` is a typed facade over a mux and the feature modules.

A single reader task decodes the connection (sans-IO :class:`~ferry.wire.Connection`) and routes
every event to the queue of the request id it belongs to; requests are therefore freely pipelined
and concurrent. Queues of transfers are bounded, so a slow consumer (e.g. a slow disk) stops the
reader and TCP pushes back on the server instead of buffering without bound. An ``Error`` for one
request goes to that request; one that ends the connection (see :mod:`ferry.wire.codes`) fails
every request. ``OSError`` is translated into :class:`~ferry.errors.ConnectionBroken` here, at
the I/O boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ferry.aio import CorkedWriter, cancel_and_wait
from ferry.client.receive import RawPayload
from ferry.client.stream import ClientStream
from ferry.errors import ConnectionBroken, ConnectionClosed, FerryError, FerryTimeout
from ferry.errtext import os_reason
from ferry.ratelimit import RateLimiter
from ferry.wire import CONNECTION_ENDED, NEED_DATA, Connection, Data, ProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, ends_connection, from_wire

__all__ = ["RAW_MIN", "READ_SIZE", "Mux", "Route"]

READ_SIZE = 1 << 20
#: A data frame with at least this much payload still to come is handed to a route that takes raw
#: payloads (a download) instead of going through the decoder piece by piece.
RAW_MIN = 1 << 18
_CLOSED = object()
M = TypeVar("M", bound=m.Message)


_TCP_INFO_BYTES = struct.Struct("=QQ")  # tcpi_bytes_acked, tcpi_bytes_received (Linux >= 4.2)
_TCP_INFO_AT = 120


class Route:
    """Where the events of one request (or of several, see :meth:`Mux.open_shared`) arrive.

    Bounded for transfers, so the reader task applies backpressure when the consumer is slow.
    """

    def __init__(self, maxsize: int, *, raw: bool = False) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        #: the consumer takes large data frames as :class:`RawPayload` events (single-file downloads)
        self.raw = raw

    def pending(self) -> bool:
        """True if an event is waiting (e.g. the server answered an upload before its end)."""
        return not self.queue.empty()


class Mux:
    """One connection's requests. Built by :class:`~ferry.client.aclient.AsyncClient` after TLS;
    the handshake uses :meth:`send` and :meth:`next_message`, then :meth:`start` runs the reader."""

    def __init__(self, reader: ClientStream, writer: asyncio.StreamWriter, conn: Connection) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = conn
        self._ids = itertools.count(1)
        self.routes: dict[int, Route] = {}
        self._out = CorkedWriter(writer)  # pipelined requests share TLS records and syscalls
        self._error: FerryError | None = None
        self._closed = False
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        #: True without TLS (``--plain``)
        self.plain = writer.get_extra_info("sslcontext") is None
        # Below the low-water mark the transport is not paused: drain() cannot block.
        self._low_water = writer.transport.get_write_buffer_limits()[0]
        #: seconds without any byte from the server while waiting for one (or without the server
        #: reading what we send, when its buffers are full) before giving up
        self.read_timeout = 60.0
        self._send_limit: RateLimiter | None = None

    # --- state ----------------------------------------------------------------------------------

    @property
    def error(self) -> FerryError | None:
        """Why the connection ended (None while it works)."""
        return self._error

    @property
    def usable(self) -> bool:
        """True while requests can be sent (not closed by us, not ended by the server)."""
        return self._error is None and not self._closed

    @property
    def transport(self) -> asyncio.WriteTransport:
        """The connection's transport (tests use it to cut the connection)."""
        return self._writer.transport

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionClosed("this client is closed; connect again")
        if self._error is not None:  # e.g. the server said goodbye: the state table would refuse
            raise self._error

    # --- bytes ------------------------------------------------------------------------------------

    async def _read(self) -> bytes:
        try:
            return await self._reader.read(READ_SIZE)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionBroken(f"connection to the server lost: {os_reason(exc)}") from exc

    async def _write(self, data: bytes | memoryview) -> None:
        if self._error is not None:
            raise self._error
        try:
            self._out.write(data)
            if self._send_limit is not None:
                delay = self._send_limit.take(len(data))
                if delay > 0:
                    self._out.flush()
                    await asyncio.sleep(delay)
            if self._writer.transport.get_write_buffer_size() <= self._low_water:
                await self._out.drain()  # not paused: returns at once, no timer needed on this hot path
            else:
                # A server that stopped reading (stopped process, dead host) would block here for
                # ever, and the Cancel sent when the caller gives up would block again: bound it.
                async with asyncio.timeout(self.read_timeout):
                    await self._out.drain()
        except TimeoutError as exc:
            err = FerryTimeout(f"the server has not read anything for {self.read_timeout:g} s")
            self._fail(err)
            self._writer.transport.abort()  # the buffered data would otherwise hold the socket open
            raise err from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionBroken(f"connection to the server lost: {os_reason(exc)}") from exc

    async def send(self, msg: m.Message) -> None:
        """Send one message."""
        self._check_open()
        await self._write(self._conn.send(msg))

    async def send_data(self, channel: int, stream: int, data: bytes | memoryview) -> None:
        """Send one data frame on ``channel`` (a request id)."""
        if self._error is not None:
            raise self._error
        # Header and payload separately: no 1 MiB concatenation copy per frame.
        self._out.write(self._conn.data_header(channel, stream, len(data)))
        await self._write(data)

    def set_bwlimit(self, rate: int | None) -> None:
        """Limit the connection to ``rate`` bytes a second in each direction (None: no limit):
        sending waits, receiving pauses reading (TCP then holds the server back)."""
        self._send_limit = RateLimiter(rate) if rate else None
        self._reader.limiter = RateLimiter(rate) if rate else None

    def tcp_bytes(self) -> int | None:
        """Bytes sent (acknowledged) plus received on this TCP connection so far, from the kernel
        (Linux ``TCP_INFO``: ``tcpi_bytes_acked`` and ``tcpi_bytes_received``, TLS included); None
        where the kernel does not say."""
        sock = self._writer.get_extra_info("socket")
        if sock is None or not hasattr(socket, "TCP_INFO"):
            return None
        try:
            raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            return None
        if len(raw) < _TCP_INFO_AT + _TCP_INFO_BYTES.size:
            return None
        sent, received = _TCP_INFO_BYTES.unpack_from(raw, _TCP_INFO_AT)
        return int(sent + received)

    # --- the handshake (before the reader task runs) ----------------------------------------------

    async def next_message(self) -> m.Message:
        """The next message, read here: only during the handshake, before :meth:`start`."""
        assert self._task is None, "the reader task owns the connection"
        while True:
            ev = self._conn.next_event()
            if ev is CONNECTION_ENDED:
                # A TLS server drops a plain Hello it cannot parse as a ClientHello: say what to try.
                hint = "; if the server uses TLS (the default), drop --plain" if self.plain else ""
                raise ConnectionBroken(f"the server closed the connection during the handshake{hint}")
            if isinstance(ev, m.Message):
                return ev
            if ev is NEED_DATA:
                self._conn.receive_data(await self._read())

    def start(self) -> None:
        """Start the reader task: from now on events go to the requests' routes."""
        if self._task is None:
            self._task = asyncio.create_task(self._read_loop())

    async def wait_ended(self) -> None:
        """Return once the connection has ended (the server closed it, it broke, or it was
        closed): a resident process (ferry.resident.daemon) leaves then. Cancelling the wait
        leaves the connection alone."""
        if self._task is not None:
            await asyncio.wait([self._task])

    # --- the reader task ----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        err: FerryError
        raw_ok = True  # whether a raw hand-over may be tried (see _hand_over)
        try:
            while True:
                ev = self._conn.next_event()
                if ev is NEED_DATA:
                    if self._conn.data_remaining >= RAW_MIN and not self._reader.has_chunks and raw_ok:
                        # In the middle of a large data frame with nothing read ahead: a download
                        # takes the rest straight off the transport (ferry.client.receive).
                        channel = self._conn.data_channel
                        route = self.routes.get(channel) if channel is not None else None
                        if route is not None and route.raw and channel is not None:
                            # Nothing taken: the connection ended or the consumer gave up. The
                            # next bytes (or the EOF) must then come the normal way.
                            raw_ok = await self._hand_over(route, channel) > 0
                            continue
                    self._conn.receive_data(await self._read())
                    raw_ok = True
                    continue
                if ev is CONNECTION_ENDED:
                    err = ConnectionBroken("the server closed the connection")
                    break
                if isinstance(ev, Data):
                    route = self.routes.get(ev.channel)
                    if route is not None:
                        await route.queue.put(ev)
                    continue
                if isinstance(ev, m.Pong):
                    fut = self._pings.pop(ev.nonce, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                    continue
                if isinstance(ev, m.Ping):
                    await self._write(self._conn.send(m.Pong(nonce=ev.nonce)))
                    continue
                if isinstance(ev, m.Goodbye):
                    if ev.code == ErrorCode.REVOKED:  # the login was revoked: retrying would not help
                        err = ErrorCode.REVOKED.error(f"the server ended the session: {ev.reason or 'login revoked'}")
                    else:
                        err = ConnectionBroken(f"the server closed the connection: {ev.reason or 'goodbye'}")
                    break
                if isinstance(ev, m.Error) and ends_connection(ev):  # else it fails one request
                    err = from_wire(ev)
                    break
                route = self.routes.get(getattr(ev, "id", 0))
                if route is not None:
                    await route.queue.put(ev)
        except asyncio.CancelledError:
            err = ConnectionClosed("the client was closed")
            self._fail(err)
            raise
        except ProtocolError as exc:
            err = ConnectionBroken(f"the server broke the protocol: {exc}")
        except FerryError as exc:
            err = exc
        except Exception as exc:  # keep waiters from hanging whatever happens
            err = ConnectionBroken(f"client reader failed: {exc!r}")
        self._fail(err)

    async def _hand_over(self, route: Route, channel: int) -> int:
        """Let the route's consumer take the rest of this data frame off the transport itself
        (see :mod:`ferry.client.stream`), and wait until it has; returns how many bytes it took."""
        stream = self._reader
        stream.start_raw(self._conn.data_remaining)
        ev = RawPayload(channel, stream.raw_left, stream, asyncio.get_running_loop().create_future())
        try:
            await route.queue.put(ev)
            if self.routes.get(channel) is route:  # else closed meanwhile: nobody will take it
                await ev.done
        finally:
            taken = stream.end_raw()  # also ends a readinto() in progress (when cancelled)
            self._conn.skip_data(taken)
        return taken

    def _fail(self, err: FerryError) -> None:
        if self._error is None:
            self._error = err
        for route in self.routes.values():
            with contextlib.suppress(asyncio.QueueFull):
                route.queue.put_nowait(_CLOSED)
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(err)

    # --- requests -----------------------------------------------------------------------------------

    def open(self, maxsize: int = 0, *, raw: bool = False) -> tuple[int, Route]:
        """A new request: its id and the route its events arrive on (at most ``maxsize`` queued,
        0: unbounded; ``raw``: large data frames come as :class:`RawPayload`)."""
        route = Route(maxsize, raw=raw)
        return self.open_shared(route), route

    def open_shared(self, route: Route) -> int:
        """A new request id whose events go to an existing ``route`` (many small requests read by
        one loop)."""
        self._check_open()
        req_id = next(self._ids)
        self.routes[req_id] = route
        return req_id

    def forget(self, req_id: int) -> None:
        """Stop routing ``req_id`` without touching its (shared) queue; late events are dropped."""
        self.routes.pop(req_id, None)

    def close_route(self, req_id: int) -> None:
        """The request is over: late events for it are dropped."""
        route = self.routes.pop(req_id, None)
        if route is not None:
            # The reader may be blocked putting into this (full, bounded) queue: empty it so that put
            # completes; later events for the id find no route and are dropped.
            while not route.queue.empty():
                ev = route.queue.get_nowait()
                if isinstance(ev, RawPayload):
                    ev.release()  # the reader waits for it; the rest of the frame is dropped

    async def recv(self, route: Route, timeout: float | None = None) -> Any:
        """The next event of a request (a message, :class:`~ferry.wire.Data` or
        :class:`RawPayload`); raises the connection's error if it broke."""
        if self._error is not None and route.queue.empty():
            # The reader has ended; its end marker may not have fitted into this full queue.
            raise self._error
        wait = timeout if timeout is not None else self.read_timeout
        try:
            async with asyncio.timeout(wait):
                ev = await route.queue.get()
        except TimeoutError as exc:
            raise FerryTimeout(f"no answer from the server for {wait:g} s") from exc
        if ev is _CLOSED:
            assert self._error is not None
            raise self._error
        return ev

    async def expect(self, route: Route, kind: type[M]) -> M:
        """The next event of a request, which must be a ``kind`` message: an ``Error`` is raised
        (:func:`~ferry.wire.codes.from_wire`), anything else is the server breaking the protocol."""
        ev = await self.recv(route)
        if isinstance(ev, m.Error):
            raise from_wire(ev)
        if not isinstance(ev, kind):
            raise ConnectionBroken(f"the server answered with {type(ev).__name__} where {kind.__name__} belongs")
        return ev

    async def call(self, build: Callable[[int], m.Message], kind: type[M]) -> M:
        """Send the request ``build(id)`` and return its single reply, a ``kind`` (see :meth:`expect`)."""
        req_id, route = self.open()
        try:
            await self.send(build(req_id))
            return await self.expect(route, kind)
        finally:
            self.close_route(req_id)

    async def cancel(self, req_id: int) -> None:
        """Tell the server to stop a request we gave up on (best effort: the connection may be gone)."""
        if self.usable:
            with contextlib.suppress(Exception):
                await self.send(m.Cancel(id=req_id))

    async def ping(self) -> float:
        """Round-trip time to the server in seconds (also a keepalive)."""
        nonce = next(self._ids)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[nonce] = fut
        t0 = time.perf_counter()
        try:
            await self.send(m.Ping(nonce=nonce))
            async with asyncio.timeout(self.read_timeout):
                await fut
        except TimeoutError as exc:  # the builtin one is an OSError: callers would take it for a local error
            raise FerryTimeout(f"no answer to a ping from the server for {self.read_timeout:g} s") from exc
        finally:
            self._pings.pop(nonce, None)
        return time.perf_counter() - t0

    # --- the end ------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Say goodbye and close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._error is None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self._write(self._conn.send(m.Goodbye(reason="client done")))
        try:
            await cancel_and_wait(self._task)
        finally:
            self._writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await self._writer.wait_closed()

    def abort(self) -> None:
        """Drop the connection at once (after a failed handshake: nothing to say goodbye to)."""
        self._closed = True
        self._writer.close()
