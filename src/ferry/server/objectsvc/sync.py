"""Sync on the object backend: the listing a sync compares, files fetched by name, batched deletions
and attribute changes (``ScanTree``, ``GetFiles``, ``RemoveMany``, ``SetAttrs``).

Same requests, replies and order as the folder backend's :mod:`ferry.server.sync`: a client plans and
runs the same sync against either. The listing is read from the namespace a page of 1,000 entries
per query (depth first, each folder's entries sorted, excluded folders not entered); it needs no
file's bytes, except with ``checksum``:

``checksum`` compares the *content digest* of :mod:`ferry.cdc` (content-defined chunks), which the
client computes for its own files. The object backend stores another digest (BLAKE3 over fixed
4 MiB chunks), which the client cannot compare with. So the content digest is made from the bytes,
as cheaply as the backend allows: a file of up to 16 KiB is one content chunk, its bytes come inline
with the listing's read of many files per query (small files live in the database); a larger one
is read chunk by chunk once and its index cached under its stored BLAKE3 digest
(:func:`ferry.server.objectsvc.chunkio.content_index`): unchanged content is never read again while
the cache holds it, whatever its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, ClassVar

from ferry import cdc
from ferry.errors import FerryError, NotFound, RemoteError, StoreUnavailable
from ferry.server import work
from ferry.server.objectsvc.chunkio import content_index, index_key
from ferry.server.objectsvc.files import ObjectService
from ferry.server.objectsvc.tree import (
    LIST_PAGE,
    READS_AHEAD,
    Pending,
    Record,
    file_record,
    in_order,
    read_ahead,
    read_group,
    serve_records,
)
from ferry.server.openlimits import Kind
from ferry.server.pathrules import join_path, parse_path
from ferry.server.service import Handler
from ferry.server.sync import SCAN_BYTES, SCAN_ITEMS, encode_entries, safe_path, scan_filter, under
from ferry.server.walkers import TreeFailure
from ferry.store.api import Node, Parts, show
from ferry.syncfilter import Filter
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.server.context import HashCache
    from ferry.store.objects import ObjectStorage

#: Names of a GetFiles read per query: their bytes (up to the inline limit each, 256 KiB) are held
#: at once, so this bounds the memory of a request whose sizes are not known before the read.
NAMED_READ = 64


# --- the listing ---------------------------------------------------------------------------


def _entry(path: str, node: Node, digest: bytes = b"") -> m.SyncEntry:
    if node.kind == "dir":
        return m.SyncEntry(path, "dir", 0, m.wire_time(node.mtime), node.mode)
    return m.SyncEntry(path, "file", node.size, m.wire_time(node.mtime), node.mode, digest)


def _error_entry(path: str, exc: FerryError) -> m.SyncEntry:
    code = exc.code if isinstance(exc, RemoteError) else "error"
    return m.SyncEntry(path=safe_path(path), kind="error", message=f"{code}: {exc}"[:8192])


async def content_digests(
    storage: ObjectStorage, user: str, cache: HashCache, files: Sequence[tuple[Parts, Node]]
) -> list[bytes | RemoteError]:
    """The content digests (:mod:`ferry.cdc`) of stored ``files`` (path, listed node), in order: small
    ones from their bytes read many per query, larger ones from the cache or read chunk by chunk.
    ``unavailable`` raises."""
    out: list[bytes | RemoteError | None] = [None] * len(files)
    small: list[int] = []
    for i, (path, node) in enumerate(files):
        if node.size == 0:
            out[i] = cdc.index_digest(0, b"")
        elif node.size <= cdc.MIN_SIZE:
            small.append(i)
        else:
            known = cache.get_index(index_key(user, node.digest, node.size)) if node.digest else None
            if known is not None:
                out[i] = known.digest
                continue
            try:
                out[i] = (
                    await content_index(storage, user, await storage.open_file(user, path), cache)
                ).digest
            except StoreUnavailable:
                raise
            except RemoteError as exc:
                out[i] = exc
    reads = await read_group(storage, user, [files[i][0] for i in small], cdc.MIN_SIZE)
    for i, res in zip(small, reads, strict=True):
        if isinstance(res, RemoteError):
            out[i] = res
        elif res.data is None:  # grew since listed: a larger file now (the next sync sees it)
            out[i] = ErrorCode.CHANGED.error(f"{show(files[i][0])} changed while being read")
        else:
            out[i] = cdc.small_content_digest(res.data)
    assert all(d is not None for d in out)
    return [d for d in out if d is not None]


async def _listed(
    storage: ObjectStorage,
    user: str,
    cache: HashCache,
    folder: Parts,
    rel: str,
    filt: Filter,
    checksum: bool,
    subdirs: list[str],
) -> AsyncIterator[m.SyncEntry]:
    """The entries of ``folder`` (``rel`` below the listing's root), names sorted, excluded ones left
    out; the names of the subfolders to enter are appended to ``subdirs``."""
    prefix = f"{rel}/" if rel else ""
    after = ""
    while True:
        page = await storage.list_dir(user, folder, after=after, limit=LIST_PAGE)
        kept: list[tuple[str, Node]] = []
        for node in page:
            sub = prefix + node.name
            is_dir = node.kind == "dir"
            if filt and filt.excluded(sub, is_dir):
                continue
            kept.append((sub, node))
            if is_dir:
                subdirs.append(node.name)
        digests: dict[str, bytes | RemoteError] = {}
        if checksum:
            files = [(sub, node) for sub, node in kept if node.kind == "file"]
            found = await content_digests(
                storage, user, cache, [((*folder, node.name), node) for _sub, node in files]
            )
            digests = {sub: d for (sub, _n), d in zip(files, found, strict=True)}
        for sub, node in kept:
            digest = digests.get(sub, b"")
            if isinstance(digest, RemoteError):
                yield _error_entry(sub, digest)
            else:
                yield _entry(sub, node, digest)
        if len(page) < LIST_PAGE:
            return
        after = page[-1].name


async def scan_entries(
    storage: ObjectStorage, user: str, cache: HashCache, top: Parts, root: Node, filt: Filter, checksum: bool
) -> AsyncIterator[m.SyncEntry]:
    """The listing of folder ``top`` in the folder backend's order (see
    :class:`ferry.server.walkers.EntryScan`): the folder itself (``""``), then every entry under it,
    each folder's entries before those of its subfolders, depth first."""
    yield _entry("", root)
    subdirs: list[str] = []
    async for entry in _listed(storage, user, cache, top, "", filt, checksum, subdirs):
        yield entry
    stack: list[tuple[str, list[str]]] = [("", subdirs[::-1])]
    while stack:
        rel, todo = stack[-1]
        if not todo:
            stack.pop()
            continue
        name = todo.pop()
        sub = f"{rel}/{name}" if rel else name
        subdirs = []
        try:
            async for entry in _listed(
                storage, user, cache, (*top, *sub.split("/")), sub, filt, checksum, subdirs
            ):
                yield entry
        except StoreUnavailable:
            raise
        except RemoteError as exc:  # removed or replaced by a file since listed
            yield _error_entry(sub, exc)
            subdirs = []
        stack.append((sub, subdirs[::-1]))


