"""Request handlers for file-system operations (stat, list, mkdir, rm, mv, df).

Every path goes through the session's :class:`~ferry.server.jail.Jail`; blocking file-system calls run
in a thread so one slow disk does not stall other sessions. Each operation is logged once.
"""

from __future__ import annotations

import contextlib
import os
import stat as statmod
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from ferry.server import work
from ferry.server.glob import expand as expand_glob
from ferry.server.jail import Entry as JailEntry
from ferry.server.jail import Jail, ListScan
from ferry.server.work import in_thread, run_steps
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.server.session import Session

PAGE = 1000  # entries per ListReply page
#: bytes of entry names per page: recursive names can be KiBs long, so a count alone does not keep
#: a page below the 1 MiB message limit (the client would drop the connection)
PAGE_BYTES = 1 << 18


def jail_of(session: Session) -> Jail:
    """The session's jail (exists once authenticated)."""
    assert session.jail is not None
    return session.jail


def to_wire(e: JailEntry, name: str | None = None) -> m.Entry:
    """Convert a jail entry to its wire form."""
    return m.Entry(
        name=name if name is not None else e.name,
        kind=e.kind,
        size=e.size,
        mtime=m.wire_time(e.mtime),
        mode=e.mode,
        target=e.target,
    )


def stat_entry(jail: Jail, path: str) -> m.Entry:
    """Wire entry for ``path`` (lstat semantics)."""
    st = jail.lstat(path)
    if statmod.S_ISREG(st.st_mode):
        kind = "file"
    elif statmod.S_ISDIR(st.st_mode):
        kind = "dir"
    elif statmod.S_ISLNK(st.st_mode):
        kind = "link"
    else:
        kind = "other"
    name = path.rstrip("/").rsplit("/", 1)[-1] if path not in ("", ".") else "."
    return m.Entry(
        name=name,
        kind=kind,  # type: ignore[arg-type]
        size=st.st_size,
        mtime=m.wire_time(st.st_mtime),
        mode=statmod.S_IMODE(st.st_mode),
        target=jail.readlink(path) if kind == "link" else None,
    )


def log_op(session: Session, op: str, path: str, started: float, result: str = "ok", nbytes: int = 0) -> None:
    """One log line per operation: user, peer, operation, path, bytes, seconds, result."""
    session.ctx.log.info(
        "op user=%s peer=%s op=%s path=%s bytes=%d seconds=%.3f result=%s",
        session.user.name if session.user else "-",
        session.peer,
        op,
        path,
        nbytes,
        time.monotonic() - started,
        result,
    )


async def handle_stat(session: Session, msg: m.Stat) -> None:
    """Reply with the path's metadata."""
    t0 = time.monotonic()
    entry = await in_thread(stat_entry, jail_of(session), msg.path)
    await session.send(m.StatReply(id=msg.id, entry=entry))
    log_op(session, "stat", msg.path, t0)


async def handle_list(session: Session, msg: m.ListDir) -> None:
    """Reply with pages of entries (a single file lists as itself), streamed from the walk: memory
    holds the page being sent and the next one, never the whole listing."""
    t0 = time.monotonic()
    jail = jail_of(session)
    check = work.current.get().check  # (here: the thread below does not see the context)

    def open_listing() -> m.Entry | Listing:
        if msg.glob:  # a pattern: its matches, found as the pages are cut (ferry.server.glob)
            return expand_glob(jail, msg.path, check)
        entry = stat_entry(jail, msg.path)
        if entry.kind != "dir":
            return entry
        return jail.list_scan(msg.path, recursive=msg.recursive)

    async with work.current.get().walk_slot():
        opened = await in_thread(open_listing, release=_close_listing)
        if isinstance(opened, m.Entry):
            await session.send(m.ListReply(id=msg.id, entries=[opened]))
            log_op(session, "list", msg.path, t0, nbytes=1)
            return
        pages = _Pages(opened, work.current.get().check)
        async with contextlib.aclosing(work.prefetched(pages.next, opened.close)) as steps:
            async for page, done in steps:
                await session.send(m.ListReply(id=msg.id, entries=page, more=not done))
    log_op(session, "list", msg.path, t0, nbytes=pages.count)


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


async def handle_mkdir(session: Session, msg: m.Mkdir) -> None:
    """Create a directory."""
    t0 = time.monotonic()
    await in_thread(lambda: jail_of(session).mkdir(msg.path, parents=msg.parents, exist_ok=msg.parents))
    await session.send(m.Ok(id=msg.id))
    log_op(session, "mkdir", msg.path, t0)


async def handle_remove(session: Session, msg: m.Remove) -> None:
    """Remove a file, link or (recursively) a directory."""
    t0 = time.monotonic()
    jail = jail_of(session)
    assert session.user is not None
    st = await in_thread(jail.lstat, msg.path)
    if msg.recursive and statmod.S_ISDIR(st.st_mode):
        session_work = work.current.get()
        async with session_work.walk_slot():
            await run_steps(jail.remove_walk(msg.path))
    else:
        await in_thread(lambda: jail.remove(msg.path, recursive=msg.recursive))
    if statmod.S_ISREG(st.st_mode):
        session.ctx.usage.add(session.user.name, -st.st_size)
    else:
        session.ctx.usage.invalidate(session.user.name)
    await session.send(m.Ok(id=msg.id))
    log_op(session, "rm", msg.path, t0)


async def handle_rename(session: Session, msg: m.Rename) -> None:
    """Rename inside the home."""
    t0 = time.monotonic()
    jail = jail_of(session)
    await in_thread(lambda: jail.rename(msg.src, msg.dst))
    assert session.user is not None
    session.ctx.usage.invalidate(session.user.name)  # an overwritten target changes usage
    await session.send(m.Ok(id=msg.id))
    log_op(session, "mv", f"{msg.src} -> {msg.dst}", t0)


async def current_usage(session: Session) -> int:
    """Bytes used by the session user's home (computed once, then tracked)."""
    assert session.user is not None
    usage = session.ctx.usage
    name = session.user.name
    known = usage.known(name)
    if known is not None:
        return known
    async with usage.lock(name):
        known = usage.known(name)
        if known is None:
            async with work.current.get().walk_slot():
                known = await run_steps(jail_of(session).usage_walk()) or 0
            usage.set(name, known)
        return known


async def handle_df(session: Session, msg: m.Df) -> None:
    """Usage, quota and free disk space."""
    assert session.user is not None
    used = await current_usage(session)
    vfs = os.statvfs(session.user.home)
    await session.send(
        m.DfReply(id=msg.id, used=used, quota=session.user.quota, free=vfs.f_bavail * vfs.f_frsize)
    )
