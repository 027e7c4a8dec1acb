"""Downloads and uploads on the server: integrity, resume, atomic commit, quota, bounded memory.

Download (``GetFile``): the client may send hashes of chunks it already holds; the server compares
them with its own (cached per inode/size/mtime, else computed) and streams from the first mismatch.
Plain TCP uses the kernel's ``sendfile`` (where the loop has it: uvloop has not); TLS (and plain TCP on
uvloop) reads 1 MiB blocks in a thread while the previous block is being written. The remaining
chunk hashes are computed in a thread *concurrently* with sending, so hashing never serialises with
the network. ``FileEnd`` carries the chunk hashes and digest.

Upload (``PutFile``): data goes to a hidden partial file next to the target (``.NAME.ferry-part-TOKEN``,
the same token for the same source so an interrupted upload resumes). The server tells the client
which chunks it already holds (``PutReady``), the client continues from the first one that does not
match (``PutFrom``), and at ``FileEnd`` the server compares every chunk hash and the digest, fsyncs,
and only then renames the partial to the final name (the inode it wrote, checked by device and
inode: :meth:`~ferry.server.jail.Jail.commit`). Only partials the server created for that upload are
resumed (:meth:`~ferry.server.jail.Jail.open_partial`). Small files travel inline in ``PutFile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.errors import IntegrityError, RemoteError
from ferry.fskit import TOKEN_RE, partial_name
from ferry.hashing import ChunkHasher, hash_fd_chunks, matching_prefix, tree_digest
from ferry.server.context import FileLimit
from ferry.server.folder import FolderStorage
from ferry.server.openlimits import Hold, Kind
from ferry.server.oserrors import translate_oserror
from ferry.server.pathrules import join_path, parse_path
from ferry.server.service import FolderService, ServiceHost
from ferry.server.work import in_thread, start_thread
from ferry.wire import Data, RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode
from ferry.writeback import start_writeback

SMALL = 1 << 18  # files up to 256 KiB are read, hashed and sent in one step
BLOCK = 1 << 20  # TLS read/write block: large enough to amortise per-frame costs
SENDFILE_BLOCK = 1 << 26  # plain TCP: one data frame per 64 MiB handed to sendfile


# --- download ------------------------------------------------------------------------------


async def handle_get(svc: TransferService, msg: m.GetFile) -> None:
    """Stream a file to the client (resuming after the chunks it proves it has)."""
    try:
        with svc.hold(Kind.DOWNLOAD):  # busy when the user has too many downloads open
            await _serve_get(svc, msg)
    finally:
        svc.requests.download_done(msg.id)


async def _serve_get(svc: TransferService, msg: m.GetFile) -> None:
    t0 = time.monotonic()
    storage = svc.storage
    # Small files are served on the loop thread in one go: thread hops would cost more than the
    # few microseconds of page-cache I/O, and a 10,000-file tree must not pay them per file.
    fd = storage.open_read(msg.path)
    job = _Jobs()
    try:
        st = os.fstat(fd)
        if st.st_size <= SMALL and not msg.chunk_hashes:
            await _get_small(svc, msg, fd, st, t0)
            return
        size, chunk = st.st_size, msg.chunk_size
        # ctime too: a rewrite that restores the mtime (rsync -t, touch -r) still changes the ctime.
        key = (st.st_dev, st.st_ino, size, st.st_mtime_ns, st.st_ctime_ns, msg.hash, chunk)
        cached = svc.ctx.hash_cache.get(key)
        offset, prefix = 0, list[bytes]()
        if msg.chunk_hashes:
            n = min(len(msg.chunk_hashes), size // chunk)  # only whole chunks can be resumed
            if cached:
                ours = cached[:n]
            else:
                ours = await asyncio.shield(job(hash_fd_chunks, fd, msg.hash, chunk, 0, n * chunk))
            k = matching_prefix(ours, msg.chunk_hashes[:n])
            offset, prefix = k * chunk, ours[:k]
        await svc.send(
            m.FileInfo(
                id=msg.id, size=size, mtime=m.wire_time(st.st_mtime), mode=st.st_mode & 0o7777, offset=offset
            )
        )
        # Hash the rest in a thread while the data is on its way (page cache makes it cheap).
        hash_job = job(hash_fd_chunks, fd, msg.hash, chunk, offset, size) if cached is None else None
        complete = await _stream(svc, msg.id, fd, offset, size, job)
        if complete is None:
            await svc.send(ErrorCode.CANCELLED.reply(msg.id, "download cancelled"))
            svc.requests.cancelled.discard(msg.id)
            return
        hashes: list[bytes] | None = cached
        if hashes is None:
            assert hash_job is not None
            try:
                hashes = prefix + await asyncio.shield(hash_job)
            except OSError:  # the file shrank under the hash (rewritten in place): report it as such
                hashes = None
        st2 = os.fstat(fd)
        changed = (st2.st_size, st2.st_mtime_ns, st2.st_ctime_ns) != (size, st.st_mtime_ns, st.st_ctime_ns)
        if not complete or changed or hashes is None:
            await svc.send(
                ErrorCode.CHANGED.reply(msg.id, f"{msg.path} changed while it was being sent; try again")
            )
            svc.log_op("get", msg.path, t0, "changed", size - offset)
            return
        svc.ctx.hash_cache.put(key, hashes)
        await svc.send(
            m.FileEnd(id=msg.id, size=size, chunk_hashes=hashes, digest=tree_digest(msg.hash, size, hashes))
        )
        svc.log_op("get", msg.path, t0, "ok" if not offset else f"ok resumed-at={offset}", size - offset)
    finally:
        job.close_after(fd)


class _Jobs:
    """Thread jobs of one download that use its fd. They are awaited only through ``shield`` (a
    cancelled await must not orphan a thread), and the fd is closed once the last one has finished:
    a read must never hit a closed, or already reused, descriptor."""

    def __init__(self) -> None:
        self._running: list[asyncio.Future[Any]] = []

    def __call__(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        # Finished jobs are dropped: they hold their results (1 MiB blocks).
        self._running = [f for f in self._running if not _retrieved_if_done(f)]
        fut = start_thread(fn, *args)
        self._running.append(fut)
        return fut

    def close_after(self, fd: int) -> None:
        """Close ``fd`` now, or when the jobs still running are done."""
        # A job that already failed (the hash job of a file that shrank) may never be awaited when
        # the download ends early: retrieve its error, or asyncio logs it when it is collected.
        running = [f for f in self._running if not _retrieved_if_done(f)]
        if not running:
            os.close(fd)
            return
        left = len(running)

        def one_done(f: asyncio.Future[Any]) -> None:
            nonlocal left
            if not f.cancelled():
                f.exception()  # retrieved: the download ended without needing it
            left -= 1
            if left == 0:
                os.close(fd)

        for f in running:
            f.add_done_callback(one_done)


def _retrieved_if_done(f: asyncio.Future[Any]) -> bool:
    """True if ``f`` is done; its exception, if any, is then marked as retrieved (awaiting it
    later still raises it)."""
    if not f.done():
        return False
    if not f.cancelled():
        f.exception()
    return True


async def _get_small(svc: TransferService, msg: m.GetFile, fd: int, st: os.stat_result, t0: float) -> None:
    data = os.pread(fd, st.st_size + 1, 0)
    if len(data) != st.st_size:
        await svc.send(ErrorCode.CHANGED.reply(msg.id, f"{msg.path} changed while it was being sent"))
        return
    hasher = ChunkHasher(msg.hash, msg.chunk_size)
    hasher.update(data)
    hashes, digest = hasher.finish()
    conn = svc.host.conn
    frames = [
        conn.send(m.FileInfo(id=msg.id, size=st.st_size, mtime=m.wire_time(st.st_mtime), mode=st.st_mode & 0o7777)),
        conn.data_header(msg.id, m.STDOUT, len(data)),
        data,
        conn.send(m.FileEnd(id=msg.id, size=st.st_size, chunk_hashes=hashes, digest=digest)),
    ]
    await svc.host.write_frames(frames)
    svc.log_op("get", msg.path, t0, nbytes=st.st_size)


async def _stream(svc: TransferService, channel: int, fd: int, offset: int, size: int, job: _Jobs) -> bool | None:
    """Send bytes [offset, size) of ``fd``; False if the file shrank (the frames are padded),
    None if the client cancelled (checked between blocks, where framing allows stopping)."""
    if svc.host.zero_copy:
        with open(fd, "rb", buffering=0, closefd=False) as f:
            pos = offset
            while pos < size:
                if channel in svc.requests.cancelled:
                    return None
                count = min(SENDFILE_BLOCK, size - pos)
                sent = await svc.host.sendfile(channel, f, pos, count)
                if sent < count:
                    return False
                pos += count
        return True
    pos = offset
    ok = True
    nxt = job(os.pread, fd, min(BLOCK, size - pos), pos) if pos < size else None
    while nxt is not None:
        data = await asyncio.shield(nxt)
        if channel in svc.requests.cancelled:
            return None
        want = min(BLOCK, size - pos)
        if len(data) < want:
            data += bytes(want - len(data))  # keep framing; the caller reports the change
            ok = False
        pos += want
        # Read the next block while this one is being encrypted and written.
        nxt = job(os.pread, fd, min(BLOCK, size - pos), pos) if pos < size else None
        await svc.send_data(channel, m.STDOUT, data)
    return ok


# --- upload --------------------------------------------------------------------------------


@dataclass
class Upload:
    """An upload in progress: the partial file, the running hasher and the pending write."""

    svc: TransferService
    msg: m.PutFile
    fd: int
    partial: str
    held: list[bytes]  # chunk hashes of the data the partial already held
    t0: float
    hasher: ChunkHasher | None = None
    pos: int = 0
    replaced: int = 0  # size of the file this upload replaces, for usage accounting
    started: bool = False
    _buf: list[bytes] = field(default_factory=list)
    _buffered: int = 0
    #: the thread job using ``fd`` (a write, or the final fsync and rename); never abandoned half-way
    _pending: asyncio.Future[Any] | None = None
    key: tuple[str, str] = ("", "")  # (home, partial path): at most one upload writes a partial
    superseded: bool = False  # a newer upload of the same source took the partial over
    reserved: int = 0  # quota bytes set aside while this upload runs
    #: a resumable upload (the client's token): if it stops, its partial stays for a resume, and
    #: counts among the user's idle partials (Usage.park) from then on
    resumable: bool = False
    have: int = 0  # bytes the partial held when it was opened (its size until start())
    kept: bool = True  # False once the partial is committed or removed
    #: the file-count quota the commit answers to, if the final name is new (ferry.server.jail.Creations)
    creations: FileLimit | None = None
    hold: Hold | None = None  # this upload's place in its user's open uploads (ferry.server.openlimits)
    #: the session's read_waited() at this upload's last sign of life (opened, PutFrom, data)
    active_at: float = 0.0

    def start(self, offset: int) -> None:
        """Continue from ``offset`` (a chunk boundary within what the partial holds)."""
        self._check_owner()
        self.active_at = self.svc.host.read_waited()
        if self.started:  # a second start would truncate under a write still in flight
            raise RemoteProtocolError("put_from sent twice for one upload")
        chunk = self.msg.chunk_size
        if offset % chunk or offset // chunk > len(self.held) or offset > self.msg.size:
            raise RemoteProtocolError(f"bad resume offset {offset}")  # (a streamed upload: size 0)
        os.ftruncate(self.fd, offset)
        self.hasher = ChunkHasher(self.msg.hash, chunk, prefix=self.held[: offset // chunk])
        self.pos = offset
        self.started = True

    async def on_data(self, ev: Data) -> None:
        """Buffer a piece of data; write and hash it in a thread in ~1 MiB batches."""
        if not self.started:
            raise RemoteProtocolError("upload data before put_from")
        self._check_owner()
        self.active_at = self.svc.host.read_waited()
        if self.msg.streamed:
            await _grow_streamed(self, len(ev.data))
        elif self.pos + self._buffered + len(ev.data) > self.msg.size:
            raise RemoteProtocolError(f"more data than the announced {self.msg.size} bytes")
        self._buf.append(ev.data)
        self._buffered += len(ev.data)
        if self._buffered >= BLOCK:
            await self._flush()

    def _check_owner(self) -> None:
        if self.superseded:
            raise ErrorCode.CANCELLED.error(
                f"{self.msg.path}: another upload of the same file took over (a retry from a new "
                "connection?); this one was stopped",
            )

    async def _settle(self) -> None:
        """Wait for the thread job in flight (re-raising its error). Shielded: if this task is
        cancelled, the job still finishes before the fd is closed (see :meth:`close`)."""
        pending = self._pending
        if pending is not None:
            try:
                await asyncio.shield(pending)
            finally:
                if pending.done() and self._pending is pending:
                    self._pending = None

    async def _flush(self) -> None:
        await self._settle()
        self._check_owner()  # after the wait: a takeover may have happened meanwhile
        if not self._buffered:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        pos = self.pos
        self.pos += len(data)
        hasher = self.hasher
        assert hasher is not None
        fd = self.fd

        def write() -> None:
            view = memoryview(data)
            off = pos
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
            start_writeback(fd, pos, off - pos)  # the fsync in finish() then has little left to wait for
            hasher.update(data)  # blake3 releases the GIL: overlaps with the next network read

        # One write in flight: the next batch is collected while this one is written.
        self._pending = start_thread(write)

    async def finish(self, end: m.FileEnd) -> None:
        """Verify everything, fsync, set metadata, and atomically move into place."""
        if not self.started:  # no hasher yet: this used to fail an assert as an "internal" error
            raise RemoteProtocolError("file_end before put_from")
        await self._flush()
        await self._flush()  # wait for the last write
        assert self.hasher is not None
        hashes, digest = self.hasher.finish()
        msg = self.msg
        expected = end.size if msg.streamed else msg.size  # streamed: the size is known only now
        if self.pos != expected or end.size != expected:
            raise ErrorCode.INTEGRITY.error(
                f"{msg.path}: received {self.pos} bytes, expected {expected}; nothing was kept"
            )
        if hashes != end.chunk_hashes or digest != end.digest:
            bad = matching_prefix(hashes, end.chunk_hashes)
            raise ErrorCode.INTEGRITY.error(
                f"{msg.path}: chunk {bad} does not match the sender's hash; nothing was kept"
            )
        fd, partial, storage, creations = self.fd, self.partial, self.svc.storage, self.creations

        def seal() -> None:
            _finalise(fd, msg)
            # overwrite=False was checked at PutFile; the commit repeats it atomically, or a file
            # created while the data was on its way would be replaced.
            storage.commit(partial, msg.path, overwrite=msg.overwrite, fd=fd, creations=creations)

        # Tracked like a write: an upload taking over the partial waits until the rename is done.
        self._pending = start_thread(seal)
        await self._settle()
        self.kept = False  # renamed to its final name: no partial any more

    def working(self) -> bool:
        """A write (or the commit) is in flight (see :class:`ferry.server.service.Upload`)."""
        return self._pending is not None and not self._pending.done()

    async def expire(self, timeout: float) -> m.Error:
        """No data for ``timeout`` seconds: stop as an abort would (a resumable upload keeps its
        partial), drop what still comes for it, and say so (ferry.server.service.Upload)."""
        self.svc.failed.add(self.msg.id)  # its late data, PutFrom and FileEnd are dropped
        await self.abort()
        kept = "nothing was kept"
        if self.msg.token:
            kept = "its partial file is kept: the same put resumes where it stopped"
        self.svc.ctx.log.info(
            "put user=%s path=%s: no data for %.0f s: upload closed (%d bytes received)",
            self.svc.user.name,
            self.msg.path,
            timeout,
            self.pos,
        )
        return ErrorCode.CANCELLED.reply(
            self.msg.id, f"{self.msg.path}: no data for {timeout:g} s, so the server closed this upload; {kept}"
        )

    async def abort(self) -> None:
        """Connection lost or cancelled: stop, keep the verified partial for a later resume."""
        with contextlib.suppress(Exception):
            await self._flush()
            await self._flush()
        if not self.msg.token:  # the server chose the token: nobody could ever resume this partial
            self.discard()
            return
        self.close()

    def discard(self) -> None:
        """Remove the partial file (integrity failure, disk full), unless another upload owns it."""
        if not self.superseded and self.partial and self.fd >= 0:
            with contextlib.suppress(Exception):
                self.svc.storage.remove_partial(self.partial, self.fd)
            self.kept = False
        self.close()

    async def supersede(self) -> None:
        """A newer upload of the same source takes the partial over: stop writing to it once the
        job in flight is done (so the newcomer hashes and truncates a file nobody else touches)."""
        self.superseded = True
        with contextlib.suppress(Exception):
            await self._settle()
        self.close()

    def close(self) -> None:
        """Close the partial's descriptor (once; after the job in flight) and release the partial."""
        unlinked = False  # the partial lost its name meanwhile (swept, or removed by its name)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            pending = self._pending
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda f: _close_after(f, fd))
            else:
                with contextlib.suppress(OSError):
                    unlinked = os.fstat(fd).st_nlink == 0
                os.close(fd)
        uploads = self.svc.ctx.uploads
        if uploads.get(self.key) is self:
            del uploads[self.key]
        usage, name = self.svc.ctx.usage, self.svc.user.name
        if self.reserved:
            usage.release(name, self.reserved)
            self.reserved = 0
        if self.partial and not self.superseded:
            if self.resumable and self.kept and not unlinked:
                # Stopped, the partial kept for a resume: it counts against the quota as idle
                # from now on (its bytes were this upload's reservation until now).
                usage.park(name, self.partial, self.pos if self.started else self.have)
            else:
                # Committed or removed: gone, also if a usage walk meanwhile took it for an idle one.
                usage.claim(name, self.partial)
            self.partial = ""
        if self.resumable:
            self.resumable = False
            usage.end_upload(name, self.msg.size)
        if self.hold is not None:
            self.hold.release()


