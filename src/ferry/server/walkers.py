"""Tree walkers: one walk for a whole folder, its descriptors reused for every entry in it (tree
downloads :class:`TreeScan`, listings :class:`ListScan`, tree uploads and named reads
:class:`TreeDirs`, sync listings :class:`EntryScan`).

Folders are entered through a chain of directory descriptors with ``O_NOFOLLOW`` (at most
``MAX_OPEN_DIRS`` open, linear in the entries whatever the depth); a symbolic link is never
entered; walks started below a folder stop at ``max_depth`` levels (code ``too-deep``).
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import stat
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import msgspec

from ferry.errors import FerryError
from ferry.fskit import (
    MAX_NAME_BYTES,
    READ_FLAGS,
    DirCache,
    is_partial_name,
    partial_name,
)
from ferry.server.jailcore import (
    Creations,
    Entry,
    EntryKind,
    JailCore,
    _DirChain,
    _entries_at,
    _has_entries,
    _kind,
    _kind_at,
)
from ferry.server.oserrors import _symlink_refused, _translating, translate_oserror
from ferry.server.pathrules import _show, _too_deep, join_path, parse_path, refuse_reserved
from ferry.server.staging import _store_small_at
from ferry.wire.codes import ErrorCode

_R = TypeVar("_R")


# --------------------------------------------------------------------------------------------------
# Trees: one walk for a whole folder, its descriptors reused for every file in it


@dataclass(frozen=True, slots=True)
class TreeFile:
    """A regular file found by :class:`TreeScan`; ``data`` is None when it is larger than the inline
    limit (then it was not read)."""

    path: str
    size: int
    mtime: float
    mode: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class TreeDir:
    """A folder found by :class:`TreeScan` (reported before its contents)."""

    path: str


@dataclass(frozen=True, slots=True)
class TreeFailure:
    """A file or folder :class:`TreeScan` could not read (vanished, permission, swapped for a symlink)."""

    path: str
    error: FerryError


TreeRecord = TreeFile | TreeDir | TreeFailure


class _FolderScan(Generic[_R]):
    """A walk over folder ``path`` below a jail, as an iterator (what :class:`TreeScan` and
    :class:`ListScan` share): the folder is opened at once (a missing folder, a file or a symlink
    fails here, not on the first ``next``), its subfolders through a :class:`_DirChain`.
    Subclasses yield their records from :meth:`_walk`. Call :meth:`close` when done."""

    def __init__(self, jail: JailCore, path: str) -> None:
        self._root = jail.open_dir(path)
        try:
            self._chain = _DirChain(self._root, jail._max_open_dirs)
        except BaseException:
            os.close(self._root)
            raise
        self._base = "" if path in ("", ".") else path
        self._max_depth = jail._max_depth
        self._gen = self._walk()

    def __iter__(self) -> Iterator[_R]:
        """The records (the walk's generator itself: a ``for`` loop over a scan makes no Python
        call per record)."""
        return self._gen

    def __next__(self) -> _R:
        """The next record (raises StopIteration at the end)."""
        return next(self._gen)

    def close(self) -> None:
        """Release every descriptor (idempotent)."""
        self._gen.close()
        self._chain.close()
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def _client_path(self, rel: str) -> str:
        """The home-relative path of ``rel`` (relative to the scanned folder)."""
        return f"{self._base}/{rel}" if self._base and rel else rel or self._base

    def _walk(self) -> Generator[_R, None, None]:
        raise NotImplementedError


class TreeScan(_FolderScan[TreeRecord]):
    """Iterates over a folder tree: :class:`TreeDir` before the folder's contents, :class:`TreeFile`
    with the bytes of files up to ``inline_max``, :class:`TreeFailure` for what cannot be read.

    Paths are relative to the scanned folder. Each folder is opened once (``O_NOFOLLOW``, relative
    to its parent's descriptor) and its files are opened relative to it: no walk from the home per
    file. Symbolic links, FIFOs, devices and partial uploads are skipped, as listings skip them; an
    entry swapped for a symlink after the folder was read is reported as a ``symlink`` failure and
    never followed. Names are sorted, so the order is deterministic. At most ``MAX_OPEN_DIRS``
    descriptors stay open however deep the tree. Call :meth:`close` when done (also when abandoned).
    """

    def __init__(self, jail: JailCore, path: str, inline_max: int) -> None:
        self._inline_max = inline_max
        super().__init__(jail, path)

    def _walk(self) -> Generator[TreeRecord, None, None]:
        chain = self._chain
        with _translating(self._base):
            subdirs = yield from self._folder(chain.top(), "")
        # Per level: its path, its depth below the root, the subfolders still to visit (a stack).
        stack: list[tuple[str, int, list[str]]] = [("", 0, subdirs)]
        while stack:
            rel, depth, todo = stack[-1]
            if not todo:
                stack.pop()
                if len(chain) > 1:
                    with _translating(self._client_path(rel)):
                        chain.pop()
                continue
            name = todo.pop()
            sub = f"{rel}/{name}" if rel else name
            parent = chain.top()
            try:
                chain.push(name)
            except OSError as exc:
                yield TreeFailure(sub, self._why(exc, parent, name, sub))
                continue
            yield TreeDir(sub)
            try:
                if depth + 2 <= self._max_depth:
                    subdirs = yield from self._folder(chain.top(), sub)
                else:  # its contents would be deeper than the limit: report them, if any, as one
                    subdirs = []
                    if _has_entries(chain.top()):
                        path = self._client_path(sub)
                        yield TreeFailure(sub, _too_deep(path, self._max_depth, "below the folder downloaded"))
            except OSError as exc:  # e.g. unreadable folder: report it, skip its contents
                yield TreeFailure(sub, translate_oserror(exc, self._client_path(sub)))
                subdirs = []
            stack.append((sub, depth + 1, subdirs))

    def _why(self, exc: OSError, parent: int, name: str, rel: str) -> FerryError:
        path = self._client_path(rel)
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _kind_at(parent, name) == "link":
            return _symlink_refused(path)  # O_NOFOLLOW|O_DIRECTORY says ENOTDIR for a link on Linux
        return translate_oserror(exc, path)

    def _folder(self, dfd: int, rel: str) -> Generator[TreeRecord, None, list[str]]:
        """Yield the files of folder ``dfd``; return its subfolders' names, last first (a stack)."""
        with os.scandir(dfd) as it:
            # d_type from the directory read: no stat per entry (the file's fstat comes with the open).
            found = sorted(
                (de.name, de.is_dir(follow_symlinks=False), de.is_file(follow_symlinks=False)) for de in it
            )
        subdirs: list[str] = []
        inline_max = self._inline_max
        for name, is_dir, is_file in found:
            if (not is_dir and not is_file) or is_partial_name(name):
                continue
            if is_dir:
                subdirs.append(name)
                continue
            path = f"{rel}/{name}" if rel else name
            yield _read_file_at(dfd, name, path, self._client_path(path), inline_max)
        subdirs.reverse()
        return subdirs


class ListScan(_FolderScan[tuple[str, Entry]]):
    """Iterates over a folder for a listing: ``(name, entry)`` pairs, the folder's own entries first
    (sorted by name) and, with ``recursive``, then each subfolder's in turn, depth-first in name
    order (the order of ``ls -R``); names are relative to the listed folder.

    Each folder is opened once (``O_NOFOLLOW``, relative to its parent's descriptor) and its entries
    are described relative to it: the cost is linear in the entries visited, however deep the tree,
    and at most ``MAX_OPEN_DIRS`` descriptors stay open. Memory holds one folder's entries (to sort
    them) and the names of the subfolders still to visit, never the whole listing. Partial uploads
    are hidden. A subfolder that vanished or was swapped for a file or symlink after it was listed
    is skipped; other errors (e.g. an unreadable folder) end the scan with a FerryError. Call
    :meth:`close` when done (also when abandoned).
    """

    def __init__(self, jail: JailCore, path: str, recursive: bool) -> None:
        self._recursive = recursive
        super().__init__(jail, path)

    def _folder(self, rel: str) -> list[Entry]:
        with _translating(self._client_path(rel)):
            return sorted(_entries_at(self._chain.top()), key=lambda e: e.name)

    def _walk(self) -> Generator[tuple[str, Entry], None, None]:
        chain = self._chain
        entries = self._folder("")
        yield from ((e.name, e) for e in entries)
        if not self._recursive:
            return
        # Per level: its path, its depth below the root, the subfolders still to visit, last first.
        stack = [("", 0, [e.name for e in reversed(entries) if e.kind == "dir"])]
        while stack:
            rel, depth, todo = stack[-1]
            if not todo:
                stack.pop()
                if len(chain) > 1:
                    with _translating(self._client_path(rel)):
                        chain.pop()
                continue
            name = todo.pop()
            sub = f"{rel}/{name}" if rel else name
            try:
                chain.push(name)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # vanished or swapped since it was listed: nothing left to list in it
                raise translate_oserror(exc, self._client_path(sub)) from exc
            entries = self._folder(sub)
            if entries and depth + 2 > self._max_depth:  # they would be deeper than the limit
                raise _too_deep(
                    self._client_path(sub),
                    self._max_depth,
                    "below the folder listed; list a folder further down to see the rest",
                )
            yield from ((f"{sub}/{e.name}", e) for e in entries)
            stack.append((sub, depth + 1, [e.name for e in reversed(entries) if e.kind == "dir"]))


def _read_file_at(dfd: int, name: str, path: str, client_path: str, inline_max: int) -> TreeFile | TreeFailure:
    """Open file ``name`` in folder ``dfd`` (never following a link) and describe it, with its bytes
    when it has at most ``inline_max``; ``path`` is how the record names it."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dfd)
    except OSError as exc:  # vanished (not-found), no permission, swapped for a symlink (ELOOP)
        return TreeFailure(path, translate_oserror(exc, client_path))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for a FIFO/device since listed
            return TreeFailure(path, ErrorCode.NOT_A_FILE.error(f"{_show(client_path)} is not a regular file"))
        data: bytes | None = None
        if st.st_size <= inline_max:
            data = os.read(fd, st.st_size + 1)
            if len(data) != st.st_size:
                return TreeFailure(path, ErrorCode.CHANGED.error(f"{_show(client_path)} changed while being read"))
    except OSError as exc:
        return TreeFailure(path, translate_oserror(exc, client_path))
    finally:
        os.close(fd)
    return TreeFile(path, st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode), data)


class TreeDirs:
    """The folders of one tree upload: opened once (``O_NOFOLLOW``, relative to their parent) and
    kept, at most ``limit`` at a time, so storing a file costs no walk from the home.

    Missing folders are created (``mkdir -p``); a symlink or a file where a folder should be is
    refused (``symlink``, ``not-a-directory``). A cached descriptor stays valid if another session
    renames the folder meanwhile: files then land in it under its new name, still inside the home
    (no client operation can move anything out of it). Call :meth:`close` when done.
    """

    def __init__(
        self, jail: JailCore, path: str, limit: int = 32, *, create: bool = True, creations: Creations | None = None
    ) -> None:
        self._jail = jail
        #: sees every folder and new file this tree makes (a file-count quota); may be replaced
        #: between batches (each batch with the limits of the moment)
        self.creations = creations
        self._base = parse_path(path)
        #: folder levels a record may add below the tree's root (see MAX_DEPTH)
        self._depth_left = jail._max_depth - len(self._base)
        if self._depth_left < 0:
            raise _too_deep(path, jail._max_depth, "below your home; ferry creates no deeper folder")
        self._create: int | None = 0o777 if create else None
        with _translating(path):
            root = jail._walk(self._base, create_mode=self._create, creations=creations)
        #: the tree's folders (relative to its root, validated), opened from the nearest one open
        self._dirs = DirCache(
            root,
            lambda fd, name, sub: jail._open_dir_at(
                fd, name, self.client_path(sub), self._create, creations=self.creations
            ),
            limit,
        )
        # Temp names: a random tag per tree plus a counter, instead of fresh random bytes per file.
        self._tag = secrets.token_hex(6)
        self._seq = itertools.count()

    def _open(self, rel: str) -> int:
        """The descriptor of folder ``rel`` (already validated by :func:`parse_path`), opened (and
        created) from its nearest cached ancestor down: a loop, not a recursion, however deep."""
        fd = self._dirs.cached(rel)
        if fd is not None:
            return fd
        if rel.count("/") >= self._depth_left:
            raise _too_deep(
                self.client_path(rel), self._jail._max_depth, "below your home; ferry creates no deeper folder"
            )
        return self._dirs.get(rel)

    def _folder(self, rel: str) -> int:
        fd = self._dirs.cached(rel)
        if fd is not None:  # only validated names are ever cached
            return fd
        if not parse_path(rel):  # "." (parse_path's spelling of the home): not a folder name here
            raise ErrorCode.BAD_PATH.error("'.' components are not allowed; drop the './'")
        return self._open(rel)

    def client_path(self, rel: str) -> str:
        """The home-relative path of ``rel`` (relative to the tree's root)."""
        return join_path((*self._base, rel)) if self._base else rel

    def mkdir(self, rel: str) -> None:
        """Make sure folder ``rel`` exists (with its parents)."""
        if not parse_path(rel):
            raise ErrorCode.BAD_PATH.error("a folder record needs a name")
        self._open(rel)

    def store(
        self,
        rel: str,
        data: bytes,
        *,
        mode: int,
        mtime: float,
        overwrite: bool,
        admit: Callable[[int], None] | None = None,
        inspect: bool = True,
    ) -> int:
        """Store small file ``rel`` atomically, as :meth:`Jail.store_small`; returns the size of the
        file it replaced. ``admit(replaced)`` may refuse (raise) before anything is written. With
        ``inspect`` False (overwriting, no quota, usage not tracked) the destination is not looked
        at first and 0 is returned: one system call less per file; an existing folder still makes
        the final rename fail (``is-a-directory``)."""
        rel_dir, _, name = rel.rpartition("/")
        if (
            name in ("", ".", "..")
            or rel[0] == "/"  # "/x" would split into the root and "x"
            or "\0" in name
            or (len(name) > 63 and len(os.fsencode(name)) > MAX_NAME_BYTES)
        ):
            parse_path(rel)  # raises the precise refusal
            raise ErrorCode.BAD_PATH.error(f"{_show(rel)}: not a file name")
        path = self.client_path(rel)
        refuse_reserved(name, path)
        pfd = self._folder(rel_dir)
        temp = partial_name(name, f"{self._tag}{next(self._seq):x}")
        with _translating(path):
            return _store_small_at(
                pfd,
                name,
                path,
                data,
                mode=mode,
                mtime=mtime,
                overwrite=overwrite,
                admit=admit,
                inspect=inspect or not overwrite or admit is not None,
                temp=temp,
                creations=self.creations,
            )

    def read(self, rel: str, inline_max: int) -> TreeFile | TreeFailure:
        """File ``rel`` (relative to the root) as a record, with its bytes up to ``inline_max``;
        what cannot be read (missing, refused name, a link, not a file) is a :class:`TreeFailure`."""
        path = self.client_path(rel)
        try:
            parts = parse_path(rel)
            if not parts:
                raise ErrorCode.BAD_PATH.error("a file name is needed, not the folder itself")
            with _translating(path):
                pfd = self._folder(join_path(parts[:-1]))
        except FerryError as exc:
            return TreeFailure(rel, exc)
        return _read_file_at(pfd, parts[-1], rel, path, inline_max)

    def trim(self) -> None:
        """Close the folders kept open, all but the tree's root (between batches)."""
        self._dirs.trim()

    def close(self) -> None:
        """Close every descriptor (idempotent)."""
        self._dirs.close()


def _descend(
    chain: _DirChain,
    subdirs: list[str],
    folder: Callable[[int, str], Generator[_R, None, list[str]]],
    failed: Callable[[str, FerryError], _R],
    show: Callable[[str], str],
    max_depth: int,
) -> Generator[_R, None, None]:
    """The depth-first part of :class:`EntryScan`'s walk: enter each subfolder of the root (names
    in ``subdirs``, last first) through ``chain`` and yield what ``folder(fd, path)`` yields; a
    folder that cannot be entered or read yields ``failed(path, error)`` (``show(path)`` names it
    in the message) and its contents are skipped, as are contents deeper than ``max_depth``
    (reported once per folder)."""
    stack: list[tuple[str, int, list[str]]] = [("", 0, subdirs)]
    while stack:
        rel, depth, todo = stack[-1]
        if not todo:
            stack.pop()
            if len(chain) > 1:
                with _translating(show(rel)):
                    chain.pop()
            continue
        name = todo.pop()
        sub = f"{rel}/{name}" if rel else name
        parent = chain.top()
        try:
            chain.push(name)
        except OSError as exc:
            yield failed(sub, _dir_error(exc, parent, name, show(sub)))
            continue
        try:
            if depth + 2 <= max_depth:
                subdirs = yield from folder(chain.top(), sub)
            else:  # its contents would be deeper than the limit: report them, if any, as one
                subdirs = []
                if _has_entries(chain.top()):
                    yield failed(sub, _too_deep(show(sub), max_depth, "below the folder listed"))
        except OSError as exc:  # e.g. unreadable folder: report it, skip its contents
            yield failed(sub, translate_oserror(exc, show(sub)))
            subdirs = []
        stack.append((sub, depth + 1, subdirs))


def _dir_error(exc: OSError, parent: int, name: str, path: str) -> FerryError:
    """Why folder ``name`` in ``parent`` could not be entered."""
    if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _kind_at(parent, name) == "link":
        return _symlink_refused(path)  # O_NOFOLLOW|O_DIRECTORY says ENOTDIR for a link on Linux
    return translate_oserror(exc, path)


# --------------------------------------------------------------------------------------------------
# Sync listings: every entry with its status, one walk


class ScanRecord(msgspec.Struct, frozen=True):
    """One entry found by :class:`EntryScan` (``error`` set when it could not be read).

    A msgspec struct, not a dataclass: a listing makes one per entry, and a struct is built
    several times faster."""

    path: str
    kind: EntryKind | Literal["error"]
    size: int = 0
    mtime: float = 0.0
    mode: int = 0
    digest: bytes = b""
    error: FerryError | None = None


class EntryScan(_FolderScan[ScanRecord]):
    """Iterates over a folder for a sync listing: the folder itself first (path ``""``), then every
    entry under it, each folder before its contents, names sorted.

    Symbolic links, FIFOs, sockets and devices are listed with their kind (a sync reports them as
    skipped) and never followed or opened; partial uploads are hidden. ``exclude(path, is_dir)``
    drops entries, and an excluded folder is not entered. ``digest(fd, stat)`` is called for each
    regular file, opened without following links, to add its content digest. Folders are opened
    relative to their parent (at most ``MAX_OPEN_DIRS`` at a time); a folder that cannot be read is
    an ``error`` record and its contents are missing. Call :meth:`close` when done.
    """

    def __init__(
        self,
        jail: JailCore,
        path: str,
        exclude: Callable[[str, bool], bool] | None,
        digest: Callable[[int, os.stat_result], bytes] | None,
    ) -> None:
        self._exclude = exclude
        self._digest = digest
        self._max_depth = jail._max_depth
        super().__init__(jail, path)

    def _walk(self) -> Generator[ScanRecord, None, None]:
        yield _record("", os.fstat(self._root))
        with _translating(self._base):  # the folder itself unreadable: the listing fails
            subdirs = yield from self._folder(self._chain.top(), "")
        yield from _descend(self._chain, subdirs, self._folder, self._failed, self._client_path, self._max_depth)

    @staticmethod
    def _failed(rel: str, error: FerryError) -> ScanRecord:
        return ScanRecord(rel, "error", error=error)

    def _folder(self, dfd: int, rel: str) -> Generator[ScanRecord, None, list[str]]:
        """Yield the entries of folder ``dfd`` (subfolders too, before anything inside them);
        return the names of the subfolders to enter, last first (a stack)."""
        with os.scandir(dfd) as it:
            found = sorted((de.name, de) for de in it)
        subdirs: list[str] = []
        exclude, digest = self._exclude, self._digest
        prefix = f"{rel}/" if rel else ""
        # The loop every listed entry goes through (10,000 for a tree of 10,000 files): the
        # common kinds are built here without a call per entry.
        s_isreg, s_isdir, s_imode = stat.S_ISREG, stat.S_ISDIR, stat.S_IMODE
        for name, de in found:
            if name[:1] == "." and is_partial_name(name):
                continue
            sub = prefix + name
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                yield self._failed(sub, translate_oserror(exc, self._client_path(sub)))
                continue
            mode = st.st_mode
            is_dir = s_isdir(mode)
            if exclude is not None and exclude(sub, is_dir):
                continue
            if s_isreg(mode):
                if digest is not None:
                    yield self._with_digest(dfd, name, sub, digest)
                else:
                    yield ScanRecord(sub, "file", st.st_size, st.st_mtime, s_imode(mode))
            elif is_dir:
                yield ScanRecord(sub, "dir", 0, st.st_mtime, s_imode(mode))
                subdirs.append(name)
            else:
                yield _record(sub, st)
        subdirs.reverse()
        return subdirs

    def _with_digest(
        self, dfd: int, name: str, rel: str, digest: Callable[[int, os.stat_result], bytes]
    ) -> ScanRecord:
        """The record of file ``name`` with its content digest (opened without following links)."""
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=dfd)
        except OSError as exc:
            return self._failed(rel, translate_oserror(exc, self._client_path(rel)))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped since listed
                return _record(rel, st)
            return _record(rel, st, digest(fd, st))
        except FerryError as exc:
            return self._failed(rel, exc)
        except OSError as exc:
            return self._failed(rel, translate_oserror(exc, self._client_path(rel)))
        finally:
            os.close(fd)


def _record(rel: str, st: os.stat_result, digest: bytes = b"") -> ScanRecord:
    kind = _kind(st.st_mode)
    return ScanRecord(rel, kind, 0 if kind == "dir" else st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode), digest)


