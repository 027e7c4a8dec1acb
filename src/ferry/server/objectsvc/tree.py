"""Tree transfers on the object backend: ``GetTree``, and ``PutTree`` with its ``TreeItems`` batches.

The wire is the folder backend's (:mod:`ferry.server.tree`): the same records in the same order
(a folder's files, names sorted, then each subfolder's record and contents, depth first), batches cut
by the same rule, the same acknowledgements, refusals and error records; a client cannot tell the
backends apart. What differs is where the records come from and go to:

- **Download**: a folder is listed a page at a time (one query per 1,000 entries), and the bytes of
  its small files are fetched many per query (:meth:`~ferry.store.objects.ObjectStorage.read_small_many`:
  small files live inline in the database). The next batch is read while one is sent: memory holds
  a read group, one batch being built and one being sent, never the tree. Files above the inline
  limit are announced without data, as on the folder backend; the client fetches them with
  ``GetFile`` (the transfer service streams them by chunk).
- **Upload**: each batch is stored in a few transactions, not one per file: its folder records in
  one :meth:`~ferry.store.objects.ObjectStorage.mkdir_many`, its files in one
  :meth:`~ferry.store.objects.ObjectStorage.store_small_many` (one owner lock, one quota check, the
  rows as arrays). The next batch is received while one is stored. The quota is checked by the
  database across servers; running out of it ends the tree with an ``Error`` after the files before
  the one that did not fit were stored, as on the folder backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import ClassVar, TypeVar

from ferry.aio import aclose_quietly, cancel_and_wait, settle
from ferry.compress import tree_batch, tree_records
from ferry.errors import DiskFull, FerryError, IntegrityError, RemoteError, StoreUnavailable
from ferry.hashing import HashName
from ferry.server import work
from ferry.server.objectsvc.files import ObjectService
from ferry.server.objectsvc.smallio import SmallFile, SmallRead, mkdir_many, read_small_many, store_small_many
from ferry.server.openlimits import Hold, Kind
from ferry.server.pathrules import join_path, parse_path, refuse_reserved
from ferry.server.service import Handler
from ferry.server.tree import (
    MAX_TREES,
    RecordItems,
    StoredBatch,
    batch_full,
    error_item,
    item_size,
    record_data,
)
from ferry.server.walkers import TreeDir, TreeFailure, TreeFile
from ferry.store.api import Node, Parts, show
from ferry.store.objects import ObjectStorage
from ferry.wire import Data, ProtocolError, RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, reply_for

T = TypeVar("T")
Record = TreeFile | TreeDir | TreeFailure

#: Batches of a tree download made ahead of the one being sent (~256 KiB each): the database and
#: the store answer in milliseconds, so reading only one batch ahead left the connection idle
#: while the next group of files was read.
AHEAD_BATCHES = 8
#: Batches of a tree upload stored together at most (the client's window: ferry.client.tree.WINDOW),
#: and received ahead of the group being stored before the reader waits.
GROUP_BATCHES = 8
#: Entries per folder listing query.
LIST_PAGE = 1000
#: Small files whose bytes one query fetches, and the bytes they may add up to (by their listed
#: sizes): bounds the memory of a read group whatever the folder holds.
READ_FILES = 1000
READ_BYTES = 4 << 20
#: Groups of files read at once in a tree download (memory: this many times READ_BYTES at most).
READS_AHEAD = 4


# --- download ------------------------------------------------------------------------------


async def read_group(
    storage: ObjectStorage, user: str, paths: Sequence[Parts], max_size: int
) -> list[SmallRead | RemoteError]:
    """The nodes (and bytes, up to ``max_size``) of ``paths``: :meth:`ObjectStorage.read_small_many`,
    whose per-path errors are returned in place; ``unavailable`` (the store away) raises, since no
    later record would fare better."""
    if not paths:
        return []
    found = await read_small_many(storage, user, paths, max_size=max_size)
    for res in found:
        if isinstance(res, StoreUnavailable):
            raise res
    return found


def file_record(rel: str, res: SmallRead | RemoteError) -> Record:
    """The record of file ``rel`` from its read (an error record when it could not be read)."""
    if isinstance(res, RemoteError):
        return TreeFailure(rel, res)
    node = res.node
    if node.kind != "file":  # swapped for a folder since listed
        return TreeFailure(
            rel, ErrorCode.NOT_A_FILE.error(f"{show(tuple(rel.split('/')))} is not a regular file")
        )
    return TreeFile(rel, node.size, node.mtime, node.mode, res.data)


#: The records of a group of files, being read (see :func:`in_order`).
Pending = asyncio.Task[list[Record]]


async def in_order(units: AsyncIterator[Record | Pending], depth: int) -> AsyncIterator[Record]:
    """The records of ``units`` in their order, where a unit is a record or a group of them being
    read: up to ``depth`` groups are read at once, ahead of the one whose records are handed out
    (the database and the store answer a group in milliseconds; one at a time, a tree download
    waited for each in turn)."""
    window: deque[Record | Pending] = deque()
    pending = 0
    try:
        async for unit in units:
            window.append(unit)
            if isinstance(unit, asyncio.Future):
                pending += 1
            while window and (not isinstance(window[0], asyncio.Future) or pending > depth):
                first = window.popleft()
                if isinstance(first, asyncio.Future):
                    pending -= 1
                    for rec in await first:
                        yield rec
                else:
                    yield first
        while window:
            first = window.popleft()
            if isinstance(first, asyncio.Future):
                for rec in await first:
                    yield rec
            else:
                yield first
    finally:
        # The caller stopped early (an error, a cancel): drop the reads.
        try:
            await cancel_and_wait(*(u for u in window if isinstance(u, asyncio.Future)))
        finally:
            await aclose_quietly(units)


async def _folder_records(
    storage: ObjectStorage, user: str, folder: Parts, rel: str, inline_max: int, subdirs: list[str]
) -> AsyncIterator[Pending]:
    """The file records of ``folder`` (``rel`` below the tree's root), names sorted, small ones with
    their bytes, as groups being read; its subfolders' names are appended to ``subdirs``."""
    prefix = f"{rel}/" if rel else ""
    after = ""
    while True:
        page = await storage.list_dir(user, folder, after=after, limit=LIST_PAGE)
        group: list[Node] = []
        small = 0
        for node in page:
            if node.kind == "dir":
                subdirs.append(node.name)
                continue
            if node.kind != "file":
                continue
            group.append(node)
            if node.size <= inline_max:
                small += node.size
            if len(group) >= READ_FILES or small >= READ_BYTES:
                yield asyncio.ensure_future(_group_records(storage, user, folder, prefix, group, inline_max))
                group, small = [], 0
        if group:
            yield asyncio.ensure_future(_group_records(storage, user, folder, prefix, group, inline_max))
        if len(page) < LIST_PAGE:
            return
        after = page[-1].name


async def _group_records(
    storage: ObjectStorage, user: str, folder: Parts, prefix: str, group: list[Node], inline_max: int
) -> list[Record]:
    """Records of the listed files ``group`` in order: large ones announced as listed, small ones
    read (many per query) as they are now."""
    small = [n for n in group if n.size <= inline_max]
    reads = await read_group(storage, user, [(*folder, n.name) for n in small], inline_max)
    found = dict(zip((n.name for n in small), reads, strict=True))
    out: list[Record] = []
    for node in group:
        res = found.get(node.name)
        if res is None:
            out.append(TreeFile(prefix + node.name, node.size, node.mtime, node.mode, None))
        else:
            out.append(file_record(prefix + node.name, res))
    return out


def walk_tree(storage: ObjectStorage, user: str, top: Parts, inline_max: int) -> AsyncIterator[Record]:
    """The records of folder ``top`` in the folder backend's order (see
    :class:`ferry.server.walkers.TreeScan`): a folder's files, then for each subfolder its record
    and its contents, depth first. A subfolder that vanished midway is an error record. Folders are
    listed while the files of earlier ones are read (:data:`READS_AHEAD` groups at once)."""
    return in_order(_walk_units(storage, user, top, inline_max), READS_AHEAD)


async def _walk_units(
    storage: ObjectStorage, user: str, top: Parts, inline_max: int
) -> AsyncIterator[Record | Pending]:
    subdirs: list[str] = []
    async for rec in _folder_records(storage, user, top, "", inline_max, subdirs):
        yield rec
    stack: list[tuple[str, list[str]]] = [("", subdirs[::-1])]
    while stack:
        rel, todo = stack[-1]
        if not todo:
            stack.pop()
            continue
        name = todo.pop()
        sub = f"{rel}/{name}" if rel else name
        yield TreeDir(sub)
        subdirs = []
        try:
            async for rec in _folder_records(
                storage, user, (*top, *sub.split("/")), sub, inline_max, subdirs
            ):
                yield rec
        except StoreUnavailable:
            raise
        except RemoteError as exc:  # removed or replaced by a file since listed
            yield TreeFailure(sub, exc)
            subdirs = []
        stack.append((sub, subdirs[::-1]))


async def read_ahead(source: AsyncIterator[T], depth: int = 1) -> AsyncGenerator[T, None]:
    """``source``'s items, made by a task of their own while the caller works on earlier ones: at
    most ``depth`` made and not yet taken (the memory bound), one more being made."""
    queue: asyncio.Queue[tuple[bool, T | None, BaseException | None]] = asyncio.Queue(max(1, depth))

    async def produce() -> None:
        try:
            async for item in source:
                await queue.put((True, item, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the caller, who raises it in its own task
            await queue.put((False, None, exc))
            return
        await queue.put((False, None, None))

    task = asyncio.ensure_future(produce())
    try:
        while True:
            more, item, exc = await queue.get()
            if exc is not None:
                raise exc
            if not more:
                return
            yield item  # type: ignore[misc]  # (an item whenever ``more``)
    finally:
        try:
            await cancel_and_wait(task)
        finally:
            await aclose_quietly(source)


async def _batches(
    req_id: int, records: AsyncIterator[Record], items: RecordItems, pack: bool
) -> AsyncIterator[m.TreeItems]:
    """TreeItems batches of ``records``, cut as the folder backend cuts them; the last has ``end``
    (an empty tree is one empty batch). Packing (zstd) runs in the session's file threads."""

    async def finish(batch: list[m.TreeItem], end: bool) -> m.TreeItems:
        if pack and batch:
            return await work.in_thread(tree_batch, req_id, batch, end, pack)
        return tree_batch(req_id, batch, end, False)

    batch: list[m.TreeItem] = []
    size = 0
    async for rec in records:
        item = items.item(rec)
        batch.append(item)
        size += item_size(item)
        if batch_full(batch, size):
            yield await finish(batch, False)
            batch, size = [], 0
    yield await finish(batch, True)


async def serve_records(
    svc: ObjectService,
    req_id: int,
    path: str,
    hash: HashName,
    records: AsyncIterator[Record],
    op: str,
    pack: bool = False,
) -> None:
    """Stream ``records`` as TreeItems batches for request ``req_id`` (a GetTree, or a sync's
    GetFiles), the next batch read while one is sent; a Cancel stops it between batches; one log
    line ``op``."""
    t0 = time.monotonic()
    items = RecordItems(hash)
    result = "ok"
    try:
        batches_ahead = read_ahead(_batches(req_id, records, items, pack), AHEAD_BATCHES)
        async with contextlib.aclosing(batches_ahead) as batches:
            async for batch in batches:
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
        svc.log_op(op, path, t0, f"{result} files={items.files} errors={items.errors}", items.bytes)


async def handle_get_tree(svc: ObjectTreeService, msg: m.GetTree) -> None:
    """Stream folder ``msg.path`` to the client as TreeItems batches."""
    try:
        with svc.hold(Kind.DOWNLOAD):
            top = parse_path(msg.path)
            node = await svc.storage.stat(svc.user.name, top)
            if node.kind != "dir":
                raise ErrorCode.NOT_A_DIRECTORY.error(f"{show(top)} is not a folder")
            records = walk_tree(svc.storage, svc.user.name, top, msg.inline_max)
            await serve_records(svc, msg.id, msg.path, msg.hash, records, "get-tree")
    finally:
        svc.requests.download_done(msg.id)


# --- upload --------------------------------------------------------------------------------


def record_parts(root: Parts, rel: str, *, file: bool) -> Parts:
    """The home-relative components of upload record ``rel`` under the tree's ``root``, refused as
    the folder backend refuses it: any client path rule (``bad-path``, ``outside-home``), a name
    in the partial-upload namespace (``reserved-name``), a path deeper than the jail goes
    (``too-deep``)."""
    parts = parse_path(rel)
    if not parts:
        raise ErrorCode.BAD_PATH.error(
            "a file record needs a name" if file else "a folder record needs a name"
        )
    full = (*root, *parts)
    for name in parts:
        refuse_reserved(name, join_path(full))
    return full


class _Ops:
    """The valid records of a group of batches, in order (keyed by batch and record), as runs of
    folder and file operations."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, list[tuple[tuple[int, int], Parts, SmallFile | None]]]] = []
        self.files: set[Parts] = set()
        self.conflict = False  # a folder record at or below a file record of the same batch

    def add(self, key: tuple[int, int], parts: Parts, data: bytes | None, it: m.TreeItem) -> None:
        kind = "dir" if data is None else "file"
        if data is None:
            self.conflict = self.conflict or any(parts[:n] in self.files for n in range(1, len(parts) + 1))
            op = None
        else:
            self.files.add(parts)
            op = SmallFile(parts, data, mode=it.mode & 0o777 or 0o644, mtime=it.mtime)
        if not self.runs or self.runs[-1][0] != kind:
            self.runs.append((kind, []))
        self.runs[-1][1].append((key, parts, op))

    def ordered(self) -> list[tuple[str, list[tuple[tuple[int, int], Parts, SmallFile | None]]]]:
        """The runs to carry out: all folders first, then all files (two statements for a batch), unless
        a folder record lies at or below a file record, where the order decides which one fails."""
        if self.conflict:
            return self.runs
        dirs = [op for kind, run in self.runs if kind == "dir" for op in run]
        files = [op for kind, run in self.runs if kind == "file" for op in run]
        return [run for run in (("dir", dirs), ("file", files)) if run[1]]


class ObjectTreeUpload:
    """A tree upload in progress on the object backend, registered in the session's channels under
    its id (so Cancel and the end of the session abort it like any upload)."""

    def __init__(self, svc: ObjectTreeService, msg: m.PutTree, root: Parts, place: Hold) -> None:
        self.svc = svc
        self.msg = msg
        self.root = root
        self.hold = place  #: its place in the user's open uploads
        #: the session's read_waited() at its last batch (ferry.server.service.Upload)
        self.active_at = svc.host.read_waited()
        self.t0 = time.monotonic()
        self.files = 0
        self.bytes = 0
        self.errors = 0
        self.dead = False  # failed or aborted: later batches are dropped
        self._job: asyncio.Task[list[StoredBatch]] | None = None
        self._acker: asyncio.Task[None] | None = None  # stores and acknowledges what is queued
        #: batches received, not yet being stored (see add: stored together when they pile up)
        self._queue: list[m.TreeItems] = []
        self._room = asyncio.Event()  # set when the queue has room (the reader may go on)
        self._stop = False
        self._finished = False

    async def on_data(self, ev: Data) -> None:
        """Tree uploads carry their bytes inside TreeItems; a data frame for one is a client bug."""
        raise RemoteProtocolError(f"data frame for tree upload {self.msg.id}")

    async def add(self, batch: m.TreeItems) -> None:
        """Queue ``batch`` to be stored and acknowledged; the reader goes on receiving meanwhile.

        Group commit: the batches that arrive while one group is being stored are stored together
        next, in one call (one transaction), and acknowledged one by one. A fast database takes
        them one at a time; a slow one (every commit waits for its log to reach the disk) takes
        up to the client's whole window at once instead of paying a commit per batch."""
        self.active_at = self.svc.host.read_waited()
        while len(self._queue) >= GROUP_BATCHES and not self.dead:  # the reader waits: TCP pushes back
            self._room.clear()
            await self._room.wait()
        if self.dead:
            return
        self._queue.append(batch)
        if self._acker is None or self._acker.done():
            self._acker = asyncio.ensure_future(self._drain())
        if batch.end:
            await self._acker  # never raises: it reports failures itself

    def _client_path(self, rel: str) -> str:
        return join_path((*self.root, rel)) if self.root else rel

    async def _drain(self) -> None:
        """Store and acknowledge the queued batches, a group at a time, until none is left."""
        svc = self.svc
        try:
            while self._queue and not self.dead:
                group = self._queue[:GROUP_BATCHES]
                del self._queue[: len(group)]
                self._room.set()
                self._job = asyncio.ensure_future(self._store([b.items for b in group]))
                try:
                    outs = await asyncio.shield(self._job)
                except StoreUnavailable as exc:  # the database or the store went away mid-group
                    outs = [StoredBatch(fatal=exc)]
                except Exception as exc:  # a bug: fail this tree, keep the session
                    svc.ctx.log.exception("internal error storing a tree batch")
                    outs = [
                        StoredBatch(
                            fatal=ErrorCode.INTERNAL.error(f"internal server error ({type(exc).__name__})")
                        )
                    ]
                for batch, out in zip(group, outs, strict=False):  # (outs ends at a fatal error)
                    self.files += out.files
                    self.bytes += out.bytes
                    self.errors += out.failed
                    if out.fatal is not None:
                        await self._fail(out.fatal)
                        return
                    await svc.send(
                        m.TreeAck(
                            id=self.msg.id,
                            files=self.files,
                            bytes=self.bytes,
                            errors=out.errors,
                            end=batch.end,
                        )
                    )
                    if batch.end:
                        self._finish("ok")
        except (ConnectionError, OSError, ProtocolError) as exc:
            # The session is ending: its cleanup calls abort(), which releases the upload's place.
            self.dead = True
            svc.ctx.log.debug("tree upload %d: %s", self.msg.id, exc)

    async def _store(self, batches: list[list[m.TreeItem]]) -> list[StoredBatch]:
        """Store a group of batches in a few statements; what each did, in order. Stops at the first
        fatal error (quota, integrity, a broken record): what came before it is stored, and the
        list ends with the batch that holds it (its ``fatal`` set)."""
        outs = [StoredBatch() for _ in batches]
        ops = _Ops()
        fatal: tuple[int, FerryError] | None = None
        for b, items in enumerate(batches):
            for i, it in enumerate(items):
                try:
                    data = record_data(it, self.msg.hash, self._client_path)
                    ops.add((b, i), record_parts(self.root, it.path, file=data is not None), data, it)
                except (DiskFull, IntegrityError) as exc:
                    fatal = (b, exc)
                    break
                except RemoteError as exc:
                    if exc.code == ErrorCode.BAD_REQUEST:  # a broken client: the rest is no better
                        fatal = (b, exc)
                        break
                    outs[b].fail(error_item(it.path, exc))
                except FerryError as exc:
                    outs[b].fail(error_item(it.path, exc))
            if fatal is not None:
                break
        storage, user = self.svc.storage, self.svc.user
        for kind, run in ops.ordered():
            if self._stop:  # aborted (Cancel, connection lost): leave the rest
                break
            if kind == "dir":
                made = await mkdir_many(storage, user.name, [parts for _k, parts, _op in run])
                for ((b, i), _parts, _op), err in zip(run, made, strict=True):
                    if err is not None:
                        outs[b].fail(error_item(batches[b][i].path, err))
                continue
            files = [op for _k, _parts, op in run if op is not None]
            done = await store_small_many(
                storage, user.name, files, overwrite=self.msg.overwrite, quota=user.quota, parents=True
            )
            for ((b, i), _parts, op), res in zip(run, done.results, strict=True):
                if isinstance(res, int):
                    outs[b].files += 1
                    outs[b].bytes += len(op.data) if op is not None else 0
                elif res is not done.fatal:
                    outs[b].fail(error_item(batches[b][i].path, res))
                elif done.fatal is not None and (fatal is None or fatal[0] > b):
                    fatal = (b, done.fatal)  # the first file the quota stopped: before any later fatal
            if done.fatal is not None:
                break
        if fatal is not None:
            outs = outs[: fatal[0] + 1]
            outs[-1].fatal = fatal[1]
        for out in outs:
            out.finish()
        return outs

    async def _fail(self, exc: FerryError) -> None:
        reply = reply_for(self.msg.id, exc)
        self._finish(f"failed:{reply.code}")
        await self.svc.send(reply)

    def _finish(self, result: str) -> None:
        """Unregister, give the place back, log the one line of this tree (once)."""
        self.dead = True
        if self._finished:
            return
        self._finished = True
        self._queue.clear()
        self._room.set()  # (a reader waiting for room drops its batch: the tree is over)
        if self.svc.channels.get(self.msg.id) is self:
            del self.svc.channels[self.msg.id]
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
        """Cancelled or the connection ended: stop; files already stored stay."""
        if self._finished:
            return
        self.dead = True
        self._stop = True  # the job stops before its next statement
        self._queue.clear()
        self._room.set()
        job = self._job
        try:
            await cancel_and_wait(self._acker)
            if job is not None:
                # Wait for the statement in flight (one transaction) so that once a Cancel is
                # answered nothing more is stored. If this wait is itself cancelled (server
                # shutdown), the callback below still releases the upload's place.
                await settle(job)
        finally:
            if job is not None and not job.done():
                job.add_done_callback(lambda _f: self._finish("aborted"))
            else:
                self._finish("aborted")


async def handle_put_tree(svc: ObjectTreeService, msg: m.PutTree) -> None:
    """Create the tree's root (``mkdir -p``) and register the upload; no reply until its first batch."""
    svc.requests.check_id_free(msg.id)
    if sum(isinstance(c, ObjectTreeUpload) for c in svc.channels.values()) >= MAX_TREES:
        raise ErrorCode.BUSY.error(f"too many tree uploads on this connection (at most {MAX_TREES})")
    root = parse_path(msg.path)
    for name in root:
        refuse_reserved(name, msg.path)
    place = svc.hold(Kind.UPLOAD)
    try:
        if root:
            await _make_root(svc.storage, svc.user.name, root)
    except BaseException:
        place.release()
        raise
    svc.channels[msg.id] = ObjectTreeUpload(svc, msg, root, place)


async def _make_root(storage: ObjectStorage, user: str, root: Parts) -> None:
    """``mkdir -p`` of the tree's root; a file in its place is ``not-a-directory``, as the folder
    backend says it."""
    (err,) = await mkdir_many(storage, user, [root])
    if err is None:
        return
    if err.code == ErrorCode.EXISTS:
        raise ErrorCode.NOT_A_DIRECTORY.error(f"{show(root)} is not a folder")
    raise err


async def handle_tree_items(svc: ObjectTreeService, msg: m.TreeItems) -> None:
    """A batch of a tree upload (unpacked first if the client packed it, ``-z``); batches of a
    cancelled or failed tree are dropped."""
    up = svc.channels.get(msg.id)
    if up is None:
        return
    if not isinstance(up, ObjectTreeUpload):
        raise RemoteProtocolError(f"request {msg.id} is not a tree upload")
    if msg.packed:
        msg = m.TreeItems(id=msg.id, items=tree_records(msg), end=msg.end)
    await up.add(msg)


class ObjectTreeService(ObjectService):
    """Tree downloads and uploads of one session on the object backend (its uploads are channels)."""

    worker_handlers: ClassVar[dict[type[m.Message], Handler]] = {m.GetTree: handle_get_tree}
    reader_handlers: ClassVar[dict[type[m.Message], Handler]] = {
        m.PutTree: handle_put_tree,
        m.TreeItems: handle_tree_items,
    }