def _close_after(job: asyncio.Future[Any], fd: int) -> None:
    if not job.cancelled():
        job.exception()  # retrieved: the upload already failed or was abandoned
    os.close(fd)


def _finalise(fd: int, msg: m.PutFile) -> None:
    os.fchmod(fd, msg.mode & 0o777)
    os.utime(fd, (msg.mtime, msg.mtime))
    os.fsync(fd)  # data on disk before the name appears: a crash cannot expose a torn file


def partial_path(path: str, token: str) -> str:
    """The home-relative path of the partial file an upload of client path ``path`` with
    ``token`` writes (``""`` for the home itself, which no upload can target)."""
    parts = parse_path(path)
    return join_path((*parts[:-1], partial_name(parts[-1], token))) if parts else ""


async def check_quota(svc: FolderService, msg: m.PutFile | m.DeltaPut, takes_over: str = "") -> None:
    """Refuse (DiskFull, code ``quota``) an upload of ``msg.size`` bytes to ``msg.path`` that the
    user's quota cannot take, counting idle partial uploads, uploads still running and the file it
    replaces. ``takes_over``: the idle partial (home-relative) the upload reuses, whose bytes its
    own size replaces."""
    user = svc.user
    if user.quota is None:
        return
    used = await svc.current_usage()
    credit = svc.ctx.usage.partials(user.name).get(takes_over, 0) if takes_over else 0
    _check_quota_now(svc, msg, used, credit)


