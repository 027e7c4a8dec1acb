"""asyncio helpers shared by the server and the client (the I/O side; the protocol is in ferry.wire)."""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CORK_LIMIT = 1 << 16


class CorkedWriter:
    """Coalesces the small frames written during one loop iteration into one transport write.

    Pipelined small requests and replies (a 10,000-file tree) would otherwise cost one TLS record
    and one system call each. Frames are appended synchronously (so their order is the call order)
    and flushed at the end of the iteration, or at once past ``CORK_LIMIT`` bytes. :meth:`drain`
    applies the transport's backpressure, so memory stays bounded by its high-water mark plus
    ``CORK_LIMIT``.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._parts: list[bytes | memoryview] = []
        self._size = 0
        self._scheduled = False

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data``; it goes out at the end of this loop iteration at the latest."""
        self._parts.append(data)
        self._size += len(data)
        if self._size >= CORK_LIMIT:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand everything queued to the transport now."""
        self._scheduled = False
        if self._parts:
            parts, self._parts, self._size = self._parts, [], 0
            if self._writer.transport.is_closing():
                return
            # Join small frames into one write: TLS transports (uvloop's, asyncio's) turn every
            # element of writelines() into its own record, which defeated the cork for trees of
            # small files. Large payloads are written as they are, to avoid copying them.
            small: list[bytes | memoryview] = []
            for part in parts:
                if len(part) < CORK_LIMIT:
                    small.append(part)
                    continue
                if small:
                    self._writer.write(b"".join(small))
                    small = []
                self._writer.write(part)
            if small:
                self._writer.write(small[0] if len(small) == 1 else b"".join(small))

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark."""
        await self._writer.drain()


async def gather_all(coros: list[Any]) -> None:
    """Run all; on the first failure cancel the rest, wait for them, and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel ``tasks`` and wait until each has ended, however it ends (its failure is retrieved,
    not raised: the caller is dropping it).

    The caller's own cancellation is never swallowed: if the caller is cancelled during the wait,
    it still waits for the tasks (cleanup finishes), then raises ``CancelledError``. The pattern
    this replaces, ``task.cancel()`` then ``await task`` under ``suppress(BaseException)``, also
    suppressed a cancel aimed at the caller: a session's worker cancelled while a handler cleaned
    up went back to waiting for the next request, and the session never ended.
    """
    live = [t for t in tasks if t is not None]
    for t in live:
        t.cancel()
    interrupted = False
    for t in live:
        interrupted |= await _wait_through_cancels(t)
        if not t.cancelled():
            t.exception()
    if interrupted:
        raise asyncio.CancelledError


async def _wait_through_cancels(task: asyncio.Future[Any]) -> bool:
    """Wait until ``task`` has ended, even if the caller is cancelled meanwhile (the cancel is not
    passed on to ``task``: its cleanup is under way); whether the caller was cancelled."""
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait([task])  # (unlike ``await task``, never raises task's own outcome)
        except asyncio.CancelledError:
            interrupted = True
    return interrupted


