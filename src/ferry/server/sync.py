"""Sync on the server: the listing a sync compares, files fetched by name, batched deletions and
attribute changes (``ScanTree``, ``GetFiles``, ``RemoveMany``, ``SetAttrs``).

The client plans a sync (:mod:`ferry.syncplan`); the server only answers questions and carries out
batches, each in one request however many files it names:

- ``ScanTree`` walks the folder once through the jail (:class:`~ferry.server.jail.EntryScan`: never
  following a link, not entering excluded folders, hiding partial uploads) and streams
  :class:`~ferry.wire.messages.ScanItems` of (path, kind, size, mtime, mode[, digest]). With
  ``checksum`` each regular file's content digest comes from the server-wide chunk-index cache
  (keyed by device, inode, size, mtime and ctime): an unchanged file is never read again;
- ``GetFiles`` answers with the same ``TreeItems`` records as a tree download, for the named files
  only (small ones inline, larger ones announced for a separate streamed or delta download);
- ``RemoveMany`` / ``SetAttrs`` change many entries under one folder; per-entry failures are
  reported in the :class:`~ferry.wire.messages.BatchReply`, not fatal.

Every path is a jail path; names are checked by :func:`~ferry.server.jail.parse_path` before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat as statmod
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from ferry import cdc
from ferry.errors import FerryError, RemoteError, UsageError
from ferry.server import work
from ferry.server.openlimits import Kind
from ferry.server.pathrules import join_path, parse_path
from ferry.server.service import FolderService
from ferry.server.tree import serve_records
from ferry.server.walkers import EntryScan, ScanRecord, TreeDirs
from ferry.syncfilter import Filter
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.server.context import HashCache

#: Entries per ScanItems message, and their approximate bytes (paths dominate).
SCAN_ITEMS = 4096
SCAN_BYTES = 1 << 18


def content_digest(cache: HashCache, fd: int, st: os.stat_result) -> bytes:
    """The content digest of the open file ``fd`` (``st`` its fstat), from the cache when this version
    of the file was indexed before; an index computed here is cached for later deltas."""
    key = (*cdc.stat_key(st), cdc.SCHEME)
    index = cache.get_index(key)
    if index is None:
        if st.st_size <= cdc.MIN_SIZE:  # one chunk: cheaper than caching
            return cdc.content_digest_fd(fd, st.st_size)
        index = cdc.index_fd(fd, st.st_size)
        cache.put_index(key, index)
    return index.digest


#: msgpack of a list of SyncEntry records (a packed ScanItems page, before zlib)
encode_entries = msgspec.msgpack.Encoder().encode


def _wire_entry(rec: ScanRecord) -> m.SyncEntry:
    if rec.error is not None:
        code = rec.error.code if isinstance(rec.error, RemoteError) else "error"
        return m.SyncEntry(path=safe_path(rec.path), kind="error", message=f"{code}: {rec.error}"[:8192])
    return m.SyncEntry(
        path=rec.path, kind=rec.kind, size=rec.size, mtime=m.wire_time(rec.mtime), mode=rec.mode, digest=rec.digest
    )


def safe_path(path: str) -> str:
    """``path`` as valid UTF-8 cut to what a wire path may hold (for a record that only names it)."""
    text = path.encode("utf-8", "backslashreplace").decode("utf-8") if not path.isascii() else path
    return text[: m.MAX_PATH_CHARS]


def _next_page(scan: EntryScan, check: Callable[[], None]) -> tuple[list[m.SyncEntry], bool]:
    """The next ScanItems page (thread); ``check`` stops it between entries when the session ended."""
    out: list[m.SyncEntry] = []
    size = 0
    entry_of, lo, hi = m.SyncEntry, m.MIN_TIME, m.MAX_TIME
    for rec in scan:
        if not len(out) & 63:  # every 64 entries: soon enough, and not a call per entry
            check()
        if rec.error is None:  # _wire_entry's common case, inline: this runs once per entry
            t = rec.mtime
            t = 0.0 if t != t else lo if t < lo else hi if t > hi else t  # as m.wire_time
            entry = entry_of(rec.path, rec.kind, rec.size, t, rec.mode, rec.digest)
        else:
            entry = _wire_entry(rec)
        out.append(entry)
        path = entry.path
        size += 48 + (len(path) if path.isascii() else 4 * len(path)) + len(entry.message)
        if len(out) >= SCAN_ITEMS or size >= SCAN_BYTES:
            return out, False
    return out, True


def scan_filter(rules: list[str]) -> Filter:
    """The filter of a ScanTree's rules (``bad-request`` if they do not parse)."""
    try:
        return Filter(rules)
    except UsageError as exc:
        raise ErrorCode.BAD_REQUEST.error(str(exc)) from exc