async def _pages(
    req_id: int, entries: AsyncIterator[m.SyncEntry], packed: bool
) -> AsyncIterator[m.ScanItems]:
    """ScanItems pages of ``entries``, cut as the folder backend cuts them (zlib-packed in the
    session's file threads when asked)."""

    async def finish(page: list[m.SyncEntry], end: bool) -> m.ScanItems:
        if packed:
            raw = encode_entries(page)
            return m.ScanItems(id=req_id, packed=await work.in_thread(zlib.compress, raw, 1), end=end)
        return m.ScanItems(id=req_id, entries=page, end=end)

    page: list[m.SyncEntry] = []
    size = 0
    async for entry in entries:
        page.append(entry)
        path = entry.path
        size += 48 + (len(path) if path.isascii() else 4 * len(path)) + len(entry.message)
        if len(page) >= SCAN_ITEMS or size >= SCAN_BYTES:
            yield await finish(page, False)
            page, size = [], 0
    yield await finish(page, True)


async def handle_scan(svc: ObjectSyncService, msg: m.ScanTree) -> None:
    """Stream the listing of ``msg.path`` (a folder, or a single file as the entry ``""``)."""
    t0 = time.monotonic()
    storage, user, cache = svc.storage, svc.user.name, svc.ctx.hash_cache
    filt = scan_filter(msg.rules)
    top = parse_path(msg.path)
    node = await storage.stat(user, top)
    if node.kind != "dir":
        entry = _entry("", node)
        if msg.checksum:
            (digest,) = await content_digests(storage, user, cache, [(top, node)])
            entry = _error_entry("", digest) if isinstance(digest, RemoteError) else _entry("", node, digest)
        await svc.send(m.ScanItems(id=msg.id, entries=[entry], end=True))
        svc.log_op("scan", msg.path, t0, "ok entries=1")
        return
    entries = 0
    listing = scan_entries(storage, user, cache, top, node, filt, msg.checksum)
    async with contextlib.aclosing(read_ahead(_pages(msg.id, listing, msg.packed))) as pages:
        async for page in pages:
            entries += len(page.entries)
            await svc.send(page)
    svc.log_op("scan", msg.path, t0, f"ok entries={entries}{' checksum' if msg.checksum else ''}")


