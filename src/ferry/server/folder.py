"""The folder backend: one account's home folder on this machine, behind the storage interface.

:class:`FolderStorage` is what the server's services reach files through when the server keeps its
users' files under ``--root`` (the zero-configuration default). A session opens one at login on the
account's home (created if missing) and closes it when its last thread job is done. Everything goes
through the session's :class:`~ferry.server.jail.Jail` (descriptors, ``O_NOFOLLOW``, no way out of
the home); the services never hold the jail itself.

Two kinds of methods:

- the storage interface, :class:`ferry.store.api.Storage` (coroutines; mypy checks the class against
  it below): stat, paged listings, mkdir, remove, rename, attributes, small files in one step, close.
  Blocking work runs in the session's file or walk pool, as the services ran it before.
- folder-only paths (blocking: called in the session's threads, or on the loop where one call is
  cheaper than a thread hop), which the object backend replaces by chunk operations
  (:class:`ferry.store.api.ChunkStorage`): reads and partial uploads by descriptor (``sendfile``,
  ``pwrite`` in the client's chunking, resume by hashing the partial's prefix), the descriptor tree
  walkers (listings, tree transfers, sync scans, patterns), the usage walk, a working directory for
  commands, free disk space. See docs/scale-out.md ("The folder backend") for why these stay as they
  are: chunking them into 4 MiB BLAKE3 pieces would cost a buffer and a second hash per transfer.

Quotas: a folder is served by one server, which checks a quota against its usage count before it
calls the backend (ferry.server.transfer, ferry.server.tree); the ``quota`` arguments of the
interface are for backends shared by several servers and are not counted again here. The file-count
quota is enforced where each file or folder is made: the methods that make them take the server's
count as ``creations`` (:class:`ferry.server.jail.Creations`; an optional argument beyond the
interface), and removals report how many entries went (:meth:`FolderStorage.remove_counted`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from ferry.server import work
from ferry.server.glob import expand as expand_glob
from ferry.server.jail import Jail
from ferry.server.jailcore import Creations, Entry
from ferry.server.oserrors import translate_oserror
from ferry.server.pathrules import join_path
from ferry.server.usage import HomeUsage
from ferry.server.walkers import EntryScan, ListScan, TreeDirs, TreeScan
from ferry.store.api import Node, Parts

if TYPE_CHECKING:
    from ferry.store.api import Storage


def _node(e: Entry) -> Node:
    """The interface's node for a jail entry (the same fields)."""
    return Node(e.name, e.kind, e.size, e.mtime, e.mode, target=e.target)