async def handle_scan(svc: SyncService, msg: m.ScanTree) -> None:
    """Stream the listing of ``msg.path`` (a folder, or a single file as the entry ``""``): tree-sized
    work, so in the walk pool, one page per job, holding one of the session's walk slots."""
    async with work.current.get().walk_slot():
        await _scan(svc, msg)


def _single(svc: SyncService, path: str, checksum: bool) -> m.SyncEntry | None:
    """The listing of ``path`` when it is not a folder (a file lists as itself, ``""``), or None
    for a folder (thread). A symbolic link is refused, as everywhere in the jail."""
    storage = svc.storage
    st = storage.lstat(path)
    if statmod.S_ISDIR(st.st_mode):
        return None
    if statmod.S_ISLNK(st.st_mode):
        storage.open_read(path)  # raises the jail's own "symlink" refusal
    if not statmod.S_ISREG(st.st_mode) or not checksum:
        return _wire_entry(_record_of(st))
    fd = storage.open_read(path)
    try:
        st = os.fstat(fd)
        return _wire_entry(_record_of(st, content_digest(svc.ctx.hash_cache, fd, st)))
    finally:
        os.close(fd)


def _record_of(st: os.stat_result, digest: bytes = b"") -> ScanRecord:
    if statmod.S_ISREG(st.st_mode):
        return ScanRecord("", "file", st.st_size, st.st_mtime, statmod.S_IMODE(st.st_mode), digest)
    return ScanRecord("", "other", 0, st.st_mtime, statmod.S_IMODE(st.st_mode))


async def _scan(svc: SyncService, msg: m.ScanTree) -> None:
    t0 = time.monotonic()
    storage = svc.storage
    filt = scan_filter(msg.rules)
    single = await work.in_thread(_single, svc, msg.path, msg.checksum)
    if single is not None:
        await svc.send(m.ScanItems(id=msg.id, entries=[single], end=True))
        svc.log_op("scan", msg.path, t0, "ok entries=1")
        return
    cache = svc.ctx.hash_cache
    digests = (lambda fd, st: content_digest(cache, fd, st)) if msg.checksum else None
    check = work.current.get().check
    scan = await work.in_thread(
        lambda: storage.scan_entries(msg.path, exclude=filt.excluded if filt else None, digest=digests),
        release=EntryScan.close,
    )
    entries = 0

    def next_page() -> tuple[m.ScanItems, bool]:
        page, done = _next_page(scan, check)
        if msg.packed:  # packed in the walk pool too, not on the event loop
            return m.ScanItems(id=msg.id, packed=zlib.compress(encode_entries(page), 1), end=done), done
        return m.ScanItems(id=msg.id, entries=page, end=done), done

    # The next page is read (and packed) while this one is sent.
    async with contextlib.aclosing(work.prefetched(next_page, scan.close)) as pages:
        async for page_msg, _done in pages:
            entries += len(page_msg.entries)
            await svc.send(page_msg)
    svc.log_op("scan", msg.path, t0, f"ok entries={entries}{' checksum' if msg.checksum else ''}")


async def handle_get_files(svc: SyncService, msg: m.GetFiles) -> None:
    """Stream the named files under ``msg.path`` as TreeItems (see :func:`serve_records`)."""
    storage = svc.storage
    try:
        with svc.hold(Kind.DOWNLOAD):  # it holds a file and folders open until it ends
            async with work.current.get().walk_slot():
                dirs = await work.in_thread(
                    lambda: storage.tree_dirs(msg.path, create=False), release=TreeDirs.close
                )
                inline = msg.inline_max
                records = (dirs.read(name, inline) for name in msg.names)
                await serve_records(
                    svc, msg.id, msg.path, msg.hash, records, dirs.close, "get-files", pack=msg.compress
                )
    finally:
        svc.requests.download_done(msg.id)  # (serve_records does it too, unless it never started)