class Walkers(JailCore):
    """The tree walkers of a jail (see the module docstring)."""

    def list_scan(self, path: str, *, recursive: bool) -> ListScan:
        """Walk folder ``path`` for a listing (see :class:`ListScan`); fails at once if it is
        missing, not a folder, or a symlink."""
        return ListScan(self, path, recursive)

    def scan_tree(self, path: str, *, inline_max: int) -> TreeScan:
        """Walk folder ``path`` for a tree download (see :class:`TreeScan`); fails at once if it is
        missing, not a folder, or a symlink."""
        return TreeScan(self, path, inline_max)

    def tree_dirs(self, path: str, *, create: bool = True, creations: Creations | None = None) -> TreeDirs:
        """Open folder ``path`` for a tree upload (see :class:`TreeDirs`; created like ``mkdir -p``
        unless ``create`` is False, as for reading named files; ``creations`` sees each folder and
        file it makes: see :attr:`TreeDirs.creations`)."""
        return TreeDirs(self, path, create=create, creations=creations)

    def scan_entries(
        self,
        path: str,
        *,
        exclude: Callable[[str, bool], bool] | None = None,
        digest: Callable[[int, os.stat_result], bytes] | None = None,
    ) -> EntryScan:
        """Walk folder ``path`` for a sync listing (see :class:`EntryScan`); fails at once if it is
        missing, not a folder or a symlink."""
        return EntryScan(self, path, exclude, digest)
