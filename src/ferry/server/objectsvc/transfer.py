"""Downloads and uploads on the object backend: the wire behaviour of :mod:`ferry.server.transfer`
(same messages, same replies, same resume rules) over :class:`~ferry.store.objects.ObjectStorage`'s
4 MiB BLAKE3 chunks.

Download (``GetFile``): the file's chunk list is read in one transaction (a snapshot: a file replaced
meanwhile stays readable for the sweeper's grace period, so there is no "changed" case), then its
chunks are fetched from the store up to :data:`PREFETCH` ahead of the one being sent, so the store's
latency overlaps the network. Every chunk is verified against its BLAKE3 hash before a byte of it is
sent: a missing or damaged object ends the download with ``corrupt`` and the client's copy never
gets its final name. When the client asks for the stored parameters (BLAKE3, 4 MiB chunks) the
stored chunk hashes *are* the transfer's: nothing is hashed again; other parameters are hashed
while the data streams (in a thread, one block behind the network).

Upload (``PutFile``): ``open_upload`` starts or resumes the upload by ``(path, token)`` through any
server, checking the quota (across servers) and the target before any data is sent. ``PutReady``
offers the chunks already stored for it (when the client uses the stored parameters: its hashes
can then be compared with them), the client continues after the ones it also has, and the data is
cut into :data:`~ferry.store.api.CHUNK_SIZE` pieces, each written by ``write_chunk`` with up to
:data:`WRITES` in flight (hashing, the store and the network overlap). ``FileEnd``: every chunk
hash and the digest are compared (a mismatch discards the upload: nothing is kept), then
``commit_upload`` makes the file in one transaction. A stopped upload (cancel, connection lost,
idle) keeps its stored chunks for a resume through any server, unless the server chose its token.
Small files travel inline in ``PutFile`` (``store_small``).

A streamed upload (size unknown in advance, e.g. ``ferry put -``) starts as an upload of 0 bytes and
grows before each chunk is written (``open_upload`` again with the larger size, which checks the
quota across servers): the quota stops it while the data comes, as on the folder backend.

Each operation logs one line with its bytes and seconds (:meth:`Service.log_op`), which is what a
benchmark reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

from ferry.errors import IntegrityError
from ferry.fskit import TOKEN_RE
from ferry.hashing import ChunkHasher, HashName, matching_prefix, tree_digest
from ferry.server.objectsvc.files import ObjectService
from ferry.server.openlimits import Hold, Kind
from ferry.server.pathrules import parse_path
from ferry.server.service import Handler, ServiceHost
from ferry.server.work import start_thread
from ferry.store.api import CHUNK_SIZE, ChunkRef
from ferry.wire import Data, RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.store.api import Upload as StoredUpload
    from ferry.store.objects import ObjectStorage

#: Files up to this size are read, hashed and sent in one step (as the folder backend does).
SMALL: Final = 1 << 18
#: Bytes per data frame of a download (as the folder backend's TLS path): the transport's buffer
#: drains between frames, so a chunk in memory is not also copied whole into the transport's.
BLOCK: Final = 1 << 20
#: Chunks a download reads ahead of the one being sent (each up to 4 MiB in memory): enough to keep
#: the network busy across the store's latency, few enough to bound memory per download.
PREFETCH: Final = 3
#: Chunk writes in flight per upload (each holds its 4 MiB): the store's latency and its CPU
#: (SeaweedFS: ~45 ms per 4 MiB put) overlap the network and the next chunk's hashing.
WRITES: Final = 3


def stored_parameters(hash: HashName, chunk_size: int) -> bool:
    """True when a transfer's hash and chunk size are the store's (BLAKE3, 4 MiB): its chunk hashes
    are then the stored ones."""
    return hash == "blake3" and chunk_size == CHUNK_SIZE


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark a finished future's exception as retrieved (a job nobody awaits any more must not be
    logged as an unhandled error when it is collected)."""
    if not fut.cancelled():
        fut.exception()


# --- download ------------------------------------------------------------------------------