# --- files by name ---------------------------------------------------------------------------


def _named(
    storage: ObjectStorage, user: str, base: Parts, names: Sequence[str], inline_max: int
) -> AsyncIterator[Record]:
    """Records of the files ``names`` under ``base``, in order (a few reads per query, several
    queries at once); what cannot be read is an error record."""

    async def groups() -> AsyncIterator[Pending]:
        for start in range(0, len(names), NAMED_READ):
            yield asyncio.ensure_future(
                _named_group(storage, user, base, names[start : start + NAMED_READ], inline_max)
            )

    return in_order(groups(), READS_AHEAD)


async def _named_group(
    storage: ObjectStorage, user: str, base: Parts, group: Sequence[str], inline_max: int
) -> list[Record]:
    paths: list[Parts] = []
    refused: dict[int, FerryError] = {}
    for i, name in enumerate(group):
        try:
            parts = parse_path(name)
            if not parts:
                raise ErrorCode.BAD_PATH.error("a file name is needed, not the folder itself")
            paths.append((*base, *parts))
        except FerryError as exc:
            refused[i] = exc
    reads = iter(await read_group(storage, user, paths, inline_max))
    return [
        TreeFailure(name, err) if (err := refused.get(i)) is not None else file_record(name, next(reads))
        for i, name in enumerate(group)
    ]


async def handle_get_files(svc: ObjectSyncService, msg: m.GetFiles) -> None:
    """Stream the named files under ``msg.path`` as TreeItems (see :func:`serve_records`)."""
    try:
        with svc.hold(Kind.DOWNLOAD):
            base = parse_path(msg.path)
            node = await svc.storage.stat(svc.user.name, base)
            if node.kind != "dir":
                raise ErrorCode.NOT_A_DIRECTORY.error(f"{show(base)} is not a folder")
            records = _named(svc.storage, svc.user.name, base, msg.names, msg.inline_max)
            await serve_records(svc, msg.id, msg.path, msg.hash, records, "get-files", pack=msg.compress)
    finally:
        svc.requests.download_done(msg.id)  # (serve_records does it too, unless it never started)


# --- batches ---------------------------------------------------------------------------------


async def handle_remove_many(svc: ObjectSyncService, msg: m.RemoveMany) -> None:
    """Remove the named entries under ``msg.path`` (folders only when empty, unless ``recursive``),
    each in one transaction; an entry already gone counts as done."""
    t0 = time.monotonic()
    storage, user = svc.storage, svc.user.name
    done = 0
    errors: list[m.SyncEntry] = []
    for name in msg.names:
        try:
            await storage.remove(user, parse_path(under(msg.path, name)), recursive=msg.recursive)
            done += 1
        except NotFound:
            done += 1  # already gone: what was asked for holds
        except StoreUnavailable:
            raise
        except FerryError as exc:
            errors.append(m.SyncEntry(path=safe_path(name), kind="error", message=str(exc)[:8192]))
    await svc.send(m.BatchReply(id=msg.id, done=done, errors=errors))
    svc.log_op("rm-many", msg.path, t0, f"ok removed={done} errors={len(errors)}")


async def handle_set_attrs(svc: ObjectSyncService, msg: m.SetAttrs) -> None:
    """Set mode and/or mtime of the listed entries under ``msg.path`` (zero: left alone)."""
    t0 = time.monotonic()
    storage, user = svc.storage, svc.user.name
    done = 0
    errors: list[m.SyncEntry] = []
    for e in msg.entries:
        try:
            parts = parse_path(under(msg.path, e.path) if e.path else join_path(parse_path(msg.path)))
            if not parts:
                raise ErrorCode.BAD_PATH.error("the attributes of your home folder cannot be changed")
            if e.mtime or e.mode:
                await storage.set_attrs(user, parts, mtime=e.mtime or None, mode=e.mode or None)
            done += 1
        except StoreUnavailable:
            raise
        except FerryError as exc:
            errors.append(m.SyncEntry(path=safe_path(e.path), kind="error", message=str(exc)[:8192]))
    await svc.send(m.BatchReply(id=msg.id, done=done, errors=errors))
    svc.log_op("set-attrs", msg.path, t0, f"ok changed={done} errors={len(errors)}")


class ObjectSyncService(ObjectService):
    """What a sync asks of one session on the object backend: listings to compare, files by name,
    batched deletions and attribute changes."""

    worker_handlers: ClassVar[dict[type[m.Message], Handler]] = {
        m.ScanTree: handle_scan,
        m.GetFiles: handle_get_files,
        m.RemoveMany: handle_remove_many,
        m.SetAttrs: handle_set_attrs,
    }
