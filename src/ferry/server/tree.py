"""Tree transfers on the server: a whole folder per request instead of one request per file.

Download (``GetTree``): the jail walks the folder once (:class:`~ferry.server.jail.TreeScan`: one
descriptor per folder, files opened relative to it, never following a symlink) and the records go
out back to back in :class:`~ferry.wire.messages.TreeItems` batches of ~256 KiB. Each batch is read
and hashed in a thread while the previous one is being sent; ``send`` waits on the transport's
drain, so a client that reads slowly holds the server at one batch in the thread, one being sent
and the transport's high-water mark: never the whole tree. Files above the inline limit are
announced without data; the client fetches them with ``GetFile`` (streaming, resumable).

Upload (``PutTree`` then ``TreeItems``): the reader hands each batch to a thread that stores its
files through :class:`~ferry.server.jail.TreeDirs` (cached folder descriptors; each file checked
against its digest, written to a hidden temp name and renamed: atomic per file) while the next
batch is being received. A :class:`~ferry.wire.messages.TreeAck` per batch reports what was stored
and which records failed. Running out of quota or disk space ends the whole tree with an ``Error``;
what was stored before stays (complete files only).

Both directions log one line per tree (files, errors, bytes), not one per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ferry.aio import cancel_and_wait, settle
from ferry.compress import tree_batch, tree_records
from ferry.errors import DiskFull, FerryError, IntegrityError, RemoteError
from ferry.hashing import HashName, small_digest
from ferry.server import work
from ferry.server.openlimits import Hold, Kind
from ferry.server.service import FolderService
from ferry.server.walkers import TreeDir, TreeDirs, TreeFailure, TreeFile, TreeScan
from ferry.wire import Data, ProtocolError, RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, code_of, reply_for

#: Payload bytes (file data and paths) per TreeItems message: well below the 1 MiB message cap
#: even with one more inline file (256 KiB) and a maximal path on top.
BATCH_BYTES = 1 << 18
#: Records per TreeItems message (empty files and folders cost almost no bytes).
BATCH_ITEMS = 1024
#: Tree uploads open at once per connection (each holds a few folder descriptors).
MAX_TREES = 16


#: Bytes of error records per TreeAck: with the rest of the ack well below the 1 MiB message cap.
ACK_ERROR_BYTES = 1 << 19


def error_item(path: str, exc: BaseException) -> m.TreeItem:
    """The ``error`` record that reports ``path`` failed with ``exc`` (both backends)."""
    return m.TreeItem(
        path=_wire_path(path), kind="error", code=code_of(exc).value, message=_wire_text(str(exc))[:8192]
    )


def _wire_path(path: str) -> str:
    """``path`` as valid UTF-8 cut to what a wire path may hold (an error record only names it)."""
    text = _wire_text(path)
    if len(text) > m.MAX_PATH_CHARS:
        text = text[: m.MAX_PATH_CHARS - 3] + "..."
    return text


def wire_cost(item: m.TreeItem) -> int:
    """An upper bound of the encoded size of ``item`` without its data (UTF-8: 4 bytes a character
    at most)."""
    cost = 64 + len(item.path) * (1 if item.path.isascii() else 4) + len(item.code)
    if item.message:
        cost += len(item.message) * (1 if item.message.isascii() else 4)
    return cost


def _wire_text(text: str) -> str:
    """``text`` as valid UTF-8: a name that is not (undecodable bytes on the server's disk) would
    make the whole message unencodable."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- download ------------------------------------------------------------------------------


class RecordItems:
    """Turns tree records (:class:`TreeFile`, :class:`TreeDir`, :class:`TreeFailure`) into wire
    records, counting the files, bytes and errors of one tree (both backends' tree downloads)."""

    def __init__(self, hash: HashName) -> None:
        self.hash = hash
        self.files = 0
        self.errors = 0
        self.bytes = 0

    def item(self, rec: TreeFile | TreeDir | TreeFailure) -> m.TreeItem:
        """The wire record of ``rec`` (an error record when it cannot travel as it is)."""
        if not isinstance(rec, TreeFailure) and len(rec.path) > m.MAX_PATH_CHARS:
            # Legal on disk (a folder renamed into a deep one), but the client would have to reject
            # the whole message: report it instead.
            self.errors += 1
            return error_item(
                rec.path,
                ErrorCode.BAD_PATH.error(f"the path is too long to send (at most {m.MAX_PATH_CHARS})"),
            )
        if isinstance(rec, TreeFile):
            path = rec.path
            if not path.isascii():
                try:
                    path.encode("utf-8")
                except UnicodeEncodeError:
                    self.errors += 1
                    return error_item(path, ErrorCode.BAD_PATH.error("the name is not valid UTF-8"))
            self.files += 1
            self.bytes += rec.size
            if rec.data is None:
                return m.TreeItem(
                    path=path, kind="file", size=rec.size, mtime=m.wire_time(rec.mtime), mode=rec.mode
                )
            return m.TreeItem(
                path=path,
                kind="file",
                size=rec.size,
                mtime=m.wire_time(rec.mtime),
                mode=rec.mode,
                data=rec.data,
                digest=small_digest(self.hash, rec.data),
            )
        if isinstance(rec, TreeDir):
            try:
                rec.path.encode("utf-8")
            except UnicodeEncodeError:
                self.errors += 1
                return error_item(rec.path, ErrorCode.BAD_PATH.error("the name is not valid UTF-8"))
            return m.TreeItem(path=rec.path, kind="dir")
        self.errors += 1
        return error_item(rec.path, rec.error)


def batch_full(items: list[m.TreeItem], size: int) -> bool:
    """True when a TreeItems batch of ``items`` (``size``: their :func:`wire_cost` plus data) is
    full: the one rule both backends cut their tree downloads by."""
    return size >= BATCH_BYTES or len(items) >= BATCH_ITEMS


def item_size(item: m.TreeItem) -> int:
    """What ``item`` adds to a batch: its :func:`wire_cost` (error messages count too: they may
    repeat a long path) and its data."""
    return wire_cost(item) + (len(item.data) if item.data is not None else 0)


class _Batches(RecordItems):
    """Turns tree records (a :class:`TreeScan`, or named files) into TreeItems batches (called in a
    thread, one call at a time)."""

    def __init__(
        self, scan: Iterator[TreeFile | TreeDir | TreeFailure], hash: HashName, check: Callable[[], None]
    ) -> None:
        super().__init__(hash)
        self.scan = scan
        self.check = check

    def next(self) -> tuple[list[m.TreeItem], bool]:
        """The next batch, and whether the scan is complete."""
        items: list[m.TreeItem] = []
        size = 0
        check = self.check
        for rec in self.scan:
            check()
            item = self.item(rec)
            items.append(item)
            size += item_size(item)
            if batch_full(items, size):
                return items, False
        return items, True


async def handle_get_tree(svc: TreeService, msg: m.GetTree) -> None:
    """Stream folder ``msg.path`` to the client as TreeItems batches."""
    try:
        await _serve_get_tree(svc, msg)
    finally:
        svc.requests.download_done(msg.id)


async def _serve_get_tree(svc: TreeService, msg: m.GetTree) -> None:
    with svc.hold(Kind.DOWNLOAD):  # it holds a file and folders open until it ends
        async with work.current.get().walk_slot():
            storage = svc.storage
            scan = await work.in_thread(
                lambda: storage.scan_tree(msg.path, inline_max=msg.inline_max), release=TreeScan.close
            )
            await serve_records(svc, msg.id, msg.path, msg.hash, scan, scan.close, "get-tree")


async def serve_records(
    svc: FolderService,
    req_id: int,
    path: str,
    hash: HashName,
    records: Iterator[TreeFile | TreeDir | TreeFailure],
    close: Callable[[], object],
    op: str,
    pack: bool = False,
) -> None:
    """Stream ``records`` as TreeItems batches for request ``req_id`` (a GetTree, or a sync's
    GetFiles): each batch is read, hashed and with ``pack`` zstd-packed in the walk pool while the
    previous one is sent; a Cancel stops it between batches. ``close`` releases what the records
    hold, once no thread uses them; one log line ``op``. The caller holds one of the session's walk
    slots."""
    t0 = time.monotonic()
    batches = _Batches(records, hash, work.current.get().check)

    def next_batch() -> tuple[m.TreeItems, bool]:
        items, done = batches.next()
        return tree_batch(req_id, items, done, pack), done

    result = "ok"
    try:
        # The next batch is read while this one is encrypted and sent.
        async with contextlib.aclosing(work.prefetched(next_batch, close)) as steps:
            async for batch, _done in steps:
                if req_id in svc.requests.cancelled:
                    result = "cancelled"
                    await svc.send(ErrorCode.CANCELLED.reply(req_id, "tree download cancelled"))
                    return
                await svc.send(batch)
    except BaseException:
        result = "aborted"
        raise
    finally:
        svc.requests.download_done(req_id)
        svc.log_op(op, path, t0, f"{result} files={batches.files} errors={batches.errors}", batches.bytes)


# --- upload --------------------------------------------------------------------------------


@dataclass
class StoredBatch:
    """What one batch job did."""

    files: int = 0
    bytes: int = 0
    delta: int = 0  # change of the home's usage: new bytes minus the sizes of files replaced
    errors: list[m.TreeItem] = field(default_factory=list)
    fatal: FerryError | None = None
    error_bytes: int = 0  # wire cost of ``errors`` (see ACK_ERROR_BYTES)
    unlisted: int = 0  # failed records beyond that budget: counted, summed up in one record

    def fail(self, item: m.TreeItem) -> None:
        """Record a failed record, as long as the acknowledgement stays within its message limit."""
        cost = wire_cost(item)
        if self.unlisted or self.error_bytes + cost > ACK_ERROR_BYTES:
            if not self.unlisted:
                self.errors.append(item)  # placeholder, replaced by the summary in finish()
            self.unlisted += 1
            return
        self.error_bytes += cost
        self.errors.append(item)

    def finish(self) -> None:
        """Replace the records beyond the budget by one that counts them."""
        if self.unlisted:
            first = self.errors[-1]
            self.errors[-1] = m.TreeItem(
                path=first.path,
                kind="error",
                code=first.code,
                message=f"{first.message[:1024]} (and {self.unlisted - 1} more failed record(s) of "
                "this batch, not listed)",
            )

    @property
    def failed(self) -> int:
        """How many records of the batch failed."""
        return len(self.errors) + max(self.unlisted - 1, 0)


def record_data(it: m.TreeItem, hash: HashName, client_path: Callable[[str], str]) -> bytes | None:
    """The data of tree upload record ``it``, checked (None for a folder record): ``bad-request``
    for a record that is neither a folder nor a file with its data (a broken client: the tree
    ends), ``integrity`` when the data does not match its size and digest. ``client_path`` names
    the record's path in messages (both backends)."""
    if it.kind == "dir":
        return None
    data = it.data
    if it.kind != "file" or data is None:
        raise ErrorCode.BAD_REQUEST.error(
            f"{it.path}: a tree upload record must be a folder or a file with its data",
        )
    if len(data) != it.size or small_digest(hash, data) != it.digest:
        raise ErrorCode.INTEGRITY.error(
            f"{client_path(it.path)}: received data does not match its hash; nothing was kept for it"
        )
    return data


class TreeUpload:
    """A tree upload in progress, registered in the session's channels under its id (so Cancel and
    the end of the session abort it like any upload)."""

    def __init__(self, svc: FolderService, msg: m.PutTree, dirs: TreeDirs, place: Hold) -> None:
        self.svc = svc
        self.msg = msg
        self.dirs = dirs
        self.hold = place  #: its place in the user's open uploads, given back with the folders
        #: the session's read_waited() at its last batch (ferry.server.service.Upload)
        self.active_at = svc.host.read_waited()
        self.t0 = time.monotonic()
        self.files = 0
        self.bytes = 0
        self.errors = 0
        self.dead = False  # failed or aborted: later batches are dropped
        self._job: asyncio.Future[StoredBatch] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._reserved = 0
        self._job_tracked = True
        self._stop = False
        self._finished = False  # folders released and logged

    async def on_data(self, ev: Data) -> None:
        """Tree uploads carry their bytes inside TreeItems; a data frame for one is a client bug."""
        raise RemoteProtocolError(f"data frame for tree upload {self.msg.id}")

    async def add(self, batch: m.TreeItems) -> None:
        """Store ``batch`` in a thread (after the previous batch has been stored and acknowledged)."""
        self.active_at = self.svc.host.read_waited()
        if self._acker is not None:
            await self._acker  # never raises: it reports failures itself
        if self.dead:
            return
        svc = self.svc
        user = svc.user
        budget: list[int] | None = None
        if user.quota is not None:
            used = await svc.current_usage() + svc.ctx.usage.reserved(user.name)
            budget = [user.quota - used]
        size = sum(len(it.data) for it in batch.items if it.data is not None)
        # Set aside while the thread writes, so uploads in other sessions do not count on it too.
        svc.ctx.usage.reserve(user.name, size)
        self._reserved = size
        # Usage is tracked incrementally once known (quota, df): then each file's predecessor must
        # be looked at. Otherwise that lstat per file is skipped; see _account.
        track = budget is not None or svc.ctx.usage.known(user.name) is not None
        self._job_tracked = track
        # Each folder and new file of the batch counts against the file limit, in the thread, as
        # it is made (with the limit of the moment: an admin may change it between batches).
        self.dirs.creations = await svc.creations()
        # A batch is an expensive operation of the session (up to 1,024 folders and files): it
        # takes one of the session's walk slots until its job is done.
        release_slot = await work.current.get().acquire_walk_slot()
        if self.dead:  # aborted while waiting for the slot
            release_slot()
            svc.ctx.usage.release(user.name, size)
            self._reserved = 0
            return
        self._job = work.start_walk(self._store, batch.items, budget, track)
        self._job.add_done_callback(lambda _f: release_slot())
        self._acker = asyncio.create_task(self._ack(self._job, batch.end, track))
        if batch.end:
            await self._acker

    def _store(self, items: list[m.TreeItem], budget: list[int] | None, track: bool) -> StoredBatch:
        """Write one batch (thread). Stops at the first fatal error (quota, disk full, integrity)."""
        out = StoredBatch()
        dirs, hash, overwrite = self.dirs, self.msg.hash, self.msg.overwrite
        quota = self.svc.user.quota if self.svc.user else None
        for it in items:
            if self._stop:  # aborted (Cancel, connection lost): leave the rest of the batch
                break
            try:
                data = record_data(it, hash, dirs.client_path)
                if data is None:
                    dirs.mkdir(it.path)
                    continue

                def admit(replaced: int, it: m.TreeItem = it) -> None:
                    assert budget is not None
                    need = it.size - replaced
                    if need > budget[0]:
                        raise ErrorCode.QUOTA.error(
                            f"quota exceeded: {dirs.client_path(it.path)} needs {it.size} bytes, "
                            f"{max(budget[0], 0)} of {quota} left; remove files (ferry rm) or ask an "
                            "admin to raise the quota",
                        )
                    budget[0] -= need

                replaced = dirs.store(
                    it.path,
                    data,
                    mode=it.mode,
                    mtime=it.mtime,
                    overwrite=overwrite,
                    admit=admit if budget is not None else None,
                    inspect=track,
                )
                out.files += 1
                out.bytes += len(data)
                out.delta += len(data) - replaced
            except (DiskFull, IntegrityError) as exc:
                out.fatal = exc
                break
            except RemoteError as exc:
                if exc.code == ErrorCode.BAD_REQUEST:  # a broken client: the rest is no better
                    out.fatal = exc
                    break
                out.fail(error_item(it.path, exc))
            except FerryError as exc:
                out.fail(error_item(it.path, exc))
        # Between batches the tree holds its root folder only: a client that stops sending must
        # not keep 32 folders open per tree upload (issue 10, break 3). Reopening a batch's
        # folders costs one openat each, against a batch of up to 1,024 records.
        dirs.trim()
        out.finish()
        return out

    async def _ack(self, job: asyncio.Future[StoredBatch], end: bool, track: bool) -> None:
        """Account for a finished batch and report it (TreeAck), or end the tree on a fatal error."""
        svc = self.svc
        try:
            try:
                out = await asyncio.shield(job)
            except Exception as exc:  # a bug in the job: fail this tree, keep the session
                svc.ctx.log.exception("internal error storing a tree batch")
                out = StoredBatch(fatal=ErrorCode.INTERNAL.error(f"internal server error ({type(exc).__name__})"))
            self._account(out, track)
            if self._job is job:
                self._job = None  # accounted: an abort from now on must not count it again
            if out.fatal is not None:
                await self._fail(out.fatal)
                return
            await svc.send(
                m.TreeAck(id=self.msg.id, files=self.files, bytes=self.bytes, errors=out.errors, end=end)
            )
            if end:
                self._finish("ok")
        except (ConnectionError, OSError, ProtocolError) as exc:
            # The session is ending: its cleanup calls abort(), which releases the folders.
            self.dead = True
            svc.ctx.log.debug("tree upload %d: %s", self.msg.id, exc)

    def _account(self, out: StoredBatch, track: bool = True) -> None:
        user = self.svc.user
        usage = self.svc.ctx.usage
        if self._reserved:
            usage.release(user.name, self._reserved)
            self._reserved = 0
        if track:
            usage.add(user.name, out.delta)
        elif out.files:
            # Not tracked while this batch was written (sizes replaced unknown). If usage became
            # known meanwhile (a df in another session), it may be off: recompute it next time.
            usage.invalidate(user.name)
        if self.dirs.creations is None:
            usage.entry_count(user.name).forget()  # (likewise, entries made without counting)
        self.files += out.files
        self.bytes += out.bytes
        self.errors += out.failed

    async def _fail(self, exc: FerryError) -> None:
        reply = reply_for(self.msg.id, exc)
        self._finish(f"failed:{reply.code}")
        await self.svc.send(reply)

    def _finish(self, result: str) -> None:
        """Unregister, release the folders, log the one line of this tree (once)."""
        self.dead = True
        if self._finished:
            return
        self._finished = True
        if self.svc.channels.get(self.msg.id) is self:
            del self.svc.channels[self.msg.id]
        self.dirs.close()
        self.hold.release()
        self.svc.log_op(
            "put-tree",
            self.msg.path,
            self.t0,
            f"{result} files={self.files} errors={self.errors}",
            self.bytes,
        )

    def working(self) -> bool:
        """A batch is being stored or acknowledged (see :class:`ferry.server.service.Upload`)."""
        return any(f is not None and not f.done() for f in (self._job, self._acker))

    async def expire(self, timeout: float) -> m.Error:
        """No batch for ``timeout`` seconds: stop; the files stored so far stay; say so."""
        await self.abort()
        return ErrorCode.CANCELLED.reply(
            self.msg.id,
            f"{self.msg.path}: no data for {timeout:g} s, so the server closed this tree upload; the files "
            "stored so far stay (run it again to send the rest)",
        )

    async def abort(self) -> None:
        """Cancelled or the connection ended: stop; files already stored stay (complete ones only)."""
        if self._finished:
            return
        self.dead = True
        self._stop = True  # the thread stops before its next file
        job = self._job
        try:
            await cancel_and_wait(self._acker)
            if job is not None:
                # Wait (at most one file) so that once a Cancel is answered nothing more is
                # written: no temp file of this tree can appear afterwards. If this wait is itself
                # cancelled (server shutdown), the callback below still releases everything.
                await settle(job)
        finally:
            self._release_after(job)

    def _release_after(self, job: asyncio.Future[StoredBatch] | None) -> None:
        """Release what the aborted upload holds, now or once its thread's job has ended."""

        def release() -> None:
            if job is not None and job.done() and not job.cancelled() and job.exception() is None:
                # What the thread stored still counts towards usage.
                self._account(job.result(), self._job_tracked)
            elif self._reserved:
                self._account(StoredBatch())
            self._finish("aborted")

        if job is not None and not job.done():
            job.add_done_callback(lambda _f: release())
        else:
            release()


async def handle_put_tree(svc: TreeService, msg: m.PutTree) -> None:
    """Open (create) the tree's root and register the upload; no reply until its first batch."""
    svc.requests.check_id_free(msg.id)
    if sum(isinstance(c, TreeUpload) for c in svc.channels.values()) >= MAX_TREES:
        raise ErrorCode.BUSY.error(f"too many tree uploads on this connection (at most {MAX_TREES})")
    storage = svc.storage
    if svc.user.quota is not None:
        await svc.current_usage()  # computed once, before the first batch needs it
    creations = await svc.creations()  # the folders of the tree's root count too
    place = svc.hold(Kind.UPLOAD)  # its folders stay open until the tree ends
    try:
        dirs = await work.in_thread(
            lambda: storage.tree_dirs(msg.path, creations=creations), release=TreeDirs.close
        )
    except BaseException:
        place.release()
        raise
    svc.channels[msg.id] = TreeUpload(svc, msg, dirs, place)


async def handle_tree_items(svc: TreeService, msg: m.TreeItems) -> None:
    """A batch of a tree upload (unpacked first if the client packed it, ``-z``); batches of a
    cancelled or failed tree are dropped."""
    up = svc.channels.get(msg.id)
    if up is None:
        return
    if not isinstance(up, TreeUpload):
        raise RemoteProtocolError(f"request {msg.id} is not a tree upload")
    if msg.packed:
        msg = m.TreeItems(id=msg.id, items=tree_records(msg), end=msg.end)
    await up.add(msg)


class TreeService(FolderService):
    """Tree downloads and uploads of one session (its uploads are registered as channels)."""

    worker_handlers = {m.GetTree: handle_get_tree}
    reader_handlers = {m.PutTree: handle_put_tree, m.TreeItems: handle_tree_items}
