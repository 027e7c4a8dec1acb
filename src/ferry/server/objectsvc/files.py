"""The files service of the object backend: stat, list (plain, recursive, patterns), mkdir, rm, mv
and df, each one or a few transactions of :class:`~ferry.store.objects.ObjectStorage` (the namespace
in PostgreSQL, shared by every server: what one server did, another lists at once).

The replies are those of the folder backend's :mod:`ferry.server.files` (same pages, same order of
a recursive listing: a folder's entries, then its sub-folders' in the order they were listed), so a
client cannot tell the backends apart. What differs, and why:

- ``df`` reports the usage the database keeps (exact across servers; ``partial`` is what uploads in
  progress have set aside). ``free`` is :data:`~ferry.wire.messages.FREE_UNMETERED`: an object store
  has no free space to read (the client shows "unlimited"; the quota still limits).
- A recursive listing keeps the queue of folders still to list (names only, never their entries):
  memory grows with the number of folders of the tree, not with its files.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

from ferry.errors import NotADirectory, NotFound
from ferry.server.files import PAGE, PAGE_BYTES, node_to_wire, to_wire
from ferry.server.glob import MAX_MATCHES, has_magic, matches
from ferry.server.pathrules import parse_path
from ferry.server.service import Handler, Service
from ferry.store.api import Node, Parts
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.store.objects import ObjectStorage


class ObjectService(Service["ObjectStorage"]):
    """A service of the object backend (the storage is the server's one :class:`ObjectStorage`,
    shared by every session; usage lives in its database, not in the server's memory)."""


async def handle_stat(svc: ObjectService, msg: m.Stat) -> None:
    """Reply with the path's metadata."""
    t0 = time.monotonic()
    node = await svc.storage.stat(svc.user.name, parse_path(msg.path))
    await svc.send(m.StatReply(id=msg.id, entry=node_to_wire(node)))
    svc.log_op("stat", msg.path, t0)


async def walk(
    storage: ObjectStorage, user: str, top: Parts, *, recursive: bool
) -> AsyncIterator[tuple[str, Node]]:
    """The entries of folder ``top`` as (name relative to ``top``, node), read page by page; with
    ``recursive``, then those of each sub-folder (breadth first, as the folder backend lists)."""
    folders: deque[Parts] = deque([()])
    while folders:
        rel = folders.popleft()
        after = ""
        while True:
            page = await storage.list_dir(user, (*top, *rel), after=after, limit=PAGE)
            for node in page:
                name = "/".join((*rel, node.name))
                if recursive and node.kind == "dir":
                    folders.append((*rel, node.name))
                yield name, node
            if len(page) < PAGE:
                break
            after = page[-1].name
        if not recursive:
            return


async def expand(storage: ObjectStorage, user: str, pattern: str) -> AsyncIterator[tuple[str, Node]]:
    """The (path, node) pairs ``pattern`` matches, sorted by path, by the rules of
    :mod:`ferry.server.glob` (hidden names need a leading ``.``; partial uploads are not names here)."""
    parts = parse_path(pattern)
    if not parts:
        raise ErrorCode.NOT_FOUND.error("an empty pattern matches nothing")
    count = 0
    async for found in _expand(storage, user, (), parts):
        count += 1
        if count > MAX_MATCHES:
            raise ErrorCode.BAD_REQUEST.error(
                f"'{pattern}' matches more than {MAX_MATCHES} names; narrow the pattern"
            )
        yield found


async def _expand(
    storage: ObjectStorage, user: str, base: Parts, rest: Parts
) -> AsyncIterator[tuple[str, Node]]:
    component, last = rest[0], len(rest) == 1
    if has_magic(component):
        names: list[str] = []
        try:
            async for name, node in walk(storage, user, base, recursive=False):
                if matches(component, name) and (last or node.kind == "dir"):
                    names.append(name)
        except (NotFound, NotADirectory):
            return  # a folder that vanished holds no match
        names.sort()
    else:
        names = [component]
    for name in names:
        path = (*base, name)
        try:
            node = await storage.stat(user, path)
        except (NotFound, NotADirectory):
            continue
        if last:
            yield "/".join(path), node
        elif node.kind == "dir":
            async for found in _expand(storage, user, path, rest[1:]):
                yield found


async def handle_list(svc: ObjectService, msg: m.ListDir) -> None:
    """Reply with pages of entries (a single file lists as itself), cut as the folder backend cuts
    them: at most :data:`~ferry.server.files.PAGE` entries and about ``PAGE_BYTES`` of names."""
    t0 = time.monotonic()
    storage, user = svc.storage, svc.user.name
    entries: AsyncIterator[tuple[str, Node]]
    if msg.glob:
        entries = expand(storage, user, msg.path)
    else:
        path = parse_path(msg.path)
        node = await storage.stat(user, path)
        if node.kind != "dir":
            await svc.send(m.ListReply(id=msg.id, entries=[node_to_wire(node)]))
            svc.log_op("list", msg.path, t0, nbytes=1)
            return
        entries = walk(storage, user, path, recursive=msg.recursive)
    page: list[m.Entry] = []
    size = count = 0
    async for name, node in entries:
        if len(name) > m.MAX_PATH_CHARS:  # the client would refuse the whole page
            raise ErrorCode.BAD_PATH.error(
                f"a name in this folder is too long to send ({len(name):,} characters, at most "
                f"{m.MAX_PATH_CHARS:,}); list a folder further down to see the rest",
            )
        cost = len(name.encode("utf-8", "surrogatepass")) + 64
        if page and (len(page) >= PAGE or size + cost > PAGE_BYTES):
            await svc.send(m.ListReply(id=msg.id, entries=page, more=True))
            page, size = [], 0
        page.append(to_wire(node, name))
        size += cost
        count += 1
    await svc.send(m.ListReply(id=msg.id, entries=page, more=False))
    svc.log_op("list", msg.path, t0, nbytes=count)


async def handle_mkdir(svc: ObjectService, msg: m.Mkdir) -> None:
    """Create a folder (with ``parents``, the missing ones above it too, and no error if it exists)."""
    t0 = time.monotonic()
    await svc.storage.mkdir(
        svc.user.name, parse_path(msg.path), parents=msg.parents, exist_ok=msg.parents, mode=0o755
    )
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("mkdir", msg.path, t0)


async def handle_remove(svc: ObjectService, msg: m.Remove) -> None:
    """Remove a file, or a folder (empty unless ``recursive``) in one transaction; the chunks go
    to the sweeper."""
    t0 = time.monotonic()
    await svc.storage.remove(svc.user.name, parse_path(msg.path), recursive=msg.recursive)
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("rm", msg.path, t0)


async def handle_rename(svc: ObjectService, msg: m.Rename) -> None:
    """Move inside the home: one row changes its parent and name, in one transaction."""
    t0 = time.monotonic()
    await svc.storage.rename(svc.user.name, parse_path(msg.src), parse_path(msg.dst))
    await svc.send(m.Ok(id=msg.id))
    svc.log_op("mv", f"{msg.src} -> {msg.dst}", t0)


async def handle_df(svc: ObjectService, msg: m.Df) -> None:
    """Usage as the database counts it (the same through every server), quota, and what is left."""
    usage = await svc.storage.usage(svc.user.name)
    quota = svc.user.quota
    used = usage.used + usage.reserved
    await svc.send(
        m.DfReply(
            id=msg.id,
            used=used,
            quota=quota,
            free=m.FREE_UNMETERED,
            partial=usage.reserved,
            files=usage.files,
            max_files=svc.user.max_files,
        )
    )


class ObjectFilesService(ObjectService):
    """Stat, list, mkdir, rm, mv and df on the object backend (no state of its own)."""

    worker_handlers: ClassVar[dict[type[m.Message], Handler]] = {
        m.Stat: handle_stat,
        m.ListDir: handle_list,
        m.Mkdir: handle_mkdir,
        m.Remove: handle_remove,
        m.Rename: handle_rename,
        m.Df: handle_df,
    }
