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
        polite = False
        try:
            polite = await self._converse(reader, writer)
        except (OSError, TimeoutError) as exc:  # reset, broken pipe, idle: drop this client only
            log.debug("client dropped: %r", exc)
        except asyncio.CancelledError:
            pass  # server shutdown: fall through to abort; not re-raised so the task ends quietly
        except Exception:
            log.exception("bug while serving a %s client; dropping it", self.kind)
        finally:
            self.tasks.discard(task)
            if polite:
                writer.close()  # flushes what is still buffered, then closes
            else:
                writer.transport.abort()  # don't wait on a client that stopped reading

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Run the handler until it closes; True if it ended in an orderly way."""
        handler = stream_handler(self.kind)
        got_eof = False
        step: Step = handler.start()
        while True:
            if step.out:
                writer.write(step.out)
                async with asyncio.timeout(self.idle):
                    await writer.drain()
            if step.close:
                break
            async with asyncio.timeout(self.idle):
                data = await reader.read(CHUNK)
            if data:
                step = handler.feed(data)
            else:
                got_eof = True
                step = Step(handler.eof().out, close=True)
        if not got_eof:
            await _linger(reader, writer, self.linger)
        # Wait (bounded) until the last bytes really left, so close() cannot hang on them.
        async with asyncio.timeout(self.idle):
            await writer.drain()
        return True


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
        if reply is None or self.transport is None:
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
    loop.add_reader(stop.fileno(), stopped.set)
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