def _check_quota_now(svc: FolderService, msg: m.PutFile | m.DeltaPut, used: int, credit: int) -> None:
    user = svc.user
    assert user.quota is not None
    existing = 0
    with contextlib.suppress(Exception):
        st = svc.storage.lstat(msg.path)
        existing = st.st_size
    usage = svc.ctx.usage
    used += usage.reserved(user.name)  # uploads still running count as stored
    if used - existing - credit + msg.size > user.quota:
        partial = usage.partial_bytes(user.name)
        held = f" ({partial} of them held by unfinished uploads: resume or remove them)" if partial else ""
        raise ErrorCode.QUOTA.error(
            f"quota exceeded: {msg.path} needs {msg.size} bytes, {max(user.quota - used, 0)} of "
            f"{user.quota} left{held}; remove files (ferry rm) or ask an admin to raise the quota",
        )


async def admit_upload(svc: FolderService, msg: m.PutFile, prel: str) -> None:
    """Refuse (code ``quota``) an upload the quota cannot take (:func:`check_quota`) or, if it is
    resumable (the client's token), one that would add a partial beyond the user's
    ``--max-partials`` or ``--max-partial-bytes`` (idle ones kept for a resume and running ones at
    their announced size). ``prel`` is its partial (home-relative): reusing an idle one (a resume),
    or taking over from an upload of it still running (a retry), adds none and is never refused by
    the caps. Every wait is done first: the caller reserves right after, with no await in between."""
    user = svc.user
    usage, limits = svc.ctx.usage, svc.ctx.limits
    used = 0
    if user.quota is not None:
        used = await svc.current_usage()
    if msg.token and not usage.partials_known(user.name):
        used = await svc.current_usage()  # the walk that finds the partials left before this process
    older = svc.ctx.uploads.get((svc.storage.home, prel))
    idle = usage.partials(user.name)
    takes_over = older is not None or prel in idle
    credit = older.reserved if older is not None else idle.get(prel, 0)
    if user.quota is not None:
        _check_quota_now(svc, msg, used, credit)
    if not msg.token or takes_over:
        # Not resumable (its partial goes when it stops), or a resume: what the refusal below
        # tells the user to do, so never refused by the caps (it adds no partial).
        return
    running, running_bytes = usage.running(user.name)
    count = len(idle) + running + 1
    nbytes = sum(idle.values()) + running_bytes + msg.size
    cap_bytes = limits.max_partial_bytes
    if count <= limits.max_partials and (not cap_bytes or nbytes <= cap_bytes):
        return
    names = ", ".join(repr(p) for p in list(idle)[:3])
    where = f" (interrupted: {names}{', ...' if len(idle) > 3 else ''})" if idle else ""
    if count > limits.max_partials:
        what = f"you have {count - 1} unfinished uploads{where}, at most {limits.max_partials}"
    else:
        what = (
            f"{msg.path} ({msg.size} bytes) would take your unfinished uploads{where} to {nbytes} "
            f"bytes, at most {cap_bytes}"
        )
    raise ErrorCode.QUOTA.error(
        f"{what}: finish them (run the same put again to resume) or remove them (ferry rm PATH); "
        f"interrupted uploads are deleted after {limits.partial_max_age / 86400:g} days",
    )


