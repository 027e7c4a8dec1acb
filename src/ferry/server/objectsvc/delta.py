"""Delta transfers on the object backend (``GetChunks``, ``DeltaPut``, ``DeltaData``, ``DeltaGet``,
``Chunks``): the wire behaviour of :mod:`ferry.server.delta`, with files read from and written to
:class:`~ferry.store.objects.ObjectStorage`.

Two chunkings meet here. Stored files are lists of fixed :data:`~ferry.store.api.CHUNK_SIZE` (4 MiB)
BLAKE3 pieces; delta transfers describe files by content-defined chunks (:mod:`ferry.cdc`, ~64 KiB).
So:

- **The chunk index** of a stored file is the one ``sync -c`` uses
  (:func:`~ferry.server.objectsvc.chunkio.content_index`): its pieces streamed through the CDC
  chunker (bounded memory), cached in the server's :class:`~ferry.server.context.HashCache` under
  the owner and the file's stored digest, which names its content exactly (no stat key can go
  stale: a stored file never changes in place). A committed delta upload caches the new version's
  index at once.
- **A delta upload** (``DeltaPut``) is assembled by the same :class:`~ferry.delta.Assembler` as on
  the folder backend, reading copied chunks from the old file's stored pieces (each verified by
  :meth:`~ferry.store.objects.ObjectStorage.read_chunk`) and writing the new version as an ordinary
  upload of the store (``open_upload``, ``write_chunk`` per 4 MiB piece, ``commit_upload`` with the
  stored digest): atomic (readers see the old file or the new one), counted against the quota
  across servers, and resumable as a whole-file upload is — an interrupted delta upload stays as a
  partial upload under its token, and pieces already stored are not written to the store again
  (per-user de-duplication). Copies of the old file are taken by reference
  (:class:`~ferry.delta.RangeSink`): a 4 MiB piece of the new version that *is* a stored piece of
  the old one at the same place (everything before an insertion, everything but the changed piece
  of an edit in place) is linked to the upload in one statement, never read, hashed or written;
  only pieces that mix old and new bytes, or whose old bytes moved, are assembled and stored.
- **A delta download** (``DeltaGet``) runs the :class:`~ferry.delta.DeltaEncoder` over the stored
  pieces; with the file's index in the cache, only the pieces holding chunks the client lacks are
  fetched.

The CDC code is blocking and runs in the session's file pool; the store is asynchronous and lives
on the event loop. :class:`Bridge` joins them: a worker thread asks the loop to fetch or write a
piece and waits for it, giving up when the transfer is stopped or the session ends.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

from ferry import cdc
from ferry.aio import close_after, settle
from ferry.delta import Assembler, BasisFile, DeltaEncoder, basis_id
from ferry.hashing import tree_digest
from ferry.server import work
from ferry.server.delta import TOKEN, DeltaSend, DeltaTransfer, admit, changed_error, handle_chunks
from ferry.server.objectsvc.chunkio import content_index, index_key
from ferry.server.objectsvc.files import ObjectService
from ferry.server.openlimits import Hold, Kind
from ferry.server.pathrules import parse_path
from ferry.server.service import Handler, ServiceHost
from ferry.store.api import CHUNK_SIZE, ChunkRef, FileChunks, Node, Upload
from ferry.wire import Data, RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.store.objects import ObjectStorage

T = TypeVar("T")

#: Seconds a worker thread waits for the loop before it looks whether it should stop.
_POLL: Final = 0.25
#: Pieces of a new version being written to the store at once (each holds 4 MiB).
_WRITES_IN_FLIGHT: Final = 2


class Bridge:
    """Runs store coroutines on the event loop for a worker thread, which waits for them; a wait
    ends with :class:`~ferry.server.work.SessionClosed` once :meth:`stop` was called or the session
    ended (the thread must not outlive the transfer it works for)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._work = work.current.get()
        self._stopped = threading.Event()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop (from a worker thread)."""
        if self._stopped.is_set():
            coro.close()
            raise work.SessionClosed("the transfer was stopped")
        try:
            return asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError as exc:  # the loop is closed: the server is stopping
            coro.close()
            raise work.SessionClosed("the server is stopping") from exc

    def wait(self, fut: concurrent.futures.Future[T]) -> T:
        """The result of ``fut`` (from a worker thread)."""
        while True:
            try:
                return fut.result(timeout=_POLL)
            except concurrent.futures.TimeoutError:
                if self._stopped.is_set() or self._work.closed:
                    fut.cancel()
                    raise work.SessionClosed("the transfer was stopped") from None

    def stop(self) -> None:
        """Make the thread's current and next waits fail (from the loop; idempotent)."""
        self._stopped.set()


