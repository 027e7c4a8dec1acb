"""``ferry sync`` on the client: list both sides, plan, then move only what changed.

One sync is a handful of streamed exchanges on one connection, whatever the number of files:

1. **scan**: the server lists the remote side (``ScanTree``: one stream of (path, kind, size, mtime,
   mode[, digest]) records, filtered by the same rules) while a thread lists the local side;
2. **plan**: :func:`ferry.syncplan.plan` compares them (quick check or ``checksum``); a dry run
   stops here;
3. **small files** travel in the streamed tree records (``PutTree`` / ``GetFiles``: one request for
   thousands of files); **large files** one by one, a few at a time: as a *delta*
   (:mod:`ferry.delta`: only chunks the receiver lacks) when the destination has an older version,
   else streamed whole (``put_file`` / ``get_file``: resumable) or, with ``compress``, as a delta
   without basis (zstd per chunk);
4. **deletions** (``delete=True``), only after every transfer succeeded, and then **attributes**
   (mode, mtime) of files and folders (a deletion moves its folder's mtime), in one batch each.

``get -r`` and ``put -r`` are this machinery without deletions: a re-run skips files that are
already complete and identical (quick check) and resumes partial ones.

The narrow dependency on the connection: ``client.mux`` (``open`` / ``send`` / ``recv`` /
``close_route`` / ``call``: a request id and its events) and the file transfers of :mod:`ferry.client.transfer` and
:mod:`ferry.client.tree`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ferry import cdc
from ferry.aio import gather_all
from ferry.client.delta import delta_get, delta_put, delta_refused
from ferry.client.synclocal import (
    LocalListing,
    local_node,
    local_remove,
    local_set_attrs,
    makedirs,
)
from ferry.client.transfer import get_file, put_file
from ferry.client.tree import BATCH_BYTES, BATCH_ITEMS, _Failures, get_tree, put_tree, read_small
from ferry.delta import BasisChanged
from ferry.errors import (
    ConnectionBroken,
    DiskFull,
    NotFound,
    RemoteError,
    TransferError,
    UsageError,
)
from ferry.fskit import safe_relative
from ferry.hashing import HashName
from ferry.syncfilter import build_rules
from ferry.syncplan import Item, Listed, Node, Plan, plan
from ferry.textsafe import safe_name
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode, from_wire

if TYPE_CHECKING:
    from ferry.client.mux import Mux


class _Features(Protocol):
    @property
    def features(self) -> Sequence[str]: ...


class _Usage(Protocol):
    @property
    def used(self) -> int: ...

    @property
    def quota(self) -> int | None: ...


class AsyncClient(Protocol):
    """What sync needs of the connection (the facade :class:`ferry.client.aclient.AsyncClient`
    has it; a protocol, so that this feature module does not import the facade that uses it)."""

    @property
    def mux(self) -> Mux: ...

    @property
    def info(self) -> _Features: ...

    async def stat(self, path: str) -> m.Entry: ...

    async def df(self) -> _Usage: ...

Progress = Callable[[int, int], None]
#: Feature a server announces when it speaks ScanTree, GetFiles, the delta messages and batches.
FEATURE = "sync"
#: Files above this size travel on their own (delta or streamed); smaller ones in the tree records.
INLINE_MAX = m.TREE_INLINE_MAX
#: Large files in flight at once (each already pipelines its own data; delta work is CPU-bound).
PARALLEL = 3
#: Uploaded files from this size on are indexed by the server right after they arrive.
PREFETCH_MIN = 16 << 20
#: Names per GetFiles / RemoveMany / SetAttrs request.
BATCH_NAMES = 4096


@dataclass(frozen=True)
class SyncItem:
    """One change a sync made (or, in a dry run, would make), or a source entry it skipped."""

    action: str  #: ``new``, ``update``, ``attrs``, ``delete`` or ``skip``
    path: str  #: relative to the destination root ("" is the root itself)
    kind: str  #: ``file``, ``dir``, ``link``, ``other`` or ``error``
    size: int = 0  #: source file size
    sent: int = 0  #: content bytes that travelled for it (after delta, before compression)
    reason: str = ""  #: why (``size``, ``mtime``, ``checksum``, ``mode``, what was skipped, ...)
    error: str = ""  #: set if it failed


@dataclass
class SyncResult:
    """What a sync did: per-item list and totals."""

    items: list[SyncItem] = field(default_factory=list)
    files: int = 0  #: source files considered
    bytes: int = 0  #: their total size
    unchanged: int = 0  #: source files the destination already had
    sent_files: int = 0  #: files whose content was transferred
    sent_bytes: int = 0  #: their total size
    literal_bytes: int = 0  #: content bytes that actually travelled (delta saves the rest)
    skipped: int = 0  #: source entries skipped (links, special files, unreadable, in the way)
    deleted: int = 0  #: destination entries deleted
    failed: int = 0  #: items that failed
    wire_bytes: int = 0  #: bytes on the connection, both directions (TCP payload, TLS included)
    seconds: float = 0.0
    dry_run: bool = False
    #: what went wrong beyond single items (a failed batch, deletions held back), for people
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The totals as a JSON-ready dict."""
        return {
            "files": self.files,
            "bytes": self.bytes,
            "unchanged": self.unchanged,
            "sent_files": self.sent_files,
            "sent_bytes": self.sent_bytes,
            "literal_bytes": self.literal_bytes,
            "skipped": self.skipped,
            "deleted": self.deleted,
            "failed": self.failed,
            "wire_bytes": self.wire_bytes,
            "seconds": round(self.seconds, 6),
            "dry_run": self.dry_run,
            "notes": list(self.notes),
        }