async def _grow_streamed(up: Upload, nbytes: int) -> None:
    """A streamed upload (size unknown in advance) received ``nbytes`` more: check the quota for
    them and set them aside, as the announced size of another upload is at its start."""
    svc = up.svc
    user = svc.user
    assert user is not None
    if user.quota is not None:
        used = await svc.current_usage() + svc.ctx.usage.reserved(user.name)
        if used + nbytes > user.quota:
            raise ErrorCode.QUOTA.error(
                f"quota exceeded while receiving {up.msg.path} ({up.pos + up._buffered} bytes so far); "
                "nothing was kept; remove files (ferry rm) or ask an admin to raise the quota",
            )
    svc.ctx.usage.reserve(user.name, nbytes)
    up.reserved += nbytes


async def handle_put(svc: TransferService, msg: m.PutFile) -> None:
    """Start an upload (or store a small inline file at once)."""
    storage = svc.storage
    if msg.streamed and (msg.token or msg.data is not None or msg.size):
        raise RemoteProtocolError("a streamed upload has no size, token or inline data")
    if msg.data is not None:
        await check_quota(svc, msg)
        await _put_inline(svc, msg)  # checks "exists" atomically itself
        return
    if not msg.overwrite and storage.exists(msg.path):
        # Refused now, before PutReady: not after the client has sent the whole file. (The commit
        # repeats the check atomically: a file may still appear while the data is on its way.)
        raise ErrorCode.EXISTS.error(f"{msg.path} already exists")
    token = msg.token or secrets.token_hex(8)
    if not TOKEN_RE.fullmatch(token):
        raise RemoteProtocolError("bad upload token")
    svc.requests.check_id_free(msg.id)  # a second upload under one id would leak the first one's fd
    svc.failed.discard(msg.id)  # an id the client reuses after a failed upload names this one now
    cap = svc.ctx.limits.max_uploads
    if sum(isinstance(c, Upload) for c in svc.channels.values()) >= cap:
        # Each holds a descriptor: one connection must not exhaust the server's.
        raise ErrorCode.BUSY.error(
            f"too many unfinished uploads on this connection (at most {cap}); finish some first"
        )
    # Two uploads writing one partial (a retry while the server still serves the first connection)
    # could commit a file the other one truncated: the newest takes over, the older one stops.
    prel = partial_path(msg.path, token)
    key = (storage.home, prel)
    creations = await svc.creations()
    await admit_upload(svc, msg, prel)
    if creations is not None and creations.limit is not None and not storage.exists(msg.path):
        # A new name: refused now if the home is full, not after the data came (the commit checks
        # again, under the count's lock: another session may take the last place meanwhile).
        # Without a limit there is nothing to refuse: no path walk for it on every put.
        creations.check(msg.path)
    # Nor may one user's many connections hold too many (busy for this request; released by
    # Upload.close). Taken before anything of an older upload of this partial is touched.
    place = svc.hold(Kind.UPLOAD)
    # No await since the checks: reserve now, so parallel uploads see this one's share.
    name = svc.user.name
    usage, uploads = svc.ctx.usage, svc.ctx.uploads
    older = uploads.get(key)
    if older is not None and older.reserved:
        usage.release(name, older.reserved)  # (the newcomer's reservation replaces it)
        older.reserved = 0
    up = Upload(svc, msg, -1, "", [], time.monotonic(), key=key, creations=creations, hold=place)
    usage.reserve(name, msg.size)
    up.reserved = msg.size
    if msg.token:
        up.resumable = True
        usage.start_upload(name, msg.size)
    uploads[key] = up
    try:
        if older is not None:
            await older.supersede()  # before opening: its final rename may still be running
        up._check_owner()

        def foreign(prel: str, st: os.stat_result) -> None:
            # Never read, written or hashed (no content oracle): the name went to a fresh partial.
            svc.ctx.log.warning(
                "put user=%s path=%s: partial name held by a file ferry did not create (links=%d); "
                "replaced by a fresh partial, the file itself left alone",
                svc.user.name if svc.user else "-",
                prel,
                st.st_nlink,
            )

        # Released if this request is abandoned while the thread opens it (the partial itself stays
        # for a resume).
        up.fd, up.partial, have = await in_thread(
            lambda: storage.open_partial(msg.path, token, on_foreign=foreign),
            release=lambda opened: os.close(opened[0]),
        )
        # The partial is this upload's now: its bytes count in the reservation, not as idle.
        up.have = have
        usage.claim(name, up.partial)
        up._check_owner()
        n = min(have, msg.size) // msg.chunk_size
        if n:
            job = start_thread(hash_fd_chunks, up.fd, msg.hash, msg.chunk_size, 0, n * msg.chunk_size)
            up._pending = job
            await up._settle()
            up.held = job.result()
        up._check_owner()
    except BaseException:
        up.close()
        raise
    up.active_at = svc.host.read_waited()  # its idle clock starts when it may receive data
    svc.channels[msg.id] = up
    await svc.send(m.PutReady(id=msg.id, chunk_hashes=up.held))