def _remove_all(
    svc: SyncService, base: str, names: list[str], recursive: bool, check: Callable[[], None]
) -> tuple[int, int, int, list[m.SyncEntry]]:
    """Remove each name under ``base`` (thread): (removed, bytes freed, entries removed (-1: not
    known, a recursive remove failed half-way), failures)."""
    storage = svc.storage
    done = freed = entries = 0
    errors: list[m.SyncEntry] = []
    for name in names:
        check()
        try:
            path = under(base, name)
            try:
                st = storage.lstat(path)
            except FerryError as exc:
                if getattr(exc, "code", "") == "not-found":
                    done += 1  # already gone: what was asked for holds
                    continue
                raise
            tree = recursive and statmod.S_ISDIR(st.st_mode)
            try:
                gone = storage.remove_now(path, recursive=tree)
            except FerryError:
                if tree:
                    entries = -1 << 62  # some of it went: the count is recounted
                raise
            entries += gone
            done += 1
            if statmod.S_ISREG(st.st_mode):
                freed += st.st_size
            elif statmod.S_ISDIR(st.st_mode) and recursive:
                freed = -1 << 62  # unknown: usage is recomputed
        except FerryError as exc:
            errors.append(m.SyncEntry(path=safe_path(name), kind="error", message=str(exc)[:8192]))
    return done, freed, entries, errors


def under(base: str, name: str) -> str:
    """``base/name`` after checking that ``name`` is a plain relative path (no way out of ``base``)."""
    parts = parse_path(name)
    if not parts:
        raise ErrorCode.BAD_PATH.error("an entry of a batch needs a name (not the folder itself)")
    return join_path((*parse_path(base), *parts))


async def handle_remove_many(svc: SyncService, msg: m.RemoveMany) -> None:
    """Remove the named entries under ``msg.path`` (folders only when empty, unless ``recursive``)."""
    t0 = time.monotonic()
    sw = work.current.get()
    async with sw.walk_slot():
        done, freed, entries, errors = await asyncio.shield(
            work.start_walk(_remove_all, svc, msg.path, list(msg.names), msg.recursive, sw.check)
        )
    usage = svc.ctx.usage
    if freed < 0:
        usage.invalidate(svc.user.name)
    else:
        usage.add(svc.user.name, -freed)
    if entries < 0:
        usage.entry_count(svc.user.name).forget()
    else:
        usage.add(svc.user.name, 0, entries=-entries)
    await svc.send(m.BatchReply(id=msg.id, done=done, errors=errors))
    svc.log_op("rm-many", msg.path, t0, f"ok removed={done} errors={len(errors)}")


def _set_all(
    svc: SyncService, base: str, entries: list[m.SyncEntry], check: Callable[[], None]
) -> tuple[int, list[m.SyncEntry]]:
    storage = svc.storage
    done = 0
    errors: list[m.SyncEntry] = []
    for e in entries:
        check()
        try:
            path = under(base, e.path) if e.path else join_path(parse_path(base))
            if not path:
                raise ErrorCode.BAD_PATH.error("the attributes of your home folder cannot be changed")
            storage.set_attrs_now(path, round(e.mtime * 1e9) if e.mtime else None, e.mode)
            done += 1
        except FerryError as exc:
            errors.append(m.SyncEntry(path=safe_path(e.path), kind="error", message=str(exc)[:8192]))
    return done, errors


async def handle_set_attrs(svc: SyncService, msg: m.SetAttrs) -> None:
    """Set mode and/or mtime of the listed entries under ``msg.path``."""
    t0 = time.monotonic()
    sw = work.current.get()
    async with sw.walk_slot():
        done, errors = await asyncio.shield(
            work.start_walk(_set_all, svc, msg.path, list(msg.entries), sw.check)
        )
    await svc.send(m.BatchReply(id=msg.id, done=done, errors=errors))
    svc.log_op("set-attrs", msg.path, t0, f"ok changed={done} errors={len(errors)}")


class SyncService(FolderService):
    """What a sync asks of one session: listings to compare, files by name, batched deletions and
    attribute changes."""

    worker_handlers = {
        m.ScanTree: handle_scan,
        m.GetFiles: handle_get_files,
        m.RemoveMany: handle_remove_many,
        m.SetAttrs: handle_set_attrs,
    }