def supports_sync(client: AsyncClient) -> bool:
    """True if the server announced the sync requests."""
    info = getattr(client, "info", None)
    return info is not None and FEATURE in info.features


# --- bytes on the wire -----------------------------------------------------------------------------

def wire_counters(client: AsyncClient) -> int | None:
    """Bytes sent (acknowledged) plus received on the client's connection so far, from the kernel
    (``TCP_INFO``); None where the kernel does not say."""
    return client.mux.tcp_bytes()


# --- the job's progress ------------------------------------------------------------------------------


class JobProgress:
    """Bytes done across a whole sync, reported as (done, total) to the caller's callback."""

    def __init__(self, total: int, callback: Progress | None, on_file: Callable[[str], None] | None) -> None:
        self.total, self.done = total, 0
        self.callback, self.on_file = callback, on_file

    def add(self, n: int) -> None:
        """Count ``n`` more bytes."""
        if n:
            self.done += n
            if self.callback is not None:
                self.callback(min(self.done, self.total), self.total)

    def file(self, name: str) -> Progress:
        """A per-file callback ``(done, size)`` that feeds the job's total (say which file is current)."""
        if self.on_file is not None:
            self.on_file(name)
        last = [0]

        def cb(done: int, _total: int) -> None:
            self.add(done - last[0])
            last[0] = done

        return cb


# --- listing the remote side --------------------------------------------------------------------


async def scan_remote(
    client: AsyncClient, path: str, rules: Sequence[str], checksum: bool
) -> list[Listed] | None:
    """The server's listing of ``path`` (None if it does not exist), as the records arrived."""
    req_id, route = client.mux.open(8)
    out: list[Listed] = []
    ended = False
    try:
        await client.mux.send(m.ScanTree(id=req_id, path=path, rules=list(rules), checksum=checksum, packed=True))
        while not ended:
            ev = await client.mux.recv(route)
            if isinstance(ev, m.Error):
                ended = True
                err = from_wire(ev)
                if isinstance(err, NotFound):
                    return None
                raise err
            if not isinstance(ev, m.ScanItems):
                raise ConnectionBroken(f"unexpected {type(ev).__name__} in a listing")
            ended = ev.end
            entries = _unpack(ev.packed) if ev.packed else ev.entries
            for e in entries:
                # Names become local paths: a hostile server must not reach outside with "../x".
                if e.path and not safe_relative(e.path):
                    raise TransferError(
                        f"the server listed an unsafe name {safe_name(e.path)!r}; nothing was changed"
                    )
            out.extend(entries)
    finally:
        client.mux.close_route(req_id)
    return out


