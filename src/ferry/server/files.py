"""The files service: file-system operations (stat, list, mkdir, rm, mv, df).

Every path goes through the session's storage (:class:`~ferry.server.folder.FolderStorage`);
blocking file-system calls run in a thread so one slow disk does not stall other sessions. Each operation is logged once. The
handlers are declared in :class:`FilesService`'s table (see :mod:`ferry.server.service`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator
from typing import ClassVar

from ferry.server import work
from ferry.server.jailcore import Entry as JailEntry
from ferry.server.pathrules import join_path, parse_path
from ferry.server.service import FolderService, Handler
from ferry.server.walkers import ListScan
from ferry.server.work import in_thread
from ferry.store.api import Node
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode

PAGE = 1000  # entries per ListReply page
#: bytes of entry names per page: recursive names can be KiBs long, so a count alone does not keep
#: a page below the 1 MiB message limit (the client would drop the connection)
PAGE_BYTES = 1 << 18


def to_wire(e: JailEntry | Node, name: str | None = None) -> m.Entry:
    """Convert a jail entry or a storage node (the same fields) to its wire form, named ``name``
    if given."""
    return m.Entry(
        name=name if name is not None else e.name,
        kind=e.kind,
        size=e.size,
        mtime=m.wire_time(e.mtime),
        mode=e.mode,
        target=e.target,
    )


def node_to_wire(node: Node) -> m.Entry:
    """Convert a storage node to its wire form (the home is named ``.``)."""
    return to_wire(node, node.name or ".")


async def handle_stat(svc: FilesService, msg: m.Stat) -> None:
    """Reply with the path's metadata."""
    t0 = time.monotonic()
    entry = node_to_wire(await svc.storage.stat(svc.user.name, parse_path(msg.path)))
    await svc.send(m.StatReply(id=msg.id, entry=entry))
    svc.log_op("stat", msg.path, t0)


async def handle_list(svc: FilesService, msg: m.ListDir) -> None:
    """Reply with pages of entries (a single file lists as itself), streamed from the walk: memory
    holds the page being sent and the next one, never the whole listing."""
    t0 = time.monotonic()
    storage = svc.storage
    check = work.current.get().check  # (here: the thread below does not see the context)

    def open_listing() -> m.Entry | Listing:
        if msg.glob:  # a pattern: its matches, found as the pages are cut (ferry.server.glob)
            return storage.expand_glob(msg.path, check)
        node = storage.node(msg.path)
        if node.kind != "dir":
            return node_to_wire(node)
        return storage.list_scan(msg.path, recursive=msg.recursive)

    async with work.current.get().walk_slot():
        opened = await in_thread(open_listing, release=_close_listing)
        if isinstance(opened, m.Entry):
            await svc.send(m.ListReply(id=msg.id, entries=[opened]))
            svc.log_op("list", msg.path, t0, nbytes=1)
            return
        pages = _Pages(opened, work.current.get().check)
        async with contextlib.aclosing(work.prefetched(pages.next, opened.close)) as steps:
            async for page, done in steps:
                await svc.send(m.ListReply(id=msg.id, entries=page, more=not done))
    svc.log_op("list", msg.path, t0, nbytes=pages.count)


#: What a listing's pages are cut from: a folder walk, or the matches of a pattern; (name, entry)
#: pairs, closed when the listing ends or is abandoned.
Listing = ListScan | Generator[tuple[str, JailEntry], None, None]


def _close_listing(opened: m.Entry | Listing) -> None:
    if not isinstance(opened, m.Entry):
        opened.close()