class _ChunkReader:
    """Reads a file's chunks in order, up to ``depth`` requests ahead of the one consumed."""

    def __init__(self, storage: ObjectStorage, chunks: Sequence[ChunkRef], first: int, depth: int) -> None:
        self._storage = storage
        self._chunks = chunks
        self._next = first
        self._depth = depth
        self._ahead: deque[asyncio.Task[bytes]] = deque()

    def _fill(self) -> None:
        while len(self._ahead) < self._depth and self._next < len(self._chunks):
            ref = self._chunks[self._next]
            self._ahead.append(asyncio.ensure_future(self._storage.read_chunk(ref)))
            self._next += 1

    async def next(self) -> bytes:
        """The next chunk's bytes (verified by the store); raises ``corrupt`` for a bad one."""
        self._fill()
        task = self._ahead.popleft()
        self._fill()  # the next request starts before this one is awaited
        return await task

    async def close(self) -> None:
        """Stop the reads still running (their results are not needed)."""
        ahead, self._ahead = list(self._ahead), deque()
        for task in ahead:
            task.cancel()
        if ahead:
            await asyncio.gather(*ahead, return_exceptions=True)


async def _hash_range(
    storage: ObjectStorage, chunks: Sequence[ChunkRef], hash: HashName, chunk_size: int, end: int
) -> list[bytes]:
    """Hashes (``hash``, ``chunk_size``) of the whole chunks in bytes [0, ``end``) of the file: what a
    resume with parameters other than the store's compares (``end`` is a multiple of ``chunk_size``)."""
    hasher = ChunkHasher(hash, chunk_size)
    reader = _ChunkReader(storage, chunks, 0, PREFETCH)
    pos = 0
    try:
        while pos < end:
            data = await reader.next()
            piece = memoryview(data)[: end - pos]
            await asyncio.shield(start_thread(hasher.update, piece))
            pos += len(piece)
    finally:
        await reader.close()
    return hasher.chunk_hashes[: end // chunk_size]


async def handle_get(svc: ObjectTransferService, msg: m.GetFile) -> None:
    """Stream a file to the client (resuming after the chunks it proves it has)."""
    try:
        with svc.hold(Kind.DOWNLOAD):  # busy when the user has too many downloads open
            await _serve_get(svc, msg)
    finally:
        svc.requests.download_done(msg.id)


async def _serve_get(svc: ObjectTransferService, msg: m.GetFile) -> None:
    t0 = time.monotonic()
    storage = svc.storage
    opened = await storage.open_file(svc.user.name, parse_path(msg.path))
    node, chunks = opened.node, opened.chunks
    size, chunk = node.size, msg.chunk_size
    # The stored hashes are the transfer's only if every chunk is listed (an empty file may be
    # stored with one empty chunk or none: then hash, it costs nothing).
    same = stored_parameters(msg.hash, chunk) and sum(c.size for c in chunks) == size and bool(chunks)
    if size <= SMALL and not msg.chunk_hashes:
        await _get_small(svc, msg, chunks, size, node.mtime, node.mode, same, t0)
        return
    offset, prefix = 0, list[bytes]()
    if msg.chunk_hashes:
        n = min(len(msg.chunk_hashes), size // chunk)  # only whole chunks can be resumed
        if same:
            ours = [c.hash for c in chunks[:n]]
        else:
            ours = await _hash_range(storage, chunks, msg.hash, chunk, n * chunk)
        k = matching_prefix(ours, msg.chunk_hashes[:n])
        offset, prefix = k * chunk, ours[:k]
    await svc.send(
        m.FileInfo(
            id=msg.id, size=size, mtime=m.wire_time(node.mtime), mode=node.mode & 0o7777, offset=offset
        )
    )
    hasher = None if same else ChunkHasher(msg.hash, chunk, prefix=prefix)
    hashing: asyncio.Future[Any] | None = None  # the hash of the block sent before this one
    first, skip = divmod(offset, CHUNK_SIZE)
    reader = _ChunkReader(storage, chunks, first, PREFETCH)
    try:
        for _ in range(first, len(chunks)):
            if msg.id in svc.requests.cancelled:
                await svc.send(ErrorCode.CANCELLED.reply(msg.id, "download cancelled"))
                svc.requests.cancelled.discard(msg.id)
                svc.log_op("get", msg.path, t0, "cancelled")
                return
            data = await reader.next()
            view = memoryview(data)[skip:]
            skip = 0
            if hasher is not None:
                if hashing is not None:
                    await asyncio.shield(hashing)
                # In a thread (hashlib and blake3 release the GIL), while this block is sent.
                hashing = start_thread(hasher.update, view)
            for pos in range(0, len(view), BLOCK):
                await svc.send_data(msg.id, m.STDOUT, view[pos : pos + BLOCK])
        if hashing is not None:
            await asyncio.shield(hashing)
    finally:
        if hashing is not None:  # (it only touches its own bytes: a running one may finish later)
            if hashing.done():
                _retrieve(hashing)
            else:
                hashing.add_done_callback(_retrieve)
        await reader.close()
    if hasher is None:
        hashes = [c.hash for c in chunks]
    else:
        hashes, _ = hasher.finish()
    await svc.send(
        m.FileEnd(id=msg.id, size=size, chunk_hashes=hashes, digest=tree_digest(msg.hash, size, hashes))
    )
    svc.log_op("get", msg.path, t0, "ok" if not offset else f"ok resumed-at={offset}", size - offset)


async def _get_small(
    svc: ObjectTransferService,
    msg: m.GetFile,
    chunks: Sequence[ChunkRef],
    size: int,
    mtime: float,
    mode: int,
    same: bool,
    t0: float,
) -> None:
    """A file of at most one chunk: read (verified), then its info, data and end in one write."""
    data = b"".join([await svc.storage.read_chunk(ref) for ref in chunks])
    if same:
        hashes = [c.hash for c in chunks]
        digest = tree_digest("blake3", size, hashes)
    else:
        hasher = ChunkHasher(msg.hash, msg.chunk_size)
        hasher.update(data)
        hashes, digest = hasher.finish()
    conn = svc.host.conn
    frames = [conn.send(m.FileInfo(id=msg.id, size=size, mtime=m.wire_time(mtime), mode=mode & 0o7777))]
    if data:
        frames += [conn.data_header(msg.id, m.STDOUT, len(data)), data]
    frames.append(conn.send(m.FileEnd(id=msg.id, size=size, chunk_hashes=hashes, digest=digest)))
    await svc.host.write_frames(frames)
    svc.log_op("get", msg.path, t0, nbytes=size)


# --- upload --------------------------------------------------------------------------------


@dataclass
class ObjectUpload:
    """An upload in progress: the stored upload, the chunk being filled and the writes in flight.
    Implements :class:`ferry.server.service.Upload` (the idle timeout) and ``Channel``."""

    svc: ObjectTransferService
    msg: m.PutFile
    stored: StoredUpload
    #: the chunk hashes offered to the client in PutReady (stored chunks; empty for other parameters)
    offered: list[bytes]
    hold: Hold | None
    t0: float
    same: bool  #: the client hashes with the store's parameters (see stored_parameters)
    started: bool = False
    pos: int = 0  #: bytes of the file received or resumed (the next byte's offset)
    resumed: int = 0  #: the offset the client continued from
    #: hashes of the stored chunks by index, from the resume point (filled as writes finish)
    written: dict[int, bytes] = field(default_factory=dict)
    hasher: ChunkHasher | None = None  #: the client's parameters, when they are not the store's
    active_at: float = 0.0  #: the session's read_waited() at this upload's last sign of life
    closed: bool = False
    _next: int = 0  #: index of the chunk being filled
    _buf: list[bytes | memoryview] = field(default_factory=list)
    _buffered: int = 0
    #: the chunk writes in flight, oldest first: (chunk index, write)
    _writes: deque[tuple[int, asyncio.Task[ChunkRef]]] = field(default_factory=deque)
    _hashing: asyncio.Future[Any] | None = None

    def start(self, offset: int) -> None:
        """Continue from ``offset`` (a chunk boundary within what was offered)."""
        self.active_at = self.svc.host.read_waited()
        if self.started:
            raise RemoteProtocolError("put_from sent twice for one upload")
        chunk = self.msg.chunk_size
        if offset % chunk or offset // chunk > len(self.offered) or offset > self.msg.size:
            raise RemoteProtocolError(f"bad resume offset {offset}")
        # Offered hashes exist only for the store's parameters: the offset is a stored chunk's start.
        self._next = offset // CHUNK_SIZE
        self.pos = self.resumed = offset
        if not self.same:
            self.hasher = ChunkHasher(self.msg.hash, chunk)
        self.started = True

    async def on_data(self, ev: Data) -> None:
        """Take a piece of data; a full chunk goes to the store (with a bounded number in flight)."""
        if not self.started:
            raise RemoteProtocolError("upload data before put_from")
        self.active_at = self.svc.host.read_waited()
        size = len(ev.data)
        if not self.msg.streamed and self.pos + size > self.msg.size:
            raise RemoteProtocolError(f"more data than the announced {self.msg.size} bytes")
        self.pos += size
        if self._buffered + size < CHUNK_SIZE:  # the common case: a piece of the chunk being filled
            self._buf.append(ev.data)
            self._buffered += size
            return
        view = memoryview(ev.data)
        while view:
            take = min(len(view), CHUNK_SIZE - self._buffered)
            self._buf.append(view[:take])
            self._buffered += take
            view = view[take:]
            if self._buffered == CHUNK_SIZE:
                await self._submit()

    async def _submit(self) -> None:
        """Hand the chunk being filled to the store; waits while :data:`WRITES` are in flight."""
        first = self._buf[0] if self._buf else b""
        piece = first if len(self._buf) == 1 and isinstance(first, bytes) else b"".join(self._buf)
        self._buf, self._buffered = [], 0
        index, self._next = self._next, self._next + 1
        if self.msg.streamed:
            await self._grow(index * CHUNK_SIZE + len(piece))
        if self.hasher is not None:
            if self._hashing is not None:
                await asyncio.shield(self._hashing)  # in order: one hash job at a time
            self._hashing = start_thread(self.hasher.update, piece)
        task = asyncio.ensure_future(self.svc.storage.write_chunk(self.stored, index, piece))
        self._writes.append((index, task))
        while len(self._writes) >= WRITES:
            await self._settle_one()

    async def _grow(self, size: int) -> None:
        """A streamed upload is to hold ``size`` bytes: record that size (the quota checked across
        servers, the target again) before its chunk is written."""
        if size <= self.stored.size:
            return
        up, user = self.stored, self.svc.user
        # The same (path, token): the stored upload and its chunks stay, its size grows.
        self.stored = await self.svc.storage.open_upload(
            user.name,
            up.path,
            token=up.token,
            size=size,
            mode=up.mode,
            mtime=up.mtime,
            overwrite=self.msg.overwrite,
            quota=user.quota,
        )

    async def _settle_one(self) -> None:
        index, task = self._writes[0]
        try:
            ref = await asyncio.shield(task)  # a cancelled wait must not cancel a write half-way
        finally:
            if task.done() and self._writes and self._writes[0][1] is task:
                self._writes.popleft()
        self.written[index] = ref.hash

    async def _settle(self) -> None:
        """Wait for every write and the hash job (re-raising the first error)."""
        while self._writes:
            await self._settle_one()
        if self._hashing is not None:
            await asyncio.shield(self._hashing)

    def working(self) -> bool:
        """A write is in flight (see :class:`ferry.server.service.Upload`)."""
        return any(not t.done() for _, t in self._writes)

    async def finish(self, end: m.FileEnd) -> int:
        """Write the last chunk, verify everything and commit; returns the size replaced."""
        if not self.started:
            raise RemoteProtocolError("file_end before put_from")
        msg = self.msg
        size = end.size if msg.streamed else msg.size  # streamed: the size is known only now
        if self.pos != size or end.size != size:
            raise ErrorCode.INTEGRITY.error(
                f"{msg.path}: received {self.pos} bytes, expected {size}; nothing was kept"
            )
        if self._buffered or (size == 0 and self._next == 0):
            await self._submit()  # the last, short chunk (an empty file is one empty chunk)
        await self._settle()
        first = self.resumed // CHUNK_SIZE
        stored = self.offered[:first] + [self.written[i] for i in range(first, self._next)]
        if self.hasher is None:
            hashes, digest = stored, tree_digest("blake3", size, stored)
        else:
            hashes, digest = self.hasher.finish()
        if hashes != end.chunk_hashes or digest != end.digest:
            bad = matching_prefix(hashes, end.chunk_hashes)
            raise ErrorCode.INTEGRITY.error(
                f"{msg.path}: chunk {bad} does not match the sender's hash; nothing was kept"
            )
        user = self.svc.user
        return await self.svc.storage.commit_upload(
            self.stored,
            digest=tree_digest("blake3", size, stored),
            overwrite=msg.overwrite,
            quota=user.quota,
        )

    async def expire(self, timeout: float) -> m.Error:
        """No data for ``timeout`` seconds: stop as an abort would (a resumable upload keeps its stored
        chunks), drop what still comes for it, and say so (ferry.server.service.Upload)."""
        self.svc.failed.add(self.msg.id)
        await self.abort()
        kept = (
            "its stored chunks are kept: the same put resumes where it stopped"
            if self.msg.token
            else "nothing was kept"
        )
        self.svc.ctx.log.info(
            "put user=%s path=%s: no data for %.0f s: upload closed (%d bytes received)",
            self.svc.user.name,
            self.msg.path,
            timeout,
            self.pos - self.resumed,
        )
        return ErrorCode.CANCELLED.reply(
            self.msg.id,
            f"{self.msg.path}: no data for {timeout:g} s, so the server closed this upload; {kept}",
        )

    async def abort(self) -> None:
        """Cancelled, or the connection is lost: let the writes in flight finish (what they store
        counts for a resume), keep the upload for a resume unless the server chose its token."""
        with contextlib.suppress(Exception):
            await self._settle()
        await self.stop(keep=bool(self.msg.token))

    async def stop(self, *, keep: bool) -> None:
        """End this upload: wait for its writes (errors dropped), discard it unless ``keep``, release
        its place among the user's open uploads."""
        try:
            while self._writes:
                _, task = self._writes.popleft()
                with contextlib.suppress(Exception):
                    await asyncio.shield(task)
            if self._hashing is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._hashing)
            if not keep:
                with contextlib.suppress(Exception):  # (the database away: the sweeper removes it)
                    await self.svc.storage.discard_upload(self.stored)
        finally:
            self.close()

    def close(self) -> None:
        """Release the upload's place among the user's open uploads (once)."""
        if not self.closed:
            self.closed = True
            if self.hold is not None:
                self.hold.release()


async def handle_put(svc: ObjectTransferService, msg: m.PutFile) -> None:
    """Start an upload (or store a small inline file at once)."""
    if msg.streamed and (msg.token or msg.data is not None or msg.size):
        raise RemoteProtocolError("a streamed upload has no size, token or inline data")
    if msg.data is not None:
        await _put_inline(svc, msg)
        return
    token = msg.token or secrets.token_hex(8)
    if not TOKEN_RE.fullmatch(token):
        raise RemoteProtocolError("bad upload token")
    svc.requests.check_id_free(msg.id)
    svc.failed.discard(msg.id)  # an id the client reuses after a failed upload names this one now
    cap = svc.ctx.limits.max_uploads
    if sum(isinstance(c, ObjectUpload) for c in svc.channels.values()) >= cap:
        raise ErrorCode.BUSY.error(
            f"too many unfinished uploads on this connection (at most {cap}); finish some first"
        )
    t0 = time.monotonic()
    place = svc.hold(Kind.UPLOAD)  # busy when the user has too many uploads open
    try:
        user = svc.user
        # Checks the target (exists, a folder) and the quota across servers now: before any data
        # (a streamed upload starts at 0 bytes and grows: ObjectUpload._grow).
        stored = await svc.storage.open_upload(
            user.name,
            parse_path(msg.path),
            token=token,
            size=msg.size,
            mode=msg.mode,
            mtime=msg.mtime,
            overwrite=msg.overwrite,
            quota=user.quota,
        )
    except BaseException:
        place.release()
        raise
    same = stored_parameters(msg.hash, msg.chunk_size)
    # Only whole chunks are offered (as the folder backend does); other parameters start at 0.
    offered = [ref.hash for ref in stored.held[: msg.size // CHUNK_SIZE]] if same and msg.token else []
    up = ObjectUpload(svc, msg, stored, offered, place, t0, same)
    up.active_at = svc.host.read_waited()  # its idle clock starts when it may receive data
    svc.channels[msg.id] = up
    await svc.send(m.PutReady(id=msg.id, chunk_hashes=offered))


async def _put_inline(svc: ObjectTransferService, msg: m.PutFile) -> None:
    t0 = time.monotonic()
    data = msg.data or b""
    hasher = ChunkHasher(msg.hash, msg.chunk_size)
    hasher.update(data)
    _, digest = hasher.finish()
    if len(data) != msg.size or (msg.digest and digest != msg.digest):
        raise ErrorCode.INTEGRITY.error(
            f"{msg.path}: inline data does not match its size or hash; nothing was kept"
        )
    user = svc.user
    await svc.storage.store_small(
        user.name,
        parse_path(msg.path),
        data,
        mode=msg.mode,
        mtime=msg.mtime,
        overwrite=msg.overwrite,
        quota=user.quota,
    )
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("put", msg.path, t0, nbytes=len(data))


def _upload(svc: ObjectTransferService, req_id: int) -> ObjectUpload:
    up = svc.channels.get(req_id)
    if not isinstance(up, ObjectUpload):
        raise RemoteProtocolError(f"no upload in progress with id {req_id}")
    return up


async def handle_put_from(svc: ObjectTransferService, msg: m.PutFrom) -> None:
    """The client chose where to continue."""
    if msg.id in svc.failed:
        return  # closed by the server meanwhile (idle): the client has its Error, or will soon
    _upload(svc, msg.id).start(msg.offset)


async def handle_put_end(svc: ObjectTransferService, msg: m.FileEnd) -> None:
    """Verify and commit an upload; reply Ok or an Error (an integrity error discards it)."""
    if msg.id in svc.failed:
        svc.failed.discard(msg.id)
        return
    up = _upload(svc, msg.id)
    del svc.channels[msg.id]
    received = up.pos - up.resumed
    try:
        await up.finish(msg)
    except IntegrityError:
        await up.stop(keep=False)
        svc.log_op("put", up.msg.path, up.t0, "integrity-error", received)
        raise
    except BaseException:
        # Kept for a resume (e.g. the store away, the quota at the commit) unless nobody can resume it.
        await asyncio.shield(up.stop(keep=bool(up.msg.token)))
        raise
    up.close()
    await svc.send(m.Ok(id=msg.id))
    result = "ok" if not up.resumed else f"ok resumed-at={up.resumed}"
    svc.log_op("put", up.msg.path, up.t0, result, received)


class ObjectTransferService(ObjectService):
    """Downloads and uploads on the object backend; owns the ids of uploads that failed mid-stream
    and the clean-up of uploads the session failed (:class:`~ferry.server.service.FailsUploads`)."""

    worker_handlers: ClassVar[dict[type[m.Message], Handler]] = {m.GetFile: handle_get}
    reader_handlers: ClassVar[dict[type[m.Message], Handler]] = {
        m.PutFile: handle_put,
        m.PutFrom: handle_put_from,
        m.FileEnd: handle_put_end,
    }

    def __init__(self, host: ServiceHost, storage: ObjectStorage) -> None:
        super().__init__(host, storage)
        #: ids of uploads that failed mid-stream (their remaining data and FileEnd are dropped)
        self.failed: set[int] = set()
        #: clean-ups of failed uploads still running (awaited when the session ends)
        self._stopping: set[asyncio.Task[None]] = set()

    def fail_upload(self, req_id: int) -> None:
        """An upload's data could not be stored (the store or the database away): stop it, keep its
        stored chunks for a resume if the client can resume it, and ignore what still comes for it."""
        up = self.channels.pop(req_id, None)
        self.failed.add(req_id)
        if isinstance(up, ObjectUpload):
            task = asyncio.ensure_future(up.stop(keep=bool(up.msg.token)))
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """The session ends: wait for the clean-ups of failed uploads."""
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