_entries_decoder = msgspec.msgpack.Decoder(list[m.SyncEntry])


def _unpack(packed: bytes) -> list[m.SyncEntry]:
    """The entries of a packed listing page (bounded: a page that would unpack past the wire's
    limit, or does not decode as entries, is the server's error)."""
    z = zlib.decompressobj()
    try:
        raw = z.decompress(packed, m.SCAN_UNPACKED_MAX)
        if z.unconsumed_tail or not z.eof:
            raise ConnectionBroken("the server sent a listing page larger than the protocol allows")
        return _entries_decoder.decode(raw)
    except (zlib.error, msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ConnectionBroken(f"the server sent a malformed listing page: {exc}") from exc


# --- resolving what SRC and DEST mean ---------------------------------------------------------------


def contents_of(path: str) -> bool:
    """True if ``path`` names the *contents* of a folder (a trailing ``/``, as rsync reads it)."""
    return path.endswith("/") or path in ("", ".")


def _remote_join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _clean_remote(path: str) -> str:
    if path.startswith("/"):
        return path.rstrip("/") or "/"
    return "/".join(p for p in path.split("/") if p not in ("", "."))


async def _remote_kind(client: AsyncClient, path: str) -> str | None:
    if path == "":
        return "dir"
    try:
        return (await client.stat(path)).kind
    except NotFound:
        return None


def _local_kind(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return local_node("", st).kind


async def resolve(
    client: AsyncClient, src: str, dest: str, *, push: bool, nest: str = "always"
) -> tuple[str, str]:
    """The roots a sync compares: (source root, destination root), local ones as paths, remote ones
    clean. ``src`` ending in ``/`` means its contents go into ``dest``; otherwise the source goes
    *inside* ``dest`` under its own name: always (``nest="always"``, rsync's rule, for sync) or only
    when ``dest`` is an existing folder (``nest="existing"``, cp's rule, for get -r / put -r). A
    single file goes into ``dest`` when that is a folder or ends in ``/``, else becomes ``dest``."""
    whole = contents_of(src)
    if push:
        src_root = os.path.abspath(src) if src else "."
        kind = _local_kind(Path(src_root))
        name = os.path.basename(src_root)
        dest_clean = _clean_remote(dest)
        # What DEST is matters only for a file, or for cp's rule: spare the round trip otherwise.
        needed = kind is not None and (kind != "dir" or (nest != "always" and not whole))
        dest_kind = await _remote_kind(client, dest_clean) if needed else None
    else:
        src_root = _clean_remote(src)
        kind = await _remote_kind(client, src_root)
        name = src_root.rsplit("/", 1)[-1]
        dest_clean = os.path.abspath(dest) if dest else "."
        dest_kind = _local_kind(Path(dest_clean))
    if kind is None:
        where = src if push else f":{src}"
        raise ErrorCode.NOT_FOUND.error(
            f"{where}: no such file or folder (the source must exist; nothing was changed)"
        )

    def join(base: str, leaf: str) -> str:
        return _remote_join(base, leaf) if push else os.path.join(base, leaf)

    if kind != "dir":
        into = dest_kind == "dir" or dest.endswith("/")
        return src_root, (join(dest_clean, name) if into else dest_clean)
    if whole or not name:
        return src_root, dest_clean
    if nest == "always" or dest_kind == "dir":
        return src_root, join(dest_clean, name)
    return src_root, dest_clean


# --- pushing ---------------------------------------------------------------------------------------


class _NamedBatches:
    """Tree-upload batches (``PutTree`` records) for the folders and small files a plan names: a
    batch source for :func:`ferry.client.tree.put_tree` (worker thread; one call at a time).

    A file is read with one ``pread`` and its status compared before and after: a file being
    written meanwhile is reported (``changed``), never sent half old, half new."""

    def __init__(self, root: Path, items: list[Item], hash: HashName) -> None:
        self._batch_bytes, self._batch_items = BATCH_BYTES, BATCH_ITEMS
        self.root = root
        self.hash = hash
        self.large: list[tuple[str, int]] = []  # grew past the inline limit since listed
        self.failures = _Failures()
        self.changed: list[str] = []
        self._items = iter(items)

    def next(self) -> tuple[list[m.TreeItem], bool]:
        """The next batch, and whether it is the last."""
        items: list[m.TreeItem] = []
        size = 0
        for it in self._items:
            if it.kind == "dir":
                if not it.path:
                    continue  # the root: PutTree creates it
                items.append(m.TreeItem(path=it.path, kind="dir"))
                size += 64 + len(it.path)
            else:
                rec = self._file(it.path)
                if rec is None:
                    continue
                items.append(rec)
                size += 64 + len(it.path) + len(rec.data or b"")
            if size >= self._batch_bytes or len(items) >= self._batch_items:
                return items, False
        return items, True

    def _file(self, rel: str) -> m.TreeItem | None:
        path = os.path.join(self.root, rel)
        try:
            item = read_small(path, rel, self.hash)
        except cdc.FileChanged:
            self.changed.append(rel)
            return None
        except OSError as exc:
            self.failures.add(f"{safe_name(path)}: {exc.strerror or exc}")
            return None
        if item is None:
            self.failures.add(f"{safe_name(path)}: no longer a regular file")
            return None
        if isinstance(item, int):  # grew past the inline limit since listed
            self.large.append((rel, item))
            return None
        return item


# --- the job ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncOptions:
    """How a sync compares and what it may do (see :func:`sync`)."""

    delete: bool = False
    dry_run: bool = False
    checksum: bool = False
    rules: Sequence[str] = ()
    delta: bool = True
    compress: bool = False
    force: bool = False  #: send every file again, changed or not
    hash: HashName = "blake3"


class _Job:
    """One sync in progress: its plan, its result, and the reporting hooks."""

    def __init__(
        self,
        client: AsyncClient,
        src: str,
        dst: str,
        push: bool,
        opts: SyncOptions,
        on_item: Callable[[SyncItem], None] | None,
    ) -> None:
        self.client, self.push, self.opts = client, push, opts
        self.local = Path(src if push else dst)
        self.remote = dst if push else src
        self.result = SyncResult(dry_run=opts.dry_run)
        self.on_item = on_item
        self.progress = JobProgress(0, None, None)
        self.errors = self.result.notes
        #: the server answered a delta request with ``invalid``: it does not do delta transfers
        #: (yet), so the remaining large files go whole at once
        self.no_delta = False

    def report(self, it: Item, *, sent: int = 0, error: str = "") -> None:
        """Record (and pass on) one item that is done, failed, or (dry run) planned."""
        r = self.result
        if error:
            r.failed += 1
            self.errors.append(f"{safe_name(it.path or '.')}: {error}")
        elif it.action == "skip":
            r.skipped += 1
        elif it.action == "delete":
            r.deleted += 1
        elif it.sends_content:
            r.sent_files += 1
            r.sent_bytes += it.size
            r.literal_bytes += sent
        item = SyncItem(it.action, it.path, it.kind, it.size, sent, it.reason, error)
        r.items.append(item)
        if self.on_item is not None:
            self.on_item(item)

    def remote_path(self, rel: str) -> str:
        return _remote_join(self.remote, rel) if rel else self.remote


async def run_sync(
    client: AsyncClient,
    src: str,
    dst: str,
    *,
    push: bool,
    opts: SyncOptions = SyncOptions(),
    progress: Progress | None = None,
    on_item: Callable[[SyncItem], None] | None = None,
    on_file: Callable[[str], None] | None = None,
    local_listing: LocalListing | None = None,
) -> SyncResult:
    """Sync resolved roots (see :func:`resolve`): ``src`` local and ``dst`` remote with ``push``,
    the reverse without. Items are reported through ``on_item`` as they complete.

    ``local_listing``: the local side's listing, started earlier (before connecting); used if it
    fits this sync's local root and options, else the local side is listed again."""
    if not supports_sync(client):
        raise UsageError("this server does not support sync (it is older than this client); upgrade it")
    t0 = time.monotonic()
    wire0 = wire_counters(client)
    job = _Job(client, src, dst, push, opts, on_item)
    listing = local_listing
    if listing is None or not listing.fits(job.local, opts.rules, opts.checksum):
        # Usage errors in the rules surface here, before anything is asked of the server.
        listing = LocalListing(job.local, opts.rules, opts.checksum)
    try:
        remote_nodes = await scan_remote(client, job.remote, opts.rules, opts.checksum)
    finally:
        # Whatever happened to the remote listing, the local one is finished (not left running)
        # and its outcome known before anything is planned: a scan that failed raises here.
        local_nodes = await listing.result()
    src_nodes, dst_nodes = (local_nodes, remote_nodes) if push else (remote_nodes, local_nodes)
    if src_nodes is None:
        raise ErrorCode.NOT_FOUND.error("the source does not exist; nothing was changed")
    if src_nodes and src_nodes[0].kind == "error":
        raise TransferError(f"the source cannot be read ({src_nodes[0].message}); nothing was changed")
    the_plan = plan(src_nodes, dst_nodes or [], checksum=opts.checksum, delete=opts.delete, force=opts.force)
    r = job.result
    r.files, r.bytes, r.unchanged = the_plan.files, the_plan.bytes, the_plan.unchanged
    if the_plan.deletions_suppressed:
        job.errors.append("some source entries could not be read: nothing was deleted")
    job.progress = JobProgress(the_plan.send_bytes, progress, on_file)
    if opts.dry_run:
        for it in the_plan.all():
            if it.action != "same":
                job.report(it)
    else:
        await (_execute_push(job, the_plan) if push else _execute_pull(job, the_plan))
    r.seconds = time.monotonic() - t0
    wire1 = wire_counters(client)
    if wire0 is not None and wire1 is not None:
        r.wire_bytes = wire1 - wire0
    return r


def _prefetch(path: str, req_id: int) -> m.Message:
    return m.GetChunks(id=req_id, path=path, prefetch=True)


def supports_prefetch(client: AsyncClient) -> bool:
    """True if the server answers GetChunks(prefetch=True) (it announces "prefetch")."""
    info = getattr(client, "info", None)
    return info is not None and "prefetch" in info.features


def _with_id(msg: m.RemoveMany | m.SetAttrs, req_id: int) -> m.Message:
    return msgspec.structs.replace(msg, id=req_id)


def _attr_items(p: Plan) -> list[Item]:
    """Attribute changes to make after the content: files and folders whose mode or mtime differ,
    new folders, and the folders whose contents changed (their mtime moved)."""
    touched: set[str] = set()
    for it in p.all():
        if it.action in ("new", "update", "delete") and it.path:
            touched.add(it.path.rpartition("/")[0])
    out = []
    for it in p.items:
        if it.src is None or it.kind not in ("file", "dir"):
            continue
        if it.action == "attrs" or (it.kind == "dir" and (it.action == "new" or it.path in touched)):
            out.append(it)
    # Deepest first: setting a folder's mtime before its children's would not stick.
    out.sort(key=lambda it: it.path.count("/") if it.path else -1, reverse=True)
    return out


async def _move_large(job: _Job, it: Item) -> int:
    """Send one large file (either direction): as a delta when the destination has an older
    version (or with -z), else streamed whole (resumable). Returns the content bytes that moved.
    A server that does not do delta transfers (``invalid``: an older one, or a backend without
    them) gets the file whole instead."""
    client, opts = job.client, job.opts
    local = job.local / it.path if it.path else job.local
    remote = job.remote_path(it.path)
    cb = job.progress.file(it.path or local.name)
    dst = it.dst
    use_delta = opts.delta and dst is not None and dst.kind == "file" and dst.size > 0
    by_delta = (use_delta or opts.compress) and not job.no_delta
    if by_delta:
        try:
            moved = await (
                delta_put(client.mux, local, remote, use_basis=use_delta, compress=opts.compress, progress=cb)
                if job.push
                else delta_get(client.mux, remote, local, use_basis=use_delta, compress=opts.compress, progress=cb)
            )
            return moved.literal
        except RemoteError as exc:
            if not delta_refused(exc):
                raise
            job.no_delta = True  # this server does not do delta transfers: whole files from now on
    if job.push:
        sent = int((await put_file(client.mux, local, remote, hash=opts.hash, progress=cb)).sent)
        if it.size >= PREFETCH_MIN and supports_prefetch(client) and not job.no_delta:
            # Let the server index the new file now, while it is idle: the next delta of it then
            # starts at once instead of waiting for the server to read its old version.
            await client.mux.call(functools.partial(_prefetch, remote), m.Ok)
        return sent
    return int((await get_file(client.mux, remote, local, hash=opts.hash, progress=cb)).sent)


async def _large(job: _Job, items: list[Item], one: Callable[[_Job, Item], Any]) -> None:
    """Run ``one(job, item)`` for each large file, a few at a time; failures are reported, not raised."""
    if not items:
        return
    sem = asyncio.Semaphore(PARALLEL)

    async def run(it: Item) -> None:
        async with sem:
            for attempt in (1, 2):
                try:
                    sent = await one(job, it)
                except (RemoteError, TransferError) as exc:
                    code = getattr(exc, "code", "")
                    if (
                        code == ErrorCode.CHANGED or isinstance(exc, cdc.FileChanged | BasisChanged)
                    ) and attempt == 1:
                        continue  # changed while it was being sent: one more try with what is there now
                    if isinstance(exc, RemoteError) and code in (ErrorCode.QUOTA, ErrorCode.DISK_FULL):
                        raise
                    job.report(it, error=str(exc))
                    return
                job.report(it, sent=sent)
                return

    await gather_all([run(it) for it in items])


async def _execute_push(job: _Job, p: Plan) -> None:
    client = job.client
    await _check_quota(client, p)
    for it in p.replace:  # a folder or file of another type in the way: goes first, whole
        await _remote_batch(job, m.RemoveMany, [it], recursive=True)
    single = p.items and p.items[0].path == "" and p.items[0].kind == "file"
    dirs = [it for it in p.items if it.kind == "dir" and it.action == "new"]
    small = [it for it in p.items if it.sends_content and it.size <= INLINE_MAX and not single]
    large = [it for it in p.items if it.sends_content and (it.size > INLINE_MAX or single)]
    for it in p.items:
        if it.action == "skip":
            job.report(it)
    if dirs:  # first the folders (and the root), so that large files have somewhere to land
        await _push_small(job, dirs)
    # Then the small files as one stream, beside the large ones (disk, CPU and network overlap).
    grown: list[Item] = []
    await gather_all(
        [_push_small(job, small, grown), _large(job, large, _move_large)]
        if small
        else [_large(job, large, _move_large)]
    )
    await _large(job, grown, _move_large)  # small files that grew past the inline limit meanwhile
    if p.deletes:
        if job.result.failed:
            job.errors.append("nothing was deleted because some transfers failed")
        else:
            await _remote_batch(job, m.RemoveMany, p.deletes)
    # Attributes last: a deletion moves its folder's mtime, so setting it before would not stick
    # (and the next sync would find the folder changed). The home folder itself has no
    # attributes a user may set: leave it out when it is the root.
    attrs = [it for it in _attr_items(p) if it.path or job.remote]
    if attrs:
        await _remote_batch(job, m.SetAttrs, attrs)


async def _push_small(job: _Job, items: list[Item], grown: list[Item] | None = None) -> None:
    """Upload folders and small files as one tree stream; report each. Files that grew past the
    inline limit since they were listed are added to ``grown`` (sent on their own after)."""
    opts = job.opts
    batches = _NamedBatches(job.local, items, opts.hash)
    try:
        await put_tree(
            job.client.mux,
            job.local,
            job.remote,
            hash=opts.hash,
            progress=job.progress.file("files"),
            scan=batches,
            pack=opts.compress and "packed" in job.client.info.features,
        )
    except DiskFull:
        raise
    except TransferError as exc:
        job.errors.append(str(exc))
        for it in items:
            job.report(it, error="the tree upload failed (see the summary)")
        return
    changed = set(batches.changed)
    for it in items:
        if it.path in changed:
            job.report(it, error="changed while it was being read; run the sync again")
        else:
            job.report(it, sent=it.size)
    if grown is not None:
        grown += [Item("update", rel, "file", Node(rel, "file", size)) for rel, size in batches.large]


async def _check_quota(client: AsyncClient, p: Plan) -> None:
    """Fail before anything is sent when the server's quota cannot take what the plan adds (the
    server checks again per file: this only spares a sync that would fail half-way)."""
    grow = sum(
        it.size - (it.dst.size if it.dst is not None and it.dst.kind == "file" else 0) for it in p.sends
    )
    if grow <= 0:
        return
    usage = await client.df()
    if usage.quota is not None and usage.used + grow > usage.quota:
        raise ErrorCode.QUOTA.error(
            f"quota exceeded: this sync adds {grow} bytes, {max(usage.quota - usage.used, 0)} of {usage.quota} "
            "left; nothing was sent (remove files with ferry rm, or ask an admin to raise the quota)",
        )


async def _remote_batch(
    job: _Job, kind: type[m.RemoveMany] | type[m.SetAttrs], items: list[Item], *, recursive: bool = False
) -> None:
    """Remove, or set the attributes of, ``items`` on the server in batches; report each."""
    client = job.client
    for i in range(0, len(items), BATCH_NAMES):
        chunk = items[i : i + BATCH_NAMES]
        msg: m.RemoveMany | m.SetAttrs
        if kind is m.RemoveMany:
            msg = m.RemoveMany(id=0, path=job.remote, names=[it.path for it in chunk], recursive=recursive)
        else:
            entries = [
                m.SyncEntry(path=it.path, kind=it.kind, mode=it.src.mode, mtime=m.wire_time(it.src.mtime))
                for it in chunk
                if it.src is not None
            ]
            msg = m.SetAttrs(id=0, path=job.remote, entries=entries)
        reply = await client.mux.call(functools.partial(_with_id, msg), m.BatchReply)
        failed = {e.path: e.message for e in reply.errors}
        for it in chunk:
            if it.action in ("attrs", "delete") or kind is m.RemoveMany:
                job.report(it, error=failed.get(it.path, ""))
            elif it.path in failed:
                job.errors.append(f"{safe_name(it.path)}: {failed[it.path]}")


async def _execute_pull(job: _Job, p: Plan) -> None:
    client, opts, root = job.client, job.opts, job.local
    loop = asyncio.get_running_loop()
    for it in p.replace:
        await loop.run_in_executor(None, local_remove, root, it.path, True)
        job.report(it)
    for it in p.items:
        if it.action == "skip":
            job.report(it)
    single = p.items and p.items[0].path == "" and p.items[0].kind == "file"
    new_dirs = [it for it in p.items if it.kind == "dir" and it.action == "new"]
    for it in new_dirs:  # top-down (plan order); files then land in them
        await loop.run_in_executor(None, makedirs, root / it.path if it.path else root)
        job.report(it)
    small = [it for it in p.items if it.sends_content and it.size <= INLINE_MAX and not single]
    large = [it for it in p.items if it.sends_content and (it.size > INLINE_MAX or single)]
    # Requests of up to 4,096 names, two at a time: the server reads the next names while the
    # client writes the files of the previous ones (and the large files stream beside them).
    sem = asyncio.Semaphore(2)

    async def fetch(chunk: list[Item]) -> None:
        req = m.GetFiles(
            id=0, path=job.remote, names=[it.path for it in chunk], hash=opts.hash, compress=opts.compress
        )
        async with sem:
            try:
                await get_tree(
                    client.mux, job.remote, root, hash=opts.hash, progress=job.progress.file("files"), request=req
                )
            except DiskFull:
                raise
            except TransferError as exc:
                job.errors.append(str(exc))
                for it in chunk:
                    job.report(it, error="the tree download failed (see the summary)")
                return
        for it in chunk:
            job.report(it, sent=it.size)

    await gather_all(
        [fetch(small[i : i + BATCH_NAMES]) for i in range(0, len(small), BATCH_NAMES)]
        + [_large(job, large, _move_large)]
    )
    if p.deletes:
        if job.result.failed:
            job.errors.append("nothing was deleted because some transfers failed")
        else:
            for it in p.deletes:
                try:
                    await loop.run_in_executor(None, local_remove, root, it.path, False)
                    job.report(it)
                except OSError as exc:
                    job.report(it, error=exc.strerror or str(exc))
    for it in _attr_items(p):  # after the deletions (see _execute_push)
        assert it.src is not None
        try:
            await loop.run_in_executor(None, local_set_attrs, root, it.path, it.src.mode, it.src.mtime)
            if it.action == "attrs":
                job.report(it)
        except OSError as exc:
            job.report(it, error=exc.strerror or str(exc))


def split_remote(src: str, dest: str) -> tuple[bool, str, str]:
    """(push, src, dest) from the API's spelling: exactly one side is remote, written ``:PATH``
    (a path in the connected user's home)."""
    src_remote, dest_remote = src.startswith(":"), dest.startswith(":")
    if src_remote == dest_remote:
        raise UsageError("exactly one of SRC and DEST must be remote, written ':PATH' (e.g. ':backup/')")
    return dest_remote, src[1:] if src_remote else src, dest[1:] if dest_remote else dest


async def sync(
    client: AsyncClient,
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    delete: bool = False,
    dry_run: bool = False,
    checksum: bool = False,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
    rules: Sequence[str] = (),
    delta: bool = True,
    compress: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    on_item: Callable[[SyncItem], None] | None = None,
    on_file: Callable[[str], None] | None = None,
    nest: str = "always",
    local_listing: LocalListing | None = None,
) -> SyncResult:
    """Make ``dest`` like ``src``; exactly one is remote, written ``":PATH"``.

    ``src`` ending in ``/`` syncs its contents into ``dest``; otherwise ``dest/NAME`` is the copy
    (rsync's rule). ``exclude`` / ``include`` are gitignore patterns, after any ``rules`` lines
    (see :mod:`ferry.syncfilter`). ``progress(done, total)`` counts the bytes of the whole job;
    ``on_item`` sees each change as it is made. Per-file failures are in the result (``failed``,
    the items' ``error``); a missing source, a quota or a lost connection raise.
    ``local_listing`` is the local side listed ahead (see :func:`local_listing_for`).
    """
    push, s, d = split_remote(os.fspath(src), os.fspath(dest))
    all_rules = build_rules(rules, exclude, include)
    opts = SyncOptions(
        delete=delete,
        dry_run=dry_run,
        checksum=checksum,
        rules=all_rules,
        delta=delta,
        compress=compress,
        force=force,
    )
    src_root, dst_root = await resolve(client, s, d, push=push, nest=nest)
    return await run_sync(
        client,
        src_root,
        dst_root,
        push=push,
        opts=opts,
        progress=progress,
        on_item=on_item,
        on_file=on_file,
        local_listing=local_listing,
    )


def local_listing_for(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    rules: Sequence[str] = (),
    checksum: bool = False,
) -> LocalListing:
    """Start listing the local side of ``sync(src, dest)`` now (a thread), before connecting: the
    listing then overlaps the connection and login. The local root is the one :func:`resolve`
    finds without the server for a push, and for a pull of a folder; a pull of a single file
    may land elsewhere, and then the sync lists again. ``rules``: the full rule list (as
    :func:`ferry.syncfilter.build_rules` makes it)."""
    push, s, d = split_remote(os.fspath(src), os.fspath(dest))
    if push:
        root = os.path.abspath(s) if s else "."
    else:
        root = os.path.abspath(d) if d else "."
        name = _clean_remote(s).rsplit("/", 1)[-1]
        if not contents_of(s) and name:
            root = os.path.join(root, name)
    return LocalListing(Path(root), build_rules(rules), checksum)