class StoredFile:
    """A stored file as a :class:`ferry.cdc.Source` for a worker thread: reads are served from its
    verified pieces, fetched by the loop. Holds the piece being read and, when reading goes
    forward piece by piece, the next one (fetched ahead): at most two pieces of memory."""

    def __init__(
        self, storage: ObjectStorage, chunks: tuple[ChunkRef, ...], size: int, bridge: Bridge
    ) -> None:
        self._storage = storage
        #: its stored pieces, in order
        self.refs = chunks
        self.size = size
        self._bridge = bridge
        self._index = -1
        self._data = b""
        self._ahead: dict[int, concurrent.futures.Future[bytes]] = {}

    def preadv(self, buffers: list[memoryview], offset: int) -> int:
        """Fill ``buffers`` from ``offset`` (fewer bytes only at the end of the file)."""
        total = 0
        for buf in buffers:
            view = buf
            while view and offset < self.size:
                k = offset // CHUNK_SIZE
                data = self._piece(k)
                start = offset - k * CHUNK_SIZE
                n = min(len(view), len(data) - start)
                if n <= 0:  # the chunk list does not add up to the size: a damaged record
                    raise ErrorCode.CORRUPT.error(f"stored piece {k} is shorter than the file's size says")
                view[:n] = data[start : start + n]
                view = view[n:]
                offset += n
                total += n
        return total

    def _piece(self, k: int) -> bytes:
        if k == self._index:
            return self._data
        if k >= len(self.refs):
            raise ErrorCode.CORRUPT.error(f"stored piece {k} is missing from the file's chunk list")
        forward = k == self._index + 1
        fut = self._ahead.pop(k, None)
        for stale in self._ahead.values():
            stale.cancel()
        self._ahead.clear()
        if fut is None:
            fut = self._bridge.submit(self._storage.read_chunk(self.refs[k]))
        self._data = b""  # (the old piece goes before the new one arrives)
        self._data = self._bridge.wait(fut)
        self._index = k
        if forward and k + 1 < len(self.refs):
            self._ahead[k + 1] = self._bridge.submit(self._storage.read_chunk(self.refs[k + 1]))
        return self._data

    def close(self) -> None:
        """Drop what is held and fetched ahead."""
        for fut in self._ahead.values():
            fut.cancel()
        self._ahead.clear()
        self._data = b""