async def uninterrupted(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` (cleanup that must run to its end: aborting uploads, closing a home) in a task
    of its own and wait for it even if the caller is cancelled meanwhile; then raise that cancel.
    A cancel arriving during a cleanup would otherwise skip the rest of it (a partial upload's state
    never written, descriptors never closed)."""
    task = asyncio.ensure_future(coro)
    if await _wait_through_cancels(task):
        if not task.cancelled():
            task.exception()  # (the cancel is what the caller hears about)
        raise asyncio.CancelledError
    return task.result()


async def settle(job: asyncio.Future[Any]) -> None:
    """Wait until ``job`` has ended, without cancelling it (a thread's work cannot be stopped
    mid-way) and without raising its outcome (retrieved here). A cancel of the caller is raised
    at once: callers that must release something once the job ends do it in a ``finally``."""
    await asyncio.wait([job])
    if not job.cancelled():
        job.exception()


async def aclose_quietly(source: object) -> None:
    """Close async iterator ``source`` if it can be closed, ignoring what its cleanup raises,
    except a cancel of the caller (re-raised, see :func:`cancel_and_wait`)."""
    aclose = getattr(source, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if me is not None and me.cancelling():
            raise
    except Exception:  # the iteration already ended for a reason of its own
        pass


def close_after(job: asyncio.Future[Any] | None, close: Callable[[], object]) -> None:
    """Run ``close`` now, or once ``job`` (a thread job still using the resource) has finished.

    For cleanup on error paths: the job's own exception, if any, is retrieved here (the transfer
    already failed for a reason of its own) so asyncio does not log it as never retrieved.
    """
    if job is None or job.done():
        if job is not None and not job.cancelled():
            job.exception()
        close()
        return

    def done(f: asyncio.Future[Any]) -> None:
        if not f.cancelled():
            f.exception()
        close()

    job.add_done_callback(done)


def run(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """``asyncio.run`` on uvloop when it is installed (and FERRY_NO_UVLOOP is not 1)."""
    if use_uvloop and os.environ.get("FERRY_NO_UVLOOP") != "1":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


class ChunkQueue:
    """The chunk queue behind :class:`ChunkStream` and the client's ``ClientStream``: received
    ``bytes`` objects wait in order and :meth:`read` hands them out one at a time.

    A plain mixin, so that each receive side keeps its own protocol base (the client's must stay
    an ``asyncio.BufferedProtocol``: uvloop treats any ``asyncio.Protocol`` as non-buffered).
    Flow control is the subclass's: :meth:`_sync_reading` runs after every read.
    """

    _chunks: collections.deque[bytes]
    _size: int
    _limit: int
    _eof: bool
    _exc: BaseException | None
    _waiter: asyncio.Future[None] | None
    _closed: asyncio.Future[None]

    def _init_queue(self, limit: int) -> None:
        self._chunks = collections.deque()
        self._size = 0
        self._limit = limit
        self._eof = False
        self._exc = None
        self._waiter = None
        self._closed = asyncio.get_running_loop().create_future()

    def _push(self, data: bytes) -> None:
        """Queue a received chunk and wake the reader."""
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed

    @property
    def lost(self) -> asyncio.Future[None]:
        """Done once the connection is gone (closed by either side: ``connection_lost`` ran)."""
        return self._closed

    def _sync_reading(self) -> None:
        """Pause or resume the transport to match what is queued (the subclass's policy)."""

    def _before_wait(self) -> None:
        """Called when :meth:`read` finds nothing queued, before it waits."""

    async def read(self, n: int = -1) -> bytes:
        """The next received chunk (any size); ``b""`` at EOF. ``n`` is ignored (API parity)."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._before_wait()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._size -= len(data)
        self._sync_reading()
        return data


class ChunkStream(ChunkQueue, asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """A receive side without StreamReader's copies: ``read()`` returns the received ``bytes``
    objects as the transport delivered them.

    StreamReader appends every chunk to a bytearray and slices it out again (two copies of every
    byte of a 1 GiB download); the wire decoder passes whole chunks through to the file writer
    instead. Reading pauses above ``limit`` buffered bytes, so memory stays bounded.
    """

    def __init__(self, limit: int = 1 << 22) -> None:
        super().__init__()
        self._init_queue(limit)
        self._transport: asyncio.Transport | None = None
        self._paused_reading = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._push(data)
        if self._size > self._limit and not self._paused_reading and self._transport is not None:
            self._paused_reading = True
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if exc is not None:
            self._exc = exc
        self._eof = True
        self._wake()
        if not self._closed.done():
            self._closed.set_result(None)

    def _sync_reading(self) -> None:
        if self._paused_reading and self._size <= self._limit // 2 and self._transport is not None:
            self._paused_reading = False
            self._transport.resume_reading()
