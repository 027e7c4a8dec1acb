"""The ``asyncio`` model (the default): a coroutine per connection on the stdlib event loop.

Backpressure comes from ``await writer.drain()`` (we do not read more until the client has
taken our output) and from the StreamReader's own limit (the transport stops reading when the
reader's buffer is full). Every await that depends on the client is bounded by the idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import cast

from ferry.net.serve.common import CHUNK, LINGER, log
from ferry.net.serve.config import ServeConfig
from ferry.net.serve.handlers import Step, datagram_reply, stream_handler
from ferry.net.serve.stop import StopSignal

#: How long shutdown waits for cancelled client coroutines to finish closing.
_SHUTDOWN_GRACE = 5.0


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger: float) -> None:
    """Half-close and drain briefly, so our final reply is not destroyed by an RST."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(linger):
            while await reader.read(CHUNK):
                pass


class _Watchdog:
    """A connection's idle timer that costs one attribute store per I/O, not a timer per await.

    ``asyncio.timeout`` around every read and drain would schedule and cancel a timer handle per
    round trip; instead one timer fires at ``last activity + idle`` and re-arms itself if there
    was activity since, so it wakes at most about once per idle period.
    """

    def __init__(self, idle: float, task: asyncio.Task[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = idle
        self._task = task
        self.last = self._loop.time()
        self.fired = False
        self._handle = self._loop.call_at(self.last + idle, self._check)

    def touch(self) -> None:
        """Record progress (data received, or output drained)."""
        self.last = self._loop.time()

    def _check(self) -> None:
        due = self.last + self._idle
        if self._loop.time() >= due:
            self.fired = True
            self._task.cancel()  # interrupts whatever the client coroutine awaits
        else:
            self._handle = self._loop.call_at(due, self._check)

    def cancel(self) -> None:
        """Stop the timer (connection finished)."""
        self._handle.cancel()


class _StreamServer:
    def __init__(self, config: ServeConfig) -> None:
        self.kind = config.kind
        self.idle = config.idle_timeout
        self.linger = min(LINGER, config.idle_timeout)
        self.tasks: set[asyncio.Task[None]] = set()

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        dog = _Watchdog(self.idle, task)
        try:
            await self._converse(reader, writer, dog)
            writer.close()
            # Flushes what is still buffered; the watchdog bounds a client that stopped reading.
            await writer.wait_closed()
        except OSError as exc:  # reset, broken pipe: drop this client only
            log.debug("client dropped: %r", exc)
        except asyncio.CancelledError:
            # Idle timeout (watchdog) or server shutdown: abort below. Not re-raised, so the
            # task simply ends and nothing logs "Task was destroyed / exception never retrieved".
            log.debug("client %s", "idle, closing" if dog.fired else "closed by shutdown")
        except Exception:
            log.exception("bug while serving a %s client; dropping it", self.kind)
        finally:
            dog.cancel()
            self.tasks.discard(task)
            writer.transport.abort()  # no-op after an orderly close; else drop unsent data now

    async def _converse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dog: _Watchdog
    ) -> None:
        """Run the handler until it asks to close (or the client finished sending)."""
        handler = stream_handler(self.kind)
        got_eof = False
        step: Step = handler.start()
        while True:
            if step.out:
                writer.write(step.out)
                await writer.drain()  # returns at once unless the transport's buffer is full
                dog.touch()
            if step.close:
                break
            data = await reader.read(CHUNK)
            dog.touch()
            if data:
                step = handler.feed(data)
            else:
                got_eof = True
                step = Step(handler.eof().out, close=True)
        if not got_eof:
            await _linger(reader, writer, self.linger)


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, kind: str, sock: socket.socket) -> None:
        self.kind = kind
        self.sock = sock
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: the selector loop's datagram transport does not subclass
        # DatagramTransport on every Python version, though it implements it.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply = datagram_reply(self.kind, data)
        except Exception:
            log.exception("bug while answering a %s datagram", self.kind)
            return
        if self.transport is None:
            return
        if reply:
            self.transport.sendto(reply, addr)
            return
        # asyncio (3.11) silently drops empty datagrams in sendto(), but an empty echo is a
        # valid reply; send it on the socket directly (a zero-byte datagram cannot block).
        try:
            self.sock.sendto(b"", addr)
        except OSError as exc:
            log.debug("sendto %s: %s", addr, exc)

    def error_received(self, exc: Exception) -> None:
        log.debug("datagram error: %s", exc)


async def _main(lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_stop() -> None:
        # The stop pipe is never drained (other waiters may share it), so stop watching it at
        # once: a level-triggered reader would otherwise fire on every loop iteration.
        loop.remove_reader(stop.fileno())
        stopped.set()

    loop.add_reader(stop.fileno(), on_stop)
    try:
        if config.proto == "udp":
            transport, _proto = await loop.create_datagram_endpoint(
                lambda: _DatagramProtocol(config.kind, lsock), sock=lsock
            )
            await stopped.wait()
            transport.close()
            return
        srv = _StreamServer(config)
        if config.proto == "unix":
            server = await asyncio.start_unix_server(srv.client, sock=lsock, backlog=config.backlog)
        else:
            server = await asyncio.start_server(srv.client, sock=lsock, backlog=config.backlog)
        await stopped.wait()
        server.close()  # stop accepting; Python 3.11 leaves open connections to us
        for task in list(srv.tasks):
            task.cancel()
        if srv.tasks:
            await asyncio.wait(list(srv.tasks), timeout=_SHUTDOWN_GRACE)
        await server.wait_closed()
    finally:
        loop.remove_reader(stop.fileno())


def serve_asyncio(lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    """``asyncio``: run the event loop until ``stop`` is set; closes every client on the way out."""
    asyncio.run(_main(lsock, config, stop))