class UploadSink:
    """The new version as a :class:`~ferry.delta.RangeSink`, cut into :data:`CHUNK_SIZE` pieces.

    A piece that is exactly a stored piece of the old version at the same place (copies of it by
    reference, :attr:`~ferry.delta.BasisFile.trusted`) is *linked*: one database statement, no read
    and no write of its object. Any other piece is assembled (copied ranges read from the old
    version's verified pieces) and stored with ``write_chunk`` while the next one is assembled; at
    most :data:`_WRITES_IN_FLIGHT` pieces are in flight. :attr:`refs` are the stored pieces in order
    once :meth:`close` returned; :attr:`reused` counts the linked ones.
    """

    def __init__(
        self, storage: ObjectStorage, upload: Upload, bridge: Bridge, basis: StoredFile | None
    ) -> None:
        self._storage = storage
        self._upload = upload
        self._bridge = bridge
        self._basis = basis
        #: the piece being assembled: literal bytes, and ranges (start, length) of the old version
        self._parts: list[bytes | tuple[int, int]] = []
        self._fill = 0
        self._next = 0  # the index of the next piece
        self.pos = 0
        #: pieces in flight: index, the ranges a link stands for (to write them if it fails), result
        self._writing: collections.deque[
            tuple[int, list[bytes | tuple[int, int]] | None, concurrent.futures.Future[ChunkRef | None]]
        ] = collections.deque()
        self.refs: list[ChunkRef] = []
        self.reused = 0

    def pwrite(self, data: memoryview, offset: int) -> int:
        """Take literal bytes (written in order); store each piece that is complete."""
        self._check(offset)
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK_SIZE - self._fill)
            self._parts.append(bytes(view[:take]))
            view = view[take:]
            self._advance(take)
        return len(data)

    def copy(self, basis: int, start: int, length: int, offset: int) -> None:
        """Take bytes ``[start, start + length)`` of the old version by reference (the one basis)."""
        self._check(offset)
        if basis != 0 or self._basis is None or start + length > self._basis.size:
            raise ValueError(f"a copy of bytes {start}..{start + length} of basis {basis}")
        while length:
            take = min(length, CHUNK_SIZE - self._fill)
            last = self._parts[-1] if self._parts else None
            if isinstance(last, tuple) and last[0] + last[1] == start:
                self._parts[-1] = (last[0], last[1] + take)
            else:
                self._parts.append((start, take))
            start += take
            length -= take
            self._advance(take)

    def _check(self, offset: int) -> None:
        if offset != self.pos:
            raise ValueError(f"the new version is written in order (at {self.pos}, not {offset})")

    def _advance(self, n: int) -> None:
        self._fill += n
        self.pos += n
        if self._fill == CHUNK_SIZE:
            self._flush()

    def _flush(self) -> None:
        """Store (or link) the piece assembled so far."""
        parts, self._parts, self._fill = self._parts, [], 0
        index = self._next
        self._next += 1
        while len(self._writing) >= _WRITES_IN_FLIGHT:
            self._settle()
        same = self._stored_piece(parts)
        if same is not None:
            fut: concurrent.futures.Future[ChunkRef | None] = self._bridge.submit(
                self._storage.link_chunk(self._upload, index, same)
            )
            self._writing.append((index, parts, fut))
        else:
            data = self._materialize(parts)
            self._writing.append((index, None, self._bridge.submit(self._write(index, data))))

    async def _write(self, index: int, data: bytes) -> ChunkRef | None:
        return await self._storage.write_chunk(self._upload, index, data)

    def _stored_piece(self, parts: list[bytes | tuple[int, int]]) -> ChunkRef | None:
        """The old version's stored piece that ``parts`` are exactly (one range starting at a piece
        boundary, as long as that piece), if any."""
        if self._basis is None or len(parts) != 1 or not isinstance(parts[0], tuple):
            return None
        start, length = parts[0]
        if start % CHUNK_SIZE:
            return None
        ref = self._basis.refs[start // CHUNK_SIZE]
        return ref if ref.size == length else None

    def _materialize(self, parts: list[bytes | tuple[int, int]]) -> bytes:
        """The bytes of a piece: literals as they are, ranges read from the old version."""
        out = bytearray()
        for part in parts:
            if isinstance(part, bytes):
                out += part
                continue
            assert self._basis is not None
            start, length = part
            buf = bytearray(length)
            if self._basis.preadv([memoryview(buf)], start) != length:
                raise ErrorCode.CORRUPT.error("the old version is shorter than its chunk index says")
            out += buf
        return bytes(out)

    def _settle(self) -> None:
        """Wait for the oldest piece in flight (a link that failed: write its bytes instead)."""
        index, parts, fut = self._writing.popleft()
        ref = self._bridge.wait(fut)
        if ref is None:  # the old piece was swept meanwhile (its file went long ago): store the bytes
            assert parts is not None
            ref = self._bridge.wait(self._bridge.submit(self._write(index, self._materialize(parts))))
            assert ref is not None
        elif parts is not None:
            self.reused += 1
        self.refs.append(ref)

    def close(self) -> None:
        """Store the last (shorter) piece and wait until every piece is stored."""
        if self._parts:
            self._flush()
        while self._writing:
            self._settle()

    def cancel(self) -> None:
        """Stop waiting for the pieces in flight (the transfer failed or was stopped)."""
        for _index, _parts, fut in self._writing:
            fut.cancel()
        self._writing.clear()


def stored_index(svc: ObjectService, fc: FileChunks) -> Coroutine[Any, Any, cdc.ChunkIndex]:
    """The chunk index of the stored file ``fc``: from the cache, else computed (and cached) by
    :func:`~ferry.server.objectsvc.chunkio.content_index`, which ``sync -c`` shares."""
    return content_index(svc.storage, svc.user.name, fc, svc.ctx.hash_cache)


def cache_key(svc: ObjectService, node: Node) -> tuple[object, ...] | None:
    """The hash-cache key of the index of the user's stored ``node`` (None: no digest to name it)."""
    return index_key(svc.user.name, node.digest, node.size) if node.digest else None


# --- the index --------------------------------------------------------------------------------


async def handle_get_chunks(svc: ObjectService, msg: m.GetChunks) -> None:
    """Send the chunk index of ``msg.path`` in ``Chunks`` pages (the last with ``end``); with
    ``prefetch``, only start computing it into the cache and answer ``Ok``."""
    t0 = time.monotonic()
    fc = await svc.storage.open_file(svc.user.name, parse_path(msg.path))
    if msg.prefetch:
        key = cache_key(svc, fc.node)
        started = key is not None and svc.ctx.hash_cache.get_index(key) is None
        if started:
            # In the background; its only result is the cache entry, and its errors are dropped
            # (the service cancels it when the session ends).
            assert isinstance(svc, ObjectDeltaService)
            svc.prefetch(stored_index(svc, fc))
        await svc.send(m.Ok(id=msg.id))
        svc.log_op("chunks", msg.path, t0, "ok prefetch" if started else "ok cached")
        return
    index = await stored_index(svc, fc)
    hashes = cdc.truncate(index.hashes, msg.width)
    step = m.CHUNKS_PAGE * msg.width
    for i in range(0, max(len(hashes), 1), step):
        page = hashes[i : i + step]
        end = i + step >= len(hashes)
        await svc.send(m.Chunks(id=msg.id, size=index.size, hashes=page, end=end, width=msg.width))
    svc.log_op("chunks", msg.path, t0, f"ok chunks={index.count}")


# --- upload -----------------------------------------------------------------------------------


class ObjectDeltaUpload(DeltaTransfer):
    """A delta upload in progress on the object backend, registered in ``svc.channels``."""

    def __init__(self, svc: ObjectService, msg: m.DeltaPut, hold: Hold) -> None:
        self.svc = svc
        self.msg = msg
        self.path = parse_path(msg.path)
        self.t0 = time.monotonic()
        self.bridge = Bridge()
        self.basis: StoredFile | None = None
        self.upload: Upload | None = None
        self.sink: UploadSink | None = None
        self.assembler: Assembler | None = None
        self._job: asyncio.Future[Any] | None = None
        #: its place in the user's open uploads (given back by close)
        self.hold: Hold | None = hold
        #: the session's read_waited() at its last batch (ferry.server.service.Upload)
        self.active_at = svc.host.read_waited()

    async def open(self) -> None:
        """Open the basis (the stored file, its index checked against the client's), then the
        upload the new version is stored in (the quota is checked there, across servers)."""
        svc, msg = self.svc, self.msg
        storage, user = svc.storage, svc.user.name
        basis: list[BasisFile] = []
        if msg.basis:
            fc = await storage.open_file(user, self.path)
            index = await stored_index(svc, fc)
            if basis_id(cdc.truncate(index.hashes, msg.width)) != msg.basis:
                raise ErrorCode.CHANGED.error(
                    f"{msg.path} changed since its chunks were listed; nothing was kept, try again"
                )
            self.basis = StoredFile(storage, fc.chunks, fc.node.size, self.bridge)
            # Trusted: a stored file never changes, its pieces are verified as they are read, and
            # its index is that of its digest, so copies of it are taken by reference (UploadSink).
            basis.append(BasisFile(self.basis, index, trusted=True))
        self.upload = await storage.open_upload(
            user,
            self.path,
            token=msg.token,
            size=msg.size,
            mode=msg.mode,
            mtime=msg.mtime,
            overwrite=msg.overwrite,
            quota=svc.user.quota,
        )
        self.sink = UploadSink(storage, self.upload, self.bridge, self.basis)
        self.assembler = Assembler(self.sink, msg.size, basis)

    async def on_data(self, ev: Data) -> None:
        """Delta uploads carry their bytes in DeltaData messages; a data frame is a client bug."""
        raise RemoteProtocolError(f"data frame for delta upload {self.msg.id}")

    async def add(self, batch: m.DeltaData) -> None:
        """Apply one batch (in a thread; the reader waits, so TCP holds the client back)."""
        assert self.assembler is not None
        self.active_at = self.svc.host.read_waited()
        self._job = work.start_thread(self.assembler.apply, batch.ops, batch.data)
        await asyncio.shield(self._job)
        self._job = None
        if batch.end:
            await self._finish(batch.digest)

    async def _finish(self, digest: bytes) -> None:
        svc, msg, assembler, sink, upload = self.svc, self.msg, self.assembler, self.sink, self.upload
        assert assembler is not None and sink is not None and upload is not None

        def seal() -> cdc.ChunkIndex:
            index = assembler.finish(digest)  # size and content digest, before anything is committed
            sink.close()
            return index

        self._job = work.start_thread(seal)
        index = await asyncio.shield(self._job)
        self._job = None
        stored = tree_digest("blake3", msg.size, [ref.hash for ref in sink.refs])
        await svc.storage.commit_upload(upload, digest=stored, overwrite=msg.overwrite, quota=svc.user.quota)
        # The new version's index is known: the next delta (or sync -c) of it needs no read of it.
        svc.ctx.hash_cache.put_index(index_key(svc.user.name, stored, msg.size), index)
        self.close()
        await svc.send(m.Ok(id=msg.id))
        svc.log_op(
            "delta-put",
            msg.path,
            self.t0,
            f"ok copied={assembler.copied} received={assembler.received} reused={sink.reused}",
            msg.size,
        )

    def working(self) -> bool:
        """A batch or the commit is being written (see :class:`ferry.server.service.Upload`)."""
        return self._job is not None and not self._job.done()

    async def expire(self, timeout: float) -> m.Error:
        """No batch for ``timeout`` seconds: stop (the pieces stored so far stay for a resume)."""
        await self.abort()
        self.svc.log_op("delta-put", self.msg.path, self.t0, "idle")
        return ErrorCode.CANCELLED.reply(
            self.msg.id,
            f"{self.msg.path}: no data for {timeout:g} s, so the server closed this delta upload; "
            "the file was not changed",
        )

    async def abort(self) -> None:
        """Cancelled or the connection ended: stop the thread, keep the partial upload (its stored
        pieces are verified; the sweeper removes it if it is never resumed)."""
        self.bridge.stop()
        job = self._job
        try:
            if job is not None:
                await settle(job)
        finally:  # (once the thread no longer uses the buffers, if this wait was cancelled)
            close_after(job, self.close)

    async def fail(self) -> None:
        """The upload failed (integrity, basis changed, quota): stop, and forget the partial upload."""
        await self.abort()
        if self.upload is not None:
            upload, self.upload = self.upload, None
            with contextlib.suppress(Exception):
                await self.svc.storage.discard_upload(upload)

    def close(self) -> None:
        """Release the buffers and the open-upload place, unregister."""
        self.bridge.stop()
        if self.sink is not None:
            self.sink.cancel()
        if self.basis is not None:
            self.basis.close()
        if self.hold is not None:
            self.hold.release()
            self.hold = None
        if self.svc.channels.get(self.msg.id) is self:
            del self.svc.channels[self.msg.id]


async def handle_delta_put(svc: ObjectService, msg: m.DeltaPut) -> None:
    """Start a delta upload (no reply until it ends: Ok, or an Error at the first problem)."""
    admit(svc, msg.id)
    if not TOKEN.match(msg.token):
        raise RemoteProtocolError("bad upload token")
    up = ObjectDeltaUpload(svc, msg, svc.hold(Kind.UPLOAD))
    try:
        await up.open()
    except BaseException:
        await up.fail()
        raise
    up.active_at = svc.host.read_waited()
    svc.channels[msg.id] = up


async def handle_delta_data(svc: ObjectService, msg: m.DeltaData) -> None:
    """A batch of a delta upload; batches of a failed or cancelled one are dropped."""
    up = svc.channels.get(msg.id)
    if up is None:
        return
    if not isinstance(up, ObjectDeltaUpload):
        raise RemoteProtocolError(f"request {msg.id} is not a delta upload")
    try:
        await up.add(msg)
    except Exception as exc:
        await up.fail()
        svc.log_op("delta-put", up.msg.path, up.t0, "failed")
        changed = changed_error(exc, up.msg.path)
        if changed is not None:
            raise changed from exc
        raise


# --- download ---------------------------------------------------------------------------------


class ObjectDeltaSend(DeltaSend):
    """A delta download from the store: the encoder reads the stored pieces (only those holding
    chunks the client lacks, when the file's index is cached)."""

    async def serve(self, basis: bytes) -> None:
        """Send ``FileInfo`` and the ``DeltaData`` batches of the stored file against ``basis``."""
        svc, msg = self.svc, self.msg
        assert isinstance(svc, ObjectService)
        t0 = time.monotonic()
        fc = await svc.storage.open_file(svc.user.name, parse_path(msg.path))
        node = fc.node
        await svc.send(
            m.FileInfo(id=msg.id, size=node.size, mtime=m.wire_time(node.mtime), mode=node.mode & 0o7777)
        )
        cache = svc.ctx.hash_cache
        key = cache_key(svc, node)
        cached = cache.get_index(key) if key is not None else None
        bridge = Bridge()
        src = StoredFile(svc.storage, fc.chunks, node.size, bridge)
        enc = DeltaEncoder(src, node.size, basis, width=msg.width, compress=msg.compress, index=cached)
        job: asyncio.Future[Any] | None = None
        try:
            job = work.start_thread(enc.next_batch)
            while job is not None:
                batch, done = await asyncio.shield(job)
                job = None
                if not done:  # read and chunk the next batch while this one is sent
                    job = work.start_thread(enc.next_batch)
                    await svc.send(m.DeltaData(id=msg.id, ops=batch.ops, data=bytes(batch.data)))
                    continue
                assert enc.index is not None
                if key is not None:
                    cache.put_index(key, enc.index)
                await svc.send(
                    m.DeltaData(id=msg.id, ops=batch.ops, data=bytes(batch.data), end=True, digest=enc.digest)
                )
            svc.log_op("delta-get", msg.path, t0, f"ok copied={enc.copied} sent={enc.wire}", node.size)
        finally:
            bridge.stop()
            # (the piece buffers go once no thread reads them)
            close_job = job
            if close_job is not None and not close_job.done():
                close_job.add_done_callback(lambda _f: src.close())
            else:
                src.close()


async def handle_delta_get(svc: ObjectService, msg: m.DeltaGet) -> None:
    """Register a delta download; it starts once the client's basis has arrived."""
    admit(svc, msg.id)
    svc.channels[msg.id] = ObjectDeltaSend(svc, msg)


class ObjectDeltaService(ObjectService):
    """Delta transfers of one session on the object backend, both directions."""

    def __init__(self, host: ServiceHost, storage: ObjectStorage) -> None:
        super().__init__(host, storage)
        self._prefetches: set[asyncio.Task[cdc.ChunkIndex]] = set()

    def prefetch(self, job: Coroutine[Any, Any, cdc.ChunkIndex]) -> None:
        """Run ``job`` (an index into the cache) in the background; its errors are dropped."""
        task = asyncio.ensure_future(job)
        self._prefetches.add(task)
        task.add_done_callback(self._prefetched)

    def _prefetched(self, task: asyncio.Task[cdc.ChunkIndex]) -> None:
        self._prefetches.discard(task)
        if not task.cancelled():
            task.exception()  # (retrieved: a failed prefetch only means no cache entry)

    async def close(self) -> None:
        """The session ends: stop indexing for it."""
        for task in list(self._prefetches):
            task.cancel()
        await asyncio.gather(*self._prefetches, return_exceptions=True)

    worker_handlers: ClassVar[dict[type[m.Message], Handler]] = {m.GetChunks: handle_get_chunks}
    reader_handlers: ClassVar[dict[type[m.Message], Handler]] = {
        m.DeltaPut: handle_delta_put,
        m.DeltaData: handle_delta_data,
        m.DeltaGet: handle_delta_get,
        m.Chunks: handle_chunks,
    }


__all__ = [
    "Bridge",
    "ObjectDeltaSend",
    "ObjectDeltaService",
    "ObjectDeltaUpload",
    "StoredFile",
    "UploadSink",
    "cache_key",
    "stored_index",
]