class FolderStorage:
    """One account's home folder (see the module docstring)."""

    #: commands run in the home folder (ferry.server.exec)
    exec_supported = True

    def __init__(self, home: str | os.PathLike[str], user: str, *, max_depth: int) -> None:
        """Open (create if missing, mode 0700) the home of account ``user``."""
        os.makedirs(home, mode=0o700, exist_ok=True)
        self._jail = Jail(home, max_depth=max_depth)
        #: the account this storage serves (calls naming another are a bug, refused)
        self.user = user

    @property
    def home(self) -> str:
        """The home folder's path on the server (for logs and keys; never used to reach files)."""
        return self._jail.home

    def _own(self, user: str) -> None:
        if user != self.user:
            raise ValueError(f"the folder storage of {self.user!r} was asked about {user!r}")

    # -- the storage interface ------------------------------------------------------------------------

    async def stat(self, user: str, path: Parts) -> Node:
        """See :meth:`ferry.store.api.Storage.stat` (a link is described, never followed)."""
        self._own(user)
        return await work.in_thread(self.node, join_path(path))

    async def list_dir(self, user: str, path: Parts, *, after: str = "", limit: int = 1000) -> list[Node]:
        """See :meth:`ferry.store.api.Storage.list_dir` (partial uploads are not listed). Each page
        reads the whole folder (the folder backend's listings stream through :meth:`list_scan`)."""
        self._own(user)

        def page() -> list[Node]:
            folder = join_path(path)
            entries = sorted(
                (e for e in self._jail.iter_dir(folder) if e.name > after), key=lambda e: e.name
            )[:limit]
            return [_node(e) for e in entries]

        return await work.in_thread(page)

    async def mkdir(
        self,
        user: str,
        path: Parts,
        *,
        parents: bool = False,
        exist_ok: bool = False,
        mode: int = 0o755,
        creations: Creations | None = None,
    ) -> None:
        """See :meth:`ferry.store.api.Storage.mkdir` (``mode`` minus the server's umask; each folder
        made counts in ``creations``)."""
        self._own(user)
        client_path = join_path(path)
        await work.in_thread(
            lambda: self._jail.mkdir(client_path, parents=parents, exist_ok=exist_ok, mode=mode, creations=creations)
        )

    async def remove(self, user: str, path: Parts, *, recursive: bool = False) -> None:
        """See :meth:`ferry.store.api.Storage.remove` (:meth:`remove_counted`)."""
        self._own(user)
        await self.remove_counted(path, recursive=recursive)

    async def remove_counted(self, path: Parts, *, recursive: bool = False) -> int:
        """:meth:`remove`, returning how many entries (files, folders, links) went. A recursive
        removal is tree-sized work: it holds one of the session's walk slots and runs in steps in
        the walk pool, stopping between entries when the session ends (what was removed stays
        removed, as with ``rm -r``)."""
        client_path = join_path(path)
        if recursive:
            async with work.current.get().walk_slot():
                return await work.run_steps(self._jail.remove_walk(client_path)) or 0
        return await work.in_thread(self.remove_now, client_path)

    async def rename(self, user: str, src: Parts, dst: Parts, *, overwrite: bool = True) -> None:
        """See :meth:`ferry.store.api.Storage.rename` (``renameat``: atomic, never a copy)."""
        self._own(user)
        await work.in_thread(lambda: self._jail.rename(join_path(src), join_path(dst), overwrite=overwrite))

    async def set_attrs(
        self, user: str, path: Parts, *, mtime: float | None = None, mode: int | None = None
    ) -> None:
        """See :meth:`ferry.store.api.Storage.set_attrs`."""
        self._own(user)
        mtime_ns = None if mtime is None else round(mtime * 1e9)
        await work.in_thread(self.set_attrs_now, join_path(path), mtime_ns, mode)

    async def store_small(
        self,
        user: str,
        path: Parts,
        data: bytes,
        *,
        mode: int,
        mtime: float,
        overwrite: bool,
        quota: int | None,
        creations: Creations | None = None,
    ) -> int:
        """See :meth:`ferry.store.api.Storage.store_small`: a temp file next to the target, renamed
        into place (``quota`` and ``creations``: see the module docstring). Small: done on the loop
        thread in one path walk, cheaper than a thread hop per file."""
        self._own(user)
        client_path = join_path(path)
        try:
            return self._jail.store_small(
                client_path, data, mode=mode, mtime=mtime, overwrite=overwrite, creations=creations
            )
        except OSError as exc:
            raise translate_oserror(exc, client_path) from exc

    async def close(self) -> None:
        """See :meth:`ferry.store.api.Storage.close` (:meth:`release`)."""
        self.release()

    def release(self) -> None:
        """Close the home descriptor (idempotent). No thread job may still be using it: the session
        calls this after its last one."""
        self._jail.close()

    # -- folder-only: the namespace, blocking (for batch jobs already in a thread) ---------------------

    def node(self, path: str) -> Node:
        """:meth:`stat` of client path ``path``, blocking; the home is named ``""``."""
        entry = Entry.from_stat(path.rsplit("/", 1)[-1] if path not in ("", ".") else "", self._jail.lstat(path))
        if entry.kind == "link":
            entry = entry.with_target(self._jail.readlink(path))
        return _node(entry)

    def lstat(self, path: str) -> os.stat_result:
        """The status of ``path`` itself (a final link is described, not followed)."""
        return self._jail.lstat(path)

    def exists(self, path: str) -> bool:
        """Whether ``path`` exists (a link counts, dangling or not)."""
        return self._jail.exists(path)

    def remove_now(self, path: str, *, recursive: bool = False) -> int:
        """Remove a file, link or folder (empty unless ``recursive``), blocking; how many entries went."""
        return self._jail.remove(path, recursive=recursive)

    def set_attrs_now(self, path: str, mtime_ns: int | None, mode: int | None) -> None:
        """Set the permission bits and/or the modification time (nanoseconds), blocking; a zero or
        None leaves that attribute alone."""
        if mode:
            self._jail.chmod(path, mode)
        if mtime_ns:
            self._jail.utime(path, mtime_ns)

    # -- folder-only: contents by descriptor ------------------------------------------------------------

    def open_read(self, path: str) -> int:
        """A blocking descriptor on regular file ``path`` (the caller closes it): downloads read it
        with ``pread`` or hand it to ``sendfile``."""
        return self._jail.open_read(path)

    def open_partial(
        self, path: str, token: str, *, on_foreign: Callable[[str, os.stat_result], None] | None = None
    ) -> tuple[int, str, int]:
        """The resumable partial file of an upload to ``path``: (descriptor, partial's client path,
        bytes it holds). See :meth:`ferry.server.jail.Jail.open_partial`."""
        return self._jail.open_partial(path, token, on_foreign=on_foreign)

    def commit(self, partial: str, path: str, *, overwrite: bool, fd: int, creations: Creations | None = None) -> None:
        """Move the finished partial (the inode ``fd`` wrote) to ``path`` atomically (a new name counts
        in ``creations``)."""
        self._jail.commit(partial, path, overwrite=overwrite, fd=fd, creations=creations)

    def remove_partial(self, partial: str, fd: int) -> None:
        """Remove a partial file, if its name still holds the inode ``fd`` wrote."""
        self._jail.remove_partial(partial, fd)

    # -- folder-only: walkers ---------------------------------------------------------------------------

    def list_scan(self, path: str, *, recursive: bool) -> ListScan:
        """A streamed listing of folder ``path`` (see :class:`~ferry.server.jail.ListScan`)."""
        return self._jail.list_scan(path, recursive=recursive)

    def expand_glob(self, pattern: str, check: Callable[[], None]) -> Generator[tuple[str, Entry], None, None]:
        """The matches of ``pattern``, sorted by path (see :func:`ferry.server.glob.expand`)."""
        return expand_glob(self._jail, pattern, check)

    def scan_tree(self, path: str, *, inline_max: int) -> TreeScan:
        """A tree download's walk of folder ``path`` (see :class:`~ferry.server.jail.TreeScan`)."""
        return self._jail.scan_tree(path, inline_max=inline_max)

    def tree_dirs(self, path: str, *, create: bool = True, creations: Creations | None = None) -> TreeDirs:
        """Folder ``path`` opened for a tree upload or named reads (see :class:`~ferry.server.jail.TreeDirs`;
        each file or folder it makes counts in ``creations``)."""
        return self._jail.tree_dirs(path, create=create, creations=creations)

    def scan_entries(
        self,
        path: str,
        *,
        exclude: Callable[[str, bool], bool] | None = None,
        digest: Callable[[int, os.stat_result], bytes] | None = None,
    ) -> EntryScan:
        """A sync listing's walk of folder ``path`` (see :class:`~ferry.server.jail.EntryScan`)."""
        return self._jail.scan_entries(path, exclude=exclude, digest=digest)

    def usage_walk(self) -> Generator[HomeUsage, None, None]:
        """The home's usage counted one entry at a time (see :meth:`ferry.server.jail.Jail.usage_walk`)."""
        return self._jail.usage_walk()

    # -- folder-only: the machine -------------------------------------------------------------------------

    def open_dir(self, path: str) -> int:
        """A descriptor on folder ``path``: where a command starts (ferry.server.exec)."""
        return self._jail.open_dir(path)

    def free_space(self) -> int:
        """Bytes free for unprivileged users on the home's file system."""
        vfs = os.statvfs(self.home)
        return vfs.f_bavail * vfs.f_frsize


__all__ = ["FolderStorage"]


if TYPE_CHECKING:  # mypy proves that FolderStorage implements the interface

    def _implements(storage: FolderStorage) -> Storage:
        return storage
