"""Taking a download's data frames off the connection without the per-chunk Python path.

The reader task of :class:`~ferry.client.aclient.AsyncClient` hands the rest of a large data frame
to the download as a :class:`RawPayload` event (see :mod:`ferry.client.stream`). The download takes
those bytes with :meth:`DownloadWriter.take_raw`:

* **plain TCP**: ``os.splice`` socket -> pipe -> file in a thread. On loopback the sender's
  ``sendfile`` pages travel by reference, so each byte is copied once (into the file's page
  cache). The written range is hashed from the page cache in a second thread, one block behind
  the splice, so receiving and hashing overlap.
* **otherwise (TLS)**: the transport decrypts straight into a few large, recycled buffers; each
  full buffer is written and hashed in a thread while the next one fills. A buffer is offered to
  the transport again only after its write-and-hash job has finished.

Integrity is unchanged: every byte is hashed from what was actually written, in order, by the same
:class:`~ferry.hashing.ChunkHasher` as the pieces that arrive the normal way.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ferry.client.stream import ClientStream
from ferry.errors import ConnectionBroken, FerryTimeout, TransferError
from ferry.hashing import ChunkHasher

SPLICE_BLOCK = 1 << 22  # bytes per splice job: one thread hop (and one progress report) per 4 MiB
PIPE_SIZE = 1 << 20  # pipe capacity asked for: bytes moved per splice() pair
BUFFER_SIZE = 1 << 22  # TLS / fallback: size of one receive buffer
BUFFERS = 2  # buffers per download: one filling while the other is written and hashed
#: Environment switch for A/B measurements and tests: 1 disables splicing (buffers are used instead).
NO_SPLICE_ENV = "FERRY_NO_SPLICE"


@dataclass
class RawPayload:
    """Event on a download's route: take the next ``nbytes`` payload bytes of the current data
    frame from ``stream`` yourself, then resolve ``done`` (the reader task waits for it)."""

    channel: int
    nbytes: int
    stream: ClientStream
    done: asyncio.Future[None] = field(repr=False)

    def release(self) -> None:
        """Let the reader task continue (idempotent)."""
        if not self.done.done():
            self.done.set_result(None)


@dataclass
class _Spliced:
    written: int
    eof: bool = False
    error: BaseException | None = None


def splice_to_file(
    sock_fd: int,
    stop_fd: int,
    pipe: tuple[int, int],
    file_fd: int,
    pos: int,
    count: int,
    timeout: float,
    stop: threading.Event,
) -> tuple[int, _Spliced]:
    """Move up to ``count`` bytes from the (non-blocking) socket into the file at ``pos``.

    Returns ``(bytes taken off the socket, result)``. Stops early at EOF, on ``stop`` (signalled
    through ``stop_fd`` too, so a wait for the socket ends at once), after ``timeout`` seconds
    without a byte, or on an error; the result says which. Bytes taken off the socket are always
    written before returning unless writing itself failed.
    """
    r, w = pipe
    poller = select.poll()
    poller.register(sock_fd, select.POLLIN)
    poller.register(stop_fd, select.POLLIN)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    ms = max(1, int(timeout * 1000))
    taken = written = 0
    res = _Spliced(0)
    try:
        while taken < count and not stop.is_set():
            try:
                n = os.splice(sock_fd, w, min(count - taken, PIPE_SIZE), flags=flags)
            except BlockingIOError:
                if not poller.poll(ms):
                    res.error = FerryTimeout(f"no data from the server for {timeout:g} s")
                    break
                continue
            if n == 0:
                res.eof = True
                break
            taken += n
            while written < taken:  # empty the pipe: the next splice starts from an empty one
                written += os.splice(r, file_fd, taken - written, offset_dst=pos + written)
    except OSError as exc:
        res.error = exc
    res.written = written
    return taken, res


def _hash_range(fd: int, pos: int, n: int, hasher: ChunkHasher, buf: bytearray) -> None:
    """Hash ``n`` bytes of the file at ``pos`` (just written: read back from the page cache)."""
    view = memoryview(buf)
    done = 0
    while done < n:
        k = os.preadv(fd, [view[: n - done]], pos + done)
        if k <= 0:
            raise TransferError("the partial file shrank while it was being written; try again")
        hasher.update(view[:k])
        done += k


class DownloadWriter:
    """Writes and hashes a download's bytes in threads, in file order, in large blocks.

    Pieces that arrive the normal way (:meth:`add`) and raw payloads (:meth:`take_raw`) fill the
    same few recycled buffers; a full buffer is written and hashed in a thread while the next one
    fills, one job at a time (the hasher needs the bytes in order). A buffer is refilled only after
    its job has finished. Small files (``inline``) are written on the loop thread: a thread hop
    would cost more than the write.
    """

    def __init__(self, fd: int, pos: int, hasher: ChunkHasher, *, expect: int, inline: bool = False) -> None:
        self.fd, self.hasher, self.inline = fd, hasher, inline
        #: file position after the last byte accepted (written, being written, or buffered)
        self.pos = pos
        self._size = max(1, min(BUFFER_SIZE, expect))  # a 300 KiB file needs no 4 MiB buffers
        self._free: list[bytearray] = []
        self._allocated = 0
        self._cur: bytearray | None = None
        self._fill = 0
        self._pending: asyncio.Future[None] | None = None
        self._pending_buf: bytearray | None = None
        self._pipe: tuple[int, int] | None = None
        self._scratch: bytearray | None = None

    # --- blocks --------------------------------------------------------------------------------

    def _buffer(self) -> bytearray:
        if self._cur is None:
            if self._free:
                self._cur = self._free.pop()
            else:
                assert self._allocated < BUFFERS, "more buffers in use than allocated"
                self._allocated += 1
                self._cur = bytearray(self._size)
            self._fill = 0
        return self._cur

    def _write_and_hash(self, buf: bytearray, n: int, pos: int) -> None:
        view = memoryview(buf)[:n]
        off, rest = pos, view
        while rest:
            k = os.pwrite(self.fd, rest, off)
            rest, off = rest[k:], off + k
        self.hasher.update(view)

    async def _wait_pending(self) -> None:
        if self._pending is not None:
            await asyncio.shield(self._pending)  # shielded: a cancel must not orphan the thread
            assert self._pending_buf is not None
            self._free.append(self._pending_buf)  # only now may anything write into it again
            self._pending = self._pending_buf = None

    async def _submit(self) -> None:
        """Start the job for the current buffer (after the one in flight has finished)."""
        await self._wait_pending()
        buf, n = self._cur, self._fill
        if buf is None:
            return
        self._cur, self._fill = None, 0
        if not n:
            self._free.append(buf)
            return
        pos = self.pos - n
        self._pending_buf = buf
        self._pending = asyncio.get_running_loop().run_in_executor(None, self._write_and_hash, buf, n, pos)

    # --- the API ---------------------------------------------------------------------------

    async def add(self, data: bytes) -> None:
        """Accept a piece received the normal way."""
        if self.inline:
            off, view = self.pos, memoryview(data)
            while view:
                k = os.pwrite(self.fd, view, off)
                view, off = view[k:], off + k
            self.hasher.update(data)
            self.pos += len(data)
            return
        view = memoryview(data)
        while view:
            buf = self._buffer()
            k = min(len(view), len(buf) - self._fill)
            buf[self._fill : self._fill + k] = view[:k]
            self._fill += k
            self.pos += k
            view = view[k:]
            if self._fill == len(buf):
                await self._submit()

    async def flush(self) -> None:
        """Return once every accepted byte is written and hashed (raises a job's error)."""
        await self._submit()
        await self._wait_pending()

    async def settle(self) -> None:
        """The transfer failed or was given up: wait for the job in flight (its error is moot) and
        write what is still buffered, so that the next ``get`` resumes after every byte received
        (it re-checks them by their chunk hashes anyway)."""
        ok = True
        if self._pending is not None:
            try:
                await asyncio.shield(self._pending)
            except Exception:
                ok = False  # writing on after a failed write would only leave a hole
        if ok and self._cur is not None and self._fill:
            # On the loop thread: it must happen even if this task is being cancelled.
            off, view = self.pos - self._fill, memoryview(self._cur)[: self._fill]
            with contextlib.suppress(OSError):
                while view:
                    k = os.pwrite(self.fd, view, off)
                    view, off = view[k:], off + k
            self._fill = 0

    def close(self) -> None:
        """Release the splice pipe (after :meth:`settle`: no job uses it any more)."""
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    async def take_raw(self, ev: RawPayload, timeout: float, progress: Callable[[int], None] | None = None) -> int:
        """Take ``ev``'s bytes (see the module docstring); returns how many were taken.

        Fewer than ``ev.nbytes`` only when the connection ended or broke (the reader task then
        reports why). Raises :class:`FerryTimeout` if the server sends nothing for ``timeout`` s.
        """
        src = ev.stream.splice_source() if os.environ.get(NO_SPLICE_ENV) != "1" else None
        if src is not None and not self.inline:
            await self.flush()  # the hasher must see the buffered bytes before the spliced ones
            return await self._take_spliced(ev, src, timeout, progress)
        return await self._take_buffered(ev, timeout, progress)

    async def _take_buffered(
        self, ev: RawPayload, timeout: float, progress: Callable[[int], None] | None
    ) -> int:
        total = 0
        stream = ev.stream
        while stream.raw_left:
            if self.inline:  # tiny: through a temporary buffer
                tmp = bytearray(stream.raw_left)
                n = await self._readinto(stream, memoryview(tmp), timeout)
                await self.add(bytes(tmp[:n]))
            else:
                buf = self._buffer()
                n = await self._readinto(stream, memoryview(buf)[self._fill :], timeout)
                self._fill += n
                self.pos += n
                if self._fill == len(buf):
                    await self._submit()
            if n == 0:
                break
            total += n
            if progress is not None:
                progress(n)
        return total

    @staticmethod
    async def _readinto(stream: ClientStream, view: memoryview, timeout: float) -> int:
        try:
            async with asyncio.timeout(timeout):
                return await stream.readinto(view)
        except TimeoutError as exc:
            raise FerryTimeout(f"no data from the server for {timeout:g} s") from exc
        except (OSError, ssl.SSLError) as exc:
            raise ConnectionBroken(f"connection to the server lost: {exc}") from exc

    def _pipe_fds(self) -> tuple[int, int]:
        if self._pipe is None:
            r, w = os.pipe2(os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # a smaller pipe only means more system calls
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            self._pipe = (r, w)
        return self._pipe

    async def _take_spliced(
        self,
        ev: RawPayload,
        src: tuple[int, int],
        timeout: float,
        progress: Callable[[int], None] | None,
    ) -> int:
        loop = asyncio.get_running_loop()
        sock_fd, stop_fd = src
        pipe = self._pipe_fds()
        if self._scratch is None:
            self._scratch = bytearray(SPLICE_BLOCK)
        fd, hasher, scratch = self.fd, self.hasher, self._scratch
        stream = ev.stream
        total = 0
        hashing: asyncio.Future[None] | None = None
        try:
            while stream.raw_left:
                pos, count = self.pos, min(SPLICE_BLOCK, stream.raw_left)

                def job(stop: threading.Event, pos: int = pos, count: int = count) -> tuple[int, _Spliced]:
                    return splice_to_file(sock_fd, stop_fd, pipe, fd, pos, count, timeout, stop)

                res = await stream.run_raw_job(job)
                # Hash one block behind: this block's hash overlaps the next block's splice.
                if hashing is not None:
                    await asyncio.shield(hashing)
                    hashing = None
                if res.written:
                    self.pos += res.written
                    total += res.written
                    hashing = loop.run_in_executor(None, _hash_range, fd, pos, res.written, hasher, scratch)
                    if progress is not None:
                        progress(res.written)
                if res.error is not None:
                    if isinstance(res.error, FerryTimeout):
                        raise res.error
                    if isinstance(res.error, ConnectionError):
                        raise ConnectionBroken(f"connection to the server lost: {res.error}") from res.error
                    raise TransferError(f"cannot write the download: {res.error}") from res.error
                if res.eof or res.written < count:
                    break  # the connection ended (or the job was stopped): the reader says why
            if hashing is not None:
                await asyncio.shield(hashing)
                hashing = None
        finally:
            if hashing is not None:  # its thread must not read the fd after it is closed
                with contextlib.suppress(Exception):
                    await asyncio.shield(hashing)
        return total