class _Pages:
    """Cuts a listing (a :class:`ListScan`, or a pattern's matches) into ListReply pages of at most :data:`PAGE` entries and about
    :data:`PAGE_BYTES` of names (called in the walk pool, one call at a time)."""

    def __init__(self, scan: Listing, check: Callable[[], None]) -> None:
        self.scan = scan
        self.check = check
        self.count = 0  # entries handed out so far
        self._ahead: m.Entry | None = None  # read but did not fit into the previous page

    def next(self) -> tuple[list[m.Entry], bool]:
        """The next page, and whether it is the last (the first page of an empty folder is empty)."""
        page: list[m.Entry] = []
        size = 0
        while True:
            entry = self._ahead
            if entry is None:
                self.check()
                try:
                    name, e = next(self.scan)
                except StopIteration:
                    return page, True
                if len(name) > m.MAX_PATH_CHARS:  # the client would refuse the whole page
                    raise ErrorCode.BAD_PATH.error(
                        f"a name in this folder is too long to send ({len(name):,} characters, at most "
                        f"{m.MAX_PATH_CHARS:,}); list a folder further down to see the rest",
                    )
                entry = to_wire(e, name)
            cost = len(entry.name.encode("utf-8", "surrogatepass")) + 64  # 64: the other fields, generously
            if entry.target is not None:  # a link's target may be as long as a path
                cost += len(entry.target.encode("utf-8", "surrogatepass"))
            if page and (len(page) >= PAGE or size + cost > PAGE_BYTES):
                self._ahead = entry
                return page, False
            self._ahead = None
            page.append(entry)
            size += cost
            self.count += 1


async def handle_mkdir(svc: FilesService, msg: m.Mkdir) -> None:
    """Create a directory."""
    t0 = time.monotonic()
    creations = await svc.creations()  # each folder made counts against the file limit
    # 0o777 minus the server's umask, as mkdir(1) makes folders
    await svc.storage.mkdir(
        svc.user.name,
        parse_path(msg.path),
        parents=msg.parents,
        exist_ok=msg.parents,
        mode=0o777,
        creations=creations,
    )
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("mkdir", msg.path, t0)


async def handle_remove(svc: FilesService, msg: m.Remove) -> None:
    """Remove a file, link or (recursively) a directory."""
    t0 = time.monotonic()
    storage, user, path = svc.storage, svc.user.name, parse_path(msg.path)
    node = await storage.stat(user, path)
    try:
        # (counted: the file-count quota must stay exact; the interface's remove does not count)
        removed = await storage.remove_counted(path, recursive=msg.recursive and node.kind == "dir")
    except BaseException:
        if msg.recursive and node.kind == "dir":
            # Some of it may be gone (rm -r stops at its first error): count again before trusting it.
            svc.ctx.usage.invalidate_all(user)
        raise
    svc.account_removed(path, node, removed)
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("rm", msg.path, t0)


async def handle_rename(svc: FilesService, msg: m.Rename) -> None:
    """Rename inside the home."""
    t0 = time.monotonic()
    storage = svc.storage
    replaced = await in_thread(lambda: storage.exists(msg.dst) and storage.exists(msg.src))
    src, dst = parse_path(msg.src), parse_path(msg.dst)
    await storage.rename(svc.user.name, src, dst)
    usage = svc.ctx.usage
    usage.invalidate(svc.user.name)  # an overwritten target changes usage
    if replaced:  # one entry fewer (a race with another session only makes the count high)
        usage.add(svc.user.name, 0, entries=-1)
    # (partial names can be neither end: the jail refuses them; a folder takes its partials along)
    usage.moved_tree(svc.user.name, join_path(src), join_path(dst))
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("mv", f"{msg.src} -> {msg.dst}", t0)


async def handle_df(svc: FilesService, msg: m.Df) -> None:
    """Usage (partial uploads included, and shown apart), quota and free disk space."""
    used = await svc.current_usage()
    name, usage = svc.user.name, svc.ctx.usage
    # Uploads running now hold bytes on disk too: what they have written so far.
    writing = svc.ctx.uploads_in(svc.storage.home)
    being_written = sum(getattr(up, "pos", 0) for up in writing.values())
    await svc.send(
        m.DfReply(
            id=msg.id,
            used=used + being_written,
            quota=svc.user.quota,
            free=svc.storage.free_space(),
            partial=usage.partial_bytes(name) + being_written,
            partials=len(usage.partials(name)) + len(writing),
            files=usage.entries(name) or 0,
            max_files=svc.user.max_files,
        )
    )


class FilesService(FolderService):
    """Stat, list, mkdir, rm, mv and df of one session (no state of its own)."""

    worker_handlers: ClassVar[dict[type[m.Message], Handler]] = {
        m.Stat: handle_stat,
        m.ListDir: handle_list,
        m.Mkdir: handle_mkdir,
        m.Remove: handle_remove,
        m.Rename: handle_rename,
        m.Df: handle_df,
    }
