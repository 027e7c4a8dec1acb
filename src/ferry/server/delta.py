"""Delta transfers on the server, both directions (``GetChunks``, ``DeltaPut``, ``DeltaGet``).

Upload (the server receives): the client asks for the chunk index of the server's copy
(``GetChunks``: from the server-wide cache when that version of the file was indexed before, else
computed in a thread and cached), then sends ``DeltaPut`` naming the *basis* it will refer to (the
BLAKE3 of those hashes) and a stream of ``DeltaData`` batches. The server builds the new version in
the upload's partial file (:class:`~ferry.delta.Assembler`: copied chunks are re-hashed as they are
copied, literal chunks hashed as they arrive), checks the content digest, fsyncs, and renames it
into place through the jail: the final name only ever shows the old or the new content. If the
old file changed since it was listed, the upload fails with code ``changed`` and nothing changes.

Download (the server sends): ``DeltaGet`` is followed by the client's basis hashes (``Chunks``
pages, the last with ``end``); the server answers ``FileInfo`` and ``DeltaData`` batches produced by
:class:`~ferry.delta.DeltaEncoder` in a thread (the next batch is read while one is sent), the last
one with the content digest, or an ``Error`` with the code ``changed`` if the file changed while
it was read.
Both directions may carry zstd-packed literal chunks (``-z``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import time
from typing import TYPE_CHECKING, Any

from ferry import cdc
from ferry.aio import cancel_and_wait, close_after, settle
from ferry.delta import Assembler, BasisChanged, BasisFile, DeltaEncoder, basis_id
from ferry.errors import FerryError, RemoteError
from ferry.server.context import FileLimit
from ferry.server.openlimits import Hold, Kind
from ferry.server.oserrors import translate_oserror
from ferry.server.service import FolderService, Service
from ferry.server.transfer import check_quota, partial_path
from ferry.server.work import in_thread, start_thread
from ferry.textsafe import safe_text
from ferry.wire import Data, RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, reply_for

if TYPE_CHECKING:
    from ferry.server.context import HashCache

#: Delta transfers open at once per connection (each holds descriptors and a thread job).
MAX_DELTAS = 8
#: Most basis chunks a client may announce for a download (1 TiB of 64 KiB chunks).
MAX_BASIS = 1 << 24
#: What an upload token may be (it names the partial upload: a file name part, a database key).
TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def file_index(cache: HashCache, fd: int, st: os.stat_result) -> cdc.ChunkIndex:
    """The chunk index of the open file ``fd`` (``st`` its fstat), cached per version of the file."""
    key = (*cdc.stat_key(st), cdc.SCHEME)
    index = cache.get_index(key)
    if index is None:
        index = cdc.index_fd(fd, st.st_size)
        if cdc.stat_key(os.fstat(fd)) != cdc.stat_key(st):
            raise ErrorCode.CHANGED.error("the file changed while it was being indexed; try again")
        cache.put_index(key, index)
    return index


class DeltaTransfer:
    """A delta transfer in progress, of either backend (counted against :data:`MAX_DELTAS`)."""


def admit(svc: Service[Any], req_id: int) -> None:
    """Refuse a new delta transfer whose id is in use, or past :data:`MAX_DELTAS` on the connection."""
    svc.requests.check_id_free(req_id)
    if sum(isinstance(c, DeltaTransfer) for c in svc.channels.values()) >= MAX_DELTAS:
        raise ErrorCode.BUSY.error(f"too many delta transfers on this connection (at most {MAX_DELTAS})")


def changed_error(exc: BaseException, path: str) -> RemoteError | None:
    """The ``changed`` error to send for ``exc`` if it says a file changed while it was read."""
    if isinstance(exc, BasisChanged | cdc.FileChanged):
        return ErrorCode.CHANGED.error(f"{path} changed while it was being transferred; nothing was kept, try again")
    return None


# --- the index --------------------------------------------------------------------------------


async def handle_get_chunks(svc: DeltaService, msg: m.GetChunks) -> None:
    """Send the chunk index of ``msg.path`` in ``Chunks`` pages (the last with ``end``)."""
    t0 = time.monotonic()
    storage = svc.storage
    cache = svc.ctx.hash_cache
    fd = await in_thread(storage.open_read, msg.path, release=os.close)
    job = None
    if msg.prefetch:
        try:
            st = os.fstat(fd)
            if cache.get_index((*cdc.stat_key(st), cdc.SCHEME)) is None:
                # In the background (the session's file pool: bounded, fair between users); its
                # only result is the cache entry, and its errors (the file changed) are dropped.
                job = start_thread(file_index, cache, fd, st)
        finally:
            _close_after(job, fd)
        await svc.send(m.Ok(id=msg.id))
        svc.log_op("chunks", msg.path, t0, "ok prefetch" if job is not None else "ok cached")
        return
    try:
        st = os.fstat(fd)
        job = start_thread(file_index, cache, fd, st)
        index = await asyncio.shield(job)
    finally:
        _close_after(job, fd)
    hashes = cdc.truncate(index.hashes, msg.width)
    step = m.CHUNKS_PAGE * msg.width
    for i in range(0, max(len(hashes), 1), step):
        page = hashes[i : i + step]
        end = i + step >= len(hashes)
        await svc.send(m.Chunks(id=msg.id, size=index.size, hashes=page, end=end, width=msg.width))
    svc.log_op("chunks", msg.path, t0, f"ok chunks={index.count}")


# --- upload -----------------------------------------------------------------------------------


class DeltaUpload(DeltaTransfer):
    """A delta upload in progress, registered in ``svc.channels`` under its id."""

    def __init__(self, svc: DeltaService, msg: m.DeltaPut) -> None:
        self.svc = svc
        self.msg = msg
        self.t0 = time.monotonic()
        self.out_fd = -1
        self.basis_fd = -1
        self.partial = ""
        self.assembler: Assembler | None = None
        self.reserved = 0
        self.replaced = 0
        self.prel = ""  # its partial (home-relative) once opened
        self.creations: FileLimit | None = None  # the file-count quota its commit answers to
        self._job: asyncio.Future[Any] | None = None
        self.dead = False
        #: its place in the user's open uploads (taken by handle_delta_put, given back by close)
        self.hold: Hold | None = None
        #: the session's read_waited() at its last batch (ferry.server.service.Upload)
        self.active_at = 0.0

    def open(self) -> None:
        """Open the basis (the current file) and the partial to build in (thread)."""
        storage, msg = self.svc.storage, self.msg
        basis: list[BasisFile] = []
        if msg.basis:
            self.basis_fd = storage.open_read(msg.path)
            st = os.fstat(self.basis_fd)
            self.replaced = st.st_size
            index = file_index(self.svc.ctx.hash_cache, self.basis_fd, st)
            if basis_id(cdc.truncate(index.hashes, msg.width)) != msg.basis:
                raise ErrorCode.CHANGED.error(
                    f"{msg.path} changed since its chunks were listed; nothing was kept, try again"
                )
            basis.append(BasisFile(self.basis_fd, index))
        else:
            with contextlib.suppress(FerryError):
                st = storage.lstat(msg.path)
                self.replaced = st.st_size if stat.S_ISREG(st.st_mode) else 0
        # The same token for the same source: an interrupted upload leaves one partial, reused
        # (and truncated) by the next attempt instead of piling up.
        self.out_fd, self.partial, _ = storage.open_partial(msg.path, msg.token, on_foreign=self._foreign)
        os.ftruncate(self.out_fd, 0)
        self.assembler = Assembler(self.out_fd, msg.size, basis)

    def _foreign(self, prel: str, st: os.stat_result) -> None:
        """Something that is not the server's partial had the partial's name: it was left alone."""
        self.svc.ctx.log.warning(
            "delta upload: %s was not a genuine partial (links=%d); a fresh one took its name",
            safe_text(prel),
            st.st_nlink,
        )

    async def on_data(self, ev: Data) -> None:
        """Delta uploads carry their bytes in DeltaData messages; a data frame is a client bug."""
        raise RemoteProtocolError(f"data frame for delta upload {self.msg.id}")

    async def add(self, batch: m.DeltaData) -> None:
        """Apply one batch (in a thread; the reader waits, so TCP holds the client back)."""
        assert self.assembler is not None
        self.active_at = self.svc.host.read_waited()
        self._job = start_thread(self.assembler.apply, batch.ops, batch.data)
        await asyncio.shield(self._job)
        self._job = None
        if batch.end:
            await self._finish(batch.digest)

    async def _finish(self, digest: bytes) -> None:
        svc, msg, assembler = self.svc, self.msg, self.assembler
        assert assembler is not None
        storage = svc.storage
        fd, partial, creations = self.out_fd, self.partial, self.creations

        def seal() -> cdc.ChunkIndex:
            index = assembler.finish(digest)
            os.fchmod(fd, msg.mode & 0o777)
            os.utime(fd, (msg.mtime, msg.mtime))
            os.fsync(fd)  # data on disk before the name appears
            # With the descriptor: the inode that was verified is the one that gets the name.
            storage.commit(partial, msg.path, overwrite=msg.overwrite, fd=fd, creations=creations)
            # The new version's index is known: the next delta of this file needs no re-read.
            svc.ctx.hash_cache.put_index((*cdc.stat_key(os.fstat(fd)), cdc.SCHEME), index)
            return index

        self._job = start_thread(seal)
        await asyncio.shield(self._job)
        self._job = None
        self.partial = ""  # renamed: nothing to remove any more
        svc.ctx.usage.add(svc.user.name, msg.size - self.replaced)
        self.close()
        await svc.send(m.Ok(id=msg.id))
        svc.log_op(
            "delta-put",
            msg.path,
            self.t0,
            f"ok copied={assembler.copied} received={assembler.received}",
            msg.size,
        )

    def working(self) -> bool:
        """A batch or the commit is being written (see :class:`ferry.server.service.Upload`)."""
        return self._job is not None and not self._job.done()

    async def expire(self, timeout: float) -> m.Error:
        """No batch for ``timeout`` seconds: stop, drop the partial, say so."""
        await self.abort()
        self.svc.log_op("delta-put", self.msg.path, self.t0, "idle")
        return ErrorCode.CANCELLED.reply(
            self.msg.id,
            f"{self.msg.path}: no data for {timeout:g} s, so the server closed this delta upload; nothing was kept",
        )

    async def abort(self) -> None:
        """Cancelled, failed or the connection ended: drop the partial (it holds no verified data)."""
        job = self._job
        try:
            if job is not None:
                await settle(job)
        finally:  # (once the thread no longer writes to the partial, if this wait was cancelled)
            close_after(job, self.discard)

    def discard(self) -> None:
        """Remove the partial (only if its name still holds this upload's file), close everything."""
        partial, fd = self.partial, self.out_fd
        self.partial = ""
        if partial and fd >= 0:
            with contextlib.suppress(Exception):
                self.svc.storage.remove_partial(partial, fd)
        self.close()

    def close(self) -> None:
        """Close the descriptors, give back the reservation, unregister."""
        self.dead = True
        for attr in ("out_fd", "basis_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)
        if self.reserved:
            self.svc.ctx.usage.release(self.svc.user.name, self.reserved)
            self.reserved = 0
        if self.prel:
            # A usage walk that ran meanwhile may have taken its partial for an idle one: it is gone.
            self.svc.ctx.usage.claim(self.svc.user.name, self.prel)
            self.prel = ""
        if self.hold is not None:
            self.hold.release()
        if self.svc.channels.get(self.msg.id) is self:
            del self.svc.channels[self.msg.id]


async def handle_delta_put(svc: DeltaService, msg: m.DeltaPut) -> None:
    """Start a delta upload (no reply until it ends: Ok, or an Error at the first problem)."""
    admit(svc, msg.id)
    if not TOKEN.match(msg.token):
        raise RemoteProtocolError("bad upload token")
    # The partial it builds in: an interrupted put of the same source may have left it (idle,
    # counted); it is truncated and reused, so its bytes are this upload's own.
    prel = partial_path(msg.path, msg.token)
    creations = await svc.creations()
    await check_quota(svc, msg, prel)
    up = DeltaUpload(svc, msg)
    up.creations = creations
    up.hold = svc.hold(Kind.UPLOAD)  # no await since: nothing can leak it before the try
    svc.ctx.usage.reserve(svc.user.name, msg.size)
    up.reserved = msg.size
    try:
        await in_thread(up.open)
    except BaseException:
        up.discard()
        raise
    up.prel = up.partial
    svc.ctx.usage.claim(svc.user.name, up.partial)  # removed or committed when it ends
    up.active_at = svc.host.read_waited()
    svc.channels[msg.id] = up


async def handle_delta_data(svc: DeltaService, msg: m.DeltaData) -> None:
    """A batch of a delta upload; batches of a failed or cancelled one are dropped."""
    up = svc.channels.get(msg.id)
    if up is None:
        return
    if not isinstance(up, DeltaUpload):
        raise RemoteProtocolError(f"request {msg.id} is not a delta upload")
    try:
        await up.add(msg)
    except Exception as exc:
        up.discard()
        svc.log_op("delta-put", up.msg.path, up.t0, "failed")
        changed = changed_error(exc, up.msg.path)
        if changed is not None:
            raise changed from exc
        if isinstance(exc, OSError):
            raise translate_oserror(exc, up.msg.path) from exc
        raise


# --- download ---------------------------------------------------------------------------------


class DeltaSend(DeltaTransfer):
    """A delta download: collects the client's basis (``Chunks`` pages), then streams the file
    (:meth:`serve`; the object backend's subclass reads the file from the store)."""

    def __init__(self, svc: Service[Any], msg: m.DeltaGet) -> None:
        self.svc = svc
        self.msg = msg
        self.parts: list[bytes] = []
        self.count = 0
        self.task: asyncio.Task[None] | None = None
        #: its place in the user's open downloads, held until it ends (busy if there is none)
        self.hold = svc.hold(Kind.DOWNLOAD)

    async def on_data(self, ev: Data) -> None:
        """A data frame for a download is a client bug."""
        raise RemoteProtocolError(f"data frame for delta download {self.msg.id}")

    def add(self, msg: m.Chunks) -> None:
        """One page of the client's basis; the last one starts the transfer."""
        if self.task is not None:
            raise RemoteProtocolError(f"chunks after the end of the basis of {self.msg.id}")
        width = self.msg.width
        if msg.width != width or len(msg.hashes) % width:
            raise RemoteProtocolError(f"a basis page must hold hashes of {width} bytes, as its DeltaGet said")
        self.count += len(msg.hashes) // width
        if self.count > MAX_BASIS:
            raise RemoteProtocolError(f"a basis of more than {MAX_BASIS} chunks")
        self.parts.append(msg.hashes)
        if msg.end:
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        svc = self.svc
        try:
            await self.serve(b"".join(self.parts))
        except (ConnectionError, RemoteProtocolError, asyncio.CancelledError):
            raise
        except Exception as exc:
            err = changed_error(exc, self.msg.path) or exc
            if not isinstance(err, FerryError):
                svc.ctx.log.exception("internal error in a delta download")
            with contextlib.suppress(Exception):
                await svc.send(reply_for(self.msg.id, err))
        finally:
            self.hold.release()
            if svc.channels.get(self.msg.id) is self:
                del svc.channels[self.msg.id]

    async def serve(self, basis: bytes) -> None:
        """Send ``FileInfo`` and the ``DeltaData`` batches of the file against ``basis``."""
        assert isinstance(self.svc, DeltaService)
        await _serve_delta(self.svc, self.msg, basis)

    async def abort(self) -> None:
        """Cancelled or the connection ended: stop sending."""
        try:
            await cancel_and_wait(self.task)
        finally:
            self.hold.release()  # (a download whose basis never arrived has no task to do it)


async def _serve_delta(svc: DeltaService, msg: m.DeltaGet, basis: bytes) -> None:
    t0 = time.monotonic()
    storage = svc.storage
    fd = await in_thread(storage.open_read, msg.path, release=os.close)
    job: asyncio.Future[Any] | None = None
    try:
        st = os.fstat(fd)
        await svc.send(
            m.FileInfo(id=msg.id, size=st.st_size, mtime=m.wire_time(st.st_mtime), mode=st.st_mode & 0o7777)
        )
        # A version indexed before (a -c listing, an earlier delta) is not chunked again.
        cached = svc.ctx.hash_cache.get_index((*cdc.stat_key(st), cdc.SCHEME))
        enc = DeltaEncoder(fd, st.st_size, basis, width=msg.width, compress=msg.compress, index=cached)
        job = start_thread(enc.next_batch)
        while job is not None:
            batch, done = await asyncio.shield(job)
            job = None
            if not done:  # read and chunk the next batch while this one is sent
                job = start_thread(enc.next_batch)
                await svc.send(m.DeltaData(id=msg.id, ops=batch.ops, data=bytes(batch.data)))
                continue
            if cdc.stat_key(os.fstat(fd)) != cdc.stat_key(st):
                raise cdc.FileChanged(f"{msg.path} changed while it was being sent")
            assert enc.index is not None
            svc.ctx.hash_cache.put_index((*cdc.stat_key(st), cdc.SCHEME), enc.index)
            await svc.send(
                m.DeltaData(id=msg.id, ops=batch.ops, data=bytes(batch.data), end=True, digest=enc.digest)
            )
        svc.log_op("delta-get", msg.path, t0, f"ok copied={enc.copied} sent={enc.wire}", st.st_size)
    finally:
        _close_after(job, fd)


def _close_after(job: asyncio.Future[Any] | None, fd: int) -> None:
    """Close ``fd`` now, or once the thread job still reading it is done (a cancelled await must
    not close a descriptor a thread still uses)."""
    close_after(job, lambda: os.close(fd))


async def handle_delta_get(svc: DeltaService, msg: m.DeltaGet) -> None:
    """Register a delta download; it starts once the client's basis has arrived."""
    admit(svc, msg.id)
    svc.channels[msg.id] = DeltaSend(svc, msg)


async def handle_chunks(svc: Service[Any], msg: m.Chunks) -> None:
    """A page of a delta download's basis."""
    target = svc.channels.get(msg.id)
    if target is None:
        return  # cancelled meanwhile
    if not isinstance(target, DeltaSend):
        raise RemoteProtocolError(f"request {msg.id} is not a delta download")
    target.add(msg)


class DeltaService(FolderService):
    """Delta transfers of one session, both directions (registered as channels while they run)."""

    worker_handlers = {m.GetChunks: handle_get_chunks}
    reader_handlers = {
        m.DeltaPut: handle_delta_put,
        m.DeltaData: handle_delta_data,
        m.DeltaGet: handle_delta_get,
        m.Chunks: handle_chunks,
    }


__all__ = [
    "MAX_BASIS",
    "MAX_DELTAS",
    "TOKEN",
    "DeltaSend",
    "DeltaService",
    "DeltaTransfer",
    "admit",
    "changed_error",
    "file_index",
    "handle_chunks",
    "handle_delta_data",
    "handle_delta_get",
    "handle_delta_put",
    "handle_get_chunks",
]