async def _put_inline(svc: TransferService, msg: m.PutFile) -> None:
    t0 = time.monotonic()
    creations = await svc.creations()  # a new file counts against the file limit
    data = msg.data or b""
    hasher = ChunkHasher(msg.hash, msg.chunk_size)
    hasher.update(data)
    _, digest = hasher.finish()
    if len(data) != msg.size or (msg.digest and digest != msg.digest):
        raise ErrorCode.INTEGRITY.error(f"{msg.path}: inline data does not match its size or hash; nothing was kept")
    user = svc.user
    replaced = await svc.storage.store_small(
        user.name,
        parse_path(msg.path),
        data,
        mode=msg.mode,
        mtime=msg.mtime,
        overwrite=msg.overwrite,
        quota=user.quota,
        creations=creations,
    )
    _account(svc, msg.path, len(data), replaced)
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("put", msg.path, t0, nbytes=len(data))


def _existing_size(svc: TransferService, path: str) -> int:
    """Size of the regular file an upload will replace (0 if none): keeps usage incremental."""
    try:
        st = svc.storage.lstat(path)
    except RemoteError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _account(svc: TransferService, path: str, size: int, replaced: int) -> None:
    svc.ctx.usage.add(svc.user.name, size - replaced)


def _upload(svc: TransferService, req_id: int) -> Upload:
    up = svc.channels.get(req_id)
    if not isinstance(up, Upload):
        raise RemoteProtocolError(f"no upload in progress with id {req_id}")
    return up


async def handle_put_from(svc: TransferService, msg: m.PutFrom) -> None:
    """The client chose where to continue."""
    if msg.id in svc.failed:
        return  # closed by the server meanwhile (idle): the client has its Error, or will soon
    _upload(svc, msg.id).start(msg.offset)


async def handle_put_end(svc: TransferService, msg: m.FileEnd) -> None:
    """Verify and commit an upload; reply Ok or an Error (and discard a corrupt partial)."""
    if msg.id in svc.failed:
        svc.failed.discard(msg.id)
        return
    up = _upload(svc, msg.id)
    del svc.channels[msg.id]
    up.replaced = _existing_size(svc, up.msg.path)
    try:
        await up.finish(msg)
    except IntegrityError:
        up.discard()
        svc.log_op("put", up.msg.path, up.t0, "integrity-error", up.pos)
        raise
    except OSError as exc:
        up.discard()
        raise translate_oserror(exc, up.msg.path) from exc
    except BaseException:
        if not up.msg.token:  # the server chose the token: nobody could ever resume this partial
            up.discard()
        raise
    finally:
        up.close()  # every outcome: e.g. a commit refused by the jail must not leak the descriptor
    _account(svc, up.msg.path, up.pos, up.replaced)
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("put", up.msg.path, up.t0, nbytes=up.pos)


class TransferService(FolderService):
    """Downloads and uploads of one session; owns the ids of uploads that failed mid-stream."""

    worker_handlers = {m.GetFile: handle_get}
    reader_handlers = {m.PutFile: handle_put, m.PutFrom: handle_put_from, m.FileEnd: handle_put_end}

    def __init__(self, host: ServiceHost, storage: FolderStorage) -> None:
        super().__init__(host, storage)
        #: ids of uploads that failed mid-stream (their remaining data and FileEnd are dropped)
        self.failed: set[int] = set()

    def fail_upload(self, req_id: int) -> None:
        """An upload's data could not be written: drop it and remember the id, so its remaining data
        and FileEnd are ignored (the caller sends the Error reply)."""
        up = self.channels.pop(req_id, None)
        if isinstance(up, Upload):
            up.discard()
        self.failed.add(req_id)
