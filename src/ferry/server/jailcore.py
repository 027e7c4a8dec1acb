"""The jail's core: a user's home opened once as a directory descriptor, every client path resolved
race-free below it, and the namespace operations done relative to directory descriptors.

Each component is opened relative to its parent's descriptor with ``O_NOFOLLOW``: the kernel never
follows a symbolic link on our behalf, not even one swapped into the path while a transfer runs (the
swap makes the next ``openat`` fail instead of escaping). stat, mkdir, unlink, rmdir, rename,
listing, utime and chmod are done relative to directory descriptors, never through a path string.
A symbolic link anywhere in a client path is refused with code ``symlink``; links are still listed,
inspected, renamed and removed (the link itself, never its target).

:class:`JailCore` is the base the other concerns build on (upload staging, tree walkers, usage:
:mod:`ferry.server.staging`, :mod:`ferry.server.walkers`, :mod:`ferry.server.usage`);
:class:`ferry.server.jail.Jail` joins them.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Final, Literal, Protocol, Self

from ferry.errors import NotFound, RemoteError
from ferry.fskit import (
    DIR_FLAGS,
    READ_FLAGS,
    is_partial_name,
)
from ferry.server.oserrors import _symlink_refused, _translating, translate_oserror
from ferry.server.pathrules import MAX_DEPTH, _show, _too_deep, join_path, parse_path, refuse_reserved
from ferry.wire.codes import ErrorCode

#: Most directory descriptors a recursive walk (remove, usage) keeps open at once. Deeper trees still
#: work: ancestors are closed and reopened by name (with O_NOFOLLOW) on the way back up, so a
#: pathologically deep tree cannot exhaust the server's descriptors.
MAX_OPEN_DIRS: Final = 64

EntryKind = Literal["file", "dir", "link", "other"]


class Creations(Protocol):
    """What a file-count quota needs from the jail: every file or folder it is about to make (not
    partial uploads, not a file that replaces one). Called from the thread doing the work."""

    def take(self, path: str) -> None:
        """An entry is about to be made at ``path``: raise (code ``quota``) to refuse it."""
        ...

    def give_back(self) -> None:
        """The entry :meth:`take` let through was not made after all (it existed, or it failed)."""
        ...


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry as listed by :meth:`Jail.listdir` (never following symbolic links).

    ``kind`` is ``"file"`` (regular file), ``"dir"``, ``"link"`` (a symbolic link; ``size`` is the
    length of its target string) or ``"other"`` (FIFO, socket, device). ``mtime`` is in seconds since
    the epoch, ``mode`` holds the permission bits only (``stat.S_IMODE``); the type is in ``kind``.
    ``target``: what a link says (read with ``readlinkat``, never followed), as ``ls -l`` shows it.
    """

    name: str
    kind: EntryKind
    size: int
    mtime: float
    mode: int
    target: str | None = None

    @classmethod
    def from_stat(cls, name: str, st: os.stat_result) -> Entry:
        """Build an entry from an ``lstat`` result (a link's ``target`` is added by :meth:`with_target`)."""
        return cls(name, _kind(st.st_mode), st.st_size, st.st_mtime, stat.S_IMODE(st.st_mode))

    def with_target(self, target: str | None) -> Entry:
        """This entry with a link's target filled in."""
        return replace(self, target=target)


def link_target(dir_fd: int, name: str) -> str | None:
    """What the symbolic link ``name`` in ``dir_fd`` says (``readlinkat``: the link is read, never
    followed); None if it is gone or no longer a link."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def _kind(mode: int) -> EntryKind:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


# --------------------------------------------------------------------------------------------------
# renameat2(RENAME_NOREPLACE): the only atomic "rename unless the target exists" for directories.

_RENAME_NOREPLACE: Final = 1


def _load_renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / musl without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2: Final = _load_renameat2()


def _rename_noreplace(sfd: int, sname: str, dfd: int, dname: str) -> None:
    """Rename ``sname`` (in ``sfd``) to ``dname`` (in ``dfd``), failing with EEXIST if it exists."""
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(sfd, os.fsencode(sname), dfd, os.fsencode(dname), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        # EINVAL: this filesystem does not support the flag; ENOSYS: kernel too old. Fall back.
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
    # Fallback: check, then rename. Not atomic (a racing creator can be overwritten), but only on
    # filesystems without RENAME_NOREPLACE, and never unsafe: both names stay relative to jail fds.
    try:
        os.stat(dname, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))


def _rename(sfd: int, sname: str, dfd: int, dname: str, *, overwrite: bool) -> None:
    """``renameat``, replacing an existing ``dname`` only with ``overwrite``."""
    if overwrite:
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
    else:
        _rename_noreplace(sfd, sname, dfd, dname)


# --------------------------------------------------------------------------------------------------
# A chain of directory fds for recursive walks


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _changed() -> RemoteError:
    return ErrorCode.CHANGED.error("a folder was moved or replaced while ferry was working in it; try again")


class _DirChain:
    """The directories from a root down to the current one, as fds, for depth-first walks.

    At most ``limit`` descriptors (besides the borrowed root) stay open: when deeper, the ones nearest
    the root are closed. Climbing back into a closed one reopens it as ``..`` of the directory being
    left (one ``openat`` however deep the walk: a walk costs time linear in the folders it visits),
    and the result must be the very directory entered on the way down (same device and inode), else
    the walk fails with code ``changed`` rather than work on a directory it did not mean to. ``..``
    can never lead above the chain's root: the root is borrowed and never left.
    """

    def __init__(self, root_fd: int, limit: int) -> None:
        self._fds: list[int] = [root_fd]  # -1 marks a closed (evicted) ancestor
        self._names: list[str] = [""]
        self._ids: list[tuple[int, int]] = [_ident(os.fstat(root_fd))]
        # Indices of owned open fds, ascending: fds are always opened deeper than every open one.
        self._open: collections.deque[int] = collections.deque()
        self._limit = max(1, limit)

    def __len__(self) -> int:
        return len(self._fds)

    def top(self) -> int:
        """The fd of the current (deepest) directory (always open: eviction spares the deepest)."""
        return self._fds[-1]

    def push(self, name: str) -> None:
        """Enter subdirectory ``name`` of the current directory (raises OSError as ``os.open``)."""
        parent = self.top()
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        try:
            ident = _ident(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        self._fds.append(fd)
        self._names.append(name)
        self._ids.append(ident)
        self._open.append(len(self._fds) - 1)
        self._evict()

    def pop(self) -> str:
        """Leave the current directory (closing its fd); returns its name in its parent."""
        if len(self._fds) == 1:
            raise IndexError("cannot pop the root of a _DirChain")
        fd = self._fds[-1]
        parent = -1
        if self._fds[-2] < 0:
            # The parent was evicted: reopen it through the directory we are leaving (still open).
            parent = os.open("..", DIR_FLAGS, dir_fd=fd)
            try:
                if _ident(os.fstat(parent)) != self._ids[-2]:
                    raise _changed()
            except BaseException:
                os.close(parent)
                raise
        self._fds.pop()
        self._ids.pop()
        self._open.pop()  # the deepest open fd is the one we are leaving
        os.close(fd)
        if parent >= 0:  # evictions close the shallowest first: no other owned fd is open now
            self._fds[-1] = parent
            self._open.append(len(self._fds) - 1)
        return self._names.pop()

    def close(self) -> None:
        """Close every owned fd (the root is borrowed and left open)."""
        while self._open:
            i = self._open.pop()
            os.close(self._fds[i])
            self._fds[i] = -1

    def _evict(self) -> None:
        while len(self._open) > self._limit:
            i = self._open.popleft()
            os.close(self._fds[i])
            self._fds[i] = -1




def _make_dir(dir_fd: int, name: str, mode: int, path: str, creations: Creations | None) -> bool:
    """Make folder ``name`` in ``dir_fd`` (``creations`` sees it first); False if an entry of that
    name exists already. Raises OSError."""
    if creations is not None:
        creations.take(path)
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except BaseException as exc:
        if creations is not None:
            creations.give_back()
        if isinstance(exc, FileExistsError):
            return False
        raise
    return True


def _has_entries(fd: int) -> bool:
    """True if directory ``fd`` holds anything but partial uploads. Raises OSError."""
    with os.scandir(fd) as it:
        return any(not is_partial_name(de.name) for de in it)


def _kind_at(dir_fd: int, name: str) -> EntryKind | None:
    """The kind of entry ``name`` in ``dir_fd`` (not following links); None if it is gone."""
    try:
        return _kind(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return None


def _require_regular(st: os.stat_result, path: str) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_refused(path)
    if stat.S_ISDIR(st.st_mode):
        raise ErrorCode.IS_A_DIRECTORY.error(f"{_show(path)} is a folder, not a file")
    raise ErrorCode.NOT_A_FILE.error(
        f"{_show(path)} is not a regular file (a device, FIFO or socket); ferry only reads files",
    )


def _only_partials(pfd: int, name: str) -> bool:
    """True if folder ``name`` in ``pfd`` holds only partial uploads (for a clearer message)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=pfd)
    except OSError:
        return False
    try:
        with os.scandir(fd) as it:
            return all(is_partial_name(de.name) for de in it)
    except OSError:
        return False
    finally:
        os.close(fd)


def _clear_files(fd: int) -> Generator[int, None, list[str]]:
    """Unlink every non-directory entry of directory ``fd`` (yielding after each: 1, or 0 for a
    partial upload, which is no entry of the file count); return the names of its subdirectories."""
    with os.scandir(fd) as it:
        entries = [(de.name, de.is_dir(follow_symlinks=False)) for de in it]  # list first, then unlink
    subdirs: list[str] = []
    for name, is_dir in entries:
        if is_dir:
            subdirs.append(name)
            continue
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # replaced by a folder since listed
            subdirs.append(name)
            continue
        yield 0 if is_partial_name(name) else 1
    return subdirs


def _rmtree_at(pfd: int, name: str, max_open_dirs: int) -> Generator[int, None, None]:
    """Remove directory ``name`` in ``pfd`` and everything under it, yielding after each entry
    (as :func:`_clear_files`; raises OSError)."""
    chain = _DirChain(pfd, max_open_dirs)
    try:
        try:
            chain.push(name)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # no longer a folder: remove the entry
                os.unlink(name, dir_fd=pfd)
                yield 1
                return
            raise
        pending = [(yield from _clear_files(chain.top()))]
        while pending:
            if pending[-1]:
                sub = pending[-1].pop()
                try:
                    chain.push(sub)
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        continue
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        # Swapped for a symlink or file since listed: unlink that entry itself.
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(sub, dir_fd=chain.top())
                            yield 1
                        continue
                    raise
                pending.append((yield from _clear_files(chain.top())))
            else:
                pending.pop()
                done = chain.pop()
                os.rmdir(done, dir_fd=chain.top())
                yield 1
    finally:
        chain.close()


def _entries_at(fd: int, include_partial: bool = False) -> Generator[Entry, None, None]:
    """The entries of directory ``fd`` in directory order, each ``lstat`` relative to ``fd``
    (``fstatat(AT_SYMLINK_NOFOLLOW)``); partial uploads skipped unless ``include_partial``, entries
    removed meanwhile skipped. Raises OSError."""
    with os.scandir(fd) as it:
        for de in it:
            if not include_partial and is_partial_name(de.name):
                continue
            try:
                st = de.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            entry = Entry.from_stat(de.name, st)
            yield entry.with_target(link_target(fd, de.name)) if entry.kind == "link" else entry


#: Why :meth:`Jail.folder_walk` may skip a folder: gone, swapped for a non-folder, unreadable.
_SKIPPED: Final = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM})


def _split_at(fd: int) -> tuple[list[str], list[str]]:
    """The entries of directory ``fd``: (names of folders, last first; names of the others), by the
    type the directory reports (no stat per entry). Raises OSError."""
    subdirs: list[str] = []
    others: list[str] = []
    with os.scandir(fd) as it:
        for de in it:
            (subdirs if de.is_dir(follow_symlinks=False) else others).append(de.name)
    subdirs.reverse()
    return subdirs, others


class JailCore:
    """The home descriptor and the namespace operations of one user's jail (see the module docstring)."""

    def __init__(
        self, home: str | os.PathLike[str], *, max_open_dirs: int = MAX_OPEN_DIRS, max_depth: int = MAX_DEPTH
    ) -> None:
        """Open ``home``; raises :class:`~ferry.errors.NotFound` (code ``no-home``) if missing."""
        self._home_path = os.fspath(home)
        self._max_open_dirs = max_open_dirs
        self._max_depth = max(1, max_depth)
        try:
            self._fd = os.open(self._home_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise ErrorCode.NO_HOME.error(f"home folder {self._home_path!r} does not exist") from exc
        except OSError as exc:
            raise translate_oserror(exc, "") from exc

    # -- lifecycle -----------------------------------------------------------------------------------

    @property
    def home(self) -> str:
        """The home folder's path on the server (for logs; never used to reach files)."""
        return self._home_path

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._fd < 0

    def close(self) -> None:
        """Close the home descriptor. Idempotent. No operation may be running in another thread."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        """Use the jail as a context manager; it is closed on exit."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the jail."""
        self.close()

    def __repr__(self) -> str:
        """Show the home path and whether the jail is open."""
        return f"<Jail {self._home_path!r}{' closed' if self.closed else ''}>"

    # -- walking -------------------------------------------------------------------------------------

    def _home_fd(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed Jail")
        return self._fd

    def _open_dir_at(
        self,
        dir_fd: int,
        name: str,
        prefix: str,
        create_mode: int | None = None,
        _retries: int = 3,
        creations: Creations | None = None,
    ) -> int:
        """Open directory ``name`` in ``dir_fd`` without following links (translating errors).

        ``prefix`` is the client path up to and including ``name``, for messages. With
        ``create_mode``, a missing directory is created first (``mkdir -p``; ``creations`` sees
        it first); if something else creates it at the same moment, the open that follows decides.
        """
        try:
            return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError as exc:
            if create_mode is None:
                raise translate_oserror(exc, prefix) from exc
            refuse_reserved(name, prefix)
            with _translating(prefix):
                _make_dir(dir_fd, name, create_mode, prefix, creations)
            return self._open_dir_at(dir_fd, name, prefix)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise translate_oserror(exc, prefix) from exc
            # O_NOFOLLOW|O_DIRECTORY on a symlink gives ENOTDIR on Linux (ELOOP elsewhere): look
            # at the entry (without following it) to tell the user which of the two it is. If it is
            # a folder again (or gone) by now, it was swapped meanwhile: try again (bounded).
            kind = _kind_at(dir_fd, name)
            if kind in ("dir", None) and _retries > 0:
                return self._open_dir_at(dir_fd, name, prefix, create_mode, _retries - 1, creations)
            if kind == "link":
                raise _symlink_refused(prefix) from exc
            raise ErrorCode.NOT_A_DIRECTORY.error(f"{_show(prefix)} is not a folder") from exc

    def _walk(
        self, parts: Sequence[str], create_mode: int | None = None, creations: Creations | None = None
    ) -> int:
        """Open the directory at ``parts`` (relative to home) component by component; caller closes."""
        fd = os.dup(self._home_fd())  # a dup keeps ownership simple: the caller always closes
        try:
            for i, name in enumerate(parts):
                nfd = self._open_dir_at(fd, name, join_path(parts[: i + 1]), create_mode, creations=creations)
                # Swap before closing so an exception can never close the same fd twice.
                fd, old = nfd, fd
                os.close(old)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def _parent(
        self, parts: Sequence[str], create_mode: int | None = None, creations: Creations | None = None
    ) -> Iterator[tuple[int, str]]:
        """Yield ``(fd of the parent directory, final name)`` for a non-empty path; closes the fd."""
        fd = self._walk(parts[:-1], create_mode, creations)
        try:
            yield fd, parts[-1]
        finally:
            os.close(fd)

    @staticmethod
    def _needs_name(path: str, refusal: str) -> tuple[str, ...]:
        """Parse ``path``, refusing the home itself with ``refusal`` (code ``bad-path``)."""
        parts = parse_path(path)
        if not parts:
            raise ErrorCode.BAD_PATH.error(refusal)
        return parts

    # -- inspection ----------------------------------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        """Status of ``path`` itself (a final symlink is described, not followed)."""
        parts = parse_path(path)
        with _translating(path):
            if not parts:
                return os.fstat(self._home_fd())
            with self._parent(parts) as (pfd, name):
                return os.stat(name, dir_fd=pfd, follow_symlinks=False)

    def readlink(self, path: str) -> str | None:
        """What the symbolic link ``path`` says (read relative to its folder's descriptor, never
        followed); None if ``path`` is not a link."""
        parts = self._needs_name(path, "your home folder is not a link")
        with _translating(path), self._parent(parts) as (pfd, name):
            return link_target(pfd, name)

    def exists(self, path: str) -> bool:
        """True if ``path`` exists (a final symlink counts, dangling or not); False if missing."""
        try:
            self.lstat(path)
        except NotFound:
            return False
        return True

    def iter_dir(self, path: str = "", *, include_partial: bool = False) -> Generator[Entry, None, None]:
        """Yield the entries of directory ``path`` in directory order, without loading them all.

        Partial uploads are skipped unless ``include_partial``. Entries removed while listing are
        skipped. The directory fd is closed when the iterator is exhausted or closed; iterate it fully
        or call ``.close()`` on it (CPython also closes it as soon as it is garbage). Being a
        generator, it reports errors (missing folder, symlink, ...) on the first ``next()``, not when
        called; use :meth:`listdir` or :meth:`open_dir` to fail early.
        """
        fd = self.open_dir(path)
        try:
            with _translating(path):
                yield from _entries_at(fd, include_partial)
        finally:
            os.close(fd)

    def listdir(self, path: str = "", *, include_partial: bool = False) -> list[Entry]:
        """The entries of directory ``path``, sorted by name (see :meth:`iter_dir`)."""
        return sorted(self.iter_dir(path, include_partial=include_partial), key=lambda e: e.name)

    # -- opening -------------------------------------------------------------------------------------

    def open_dir(self, path: str = "") -> int:
        """Open directory ``path`` and return its fd (O_RDONLY, usable with ``os.scandir``)."""
        parts = parse_path(path)
        with _translating(path):
            return self._walk(parts)

    def open_read(self, path: str) -> int:
        """Open regular file ``path`` for reading and return a blocking fd.

        Folders, symlinks, FIFOs, sockets and devices are refused (``is-a-directory``, ``symlink``,
        ``not-a-file``). The type is checked before opening (a device is never even opened) and again
        on the open fd (in case the entry was swapped in between); the open itself is non-blocking so a
        FIFO swapped in at the last moment cannot hang the server.
        """
        parts = parse_path(path)
        if not parts:
            raise ErrorCode.IS_A_DIRECTORY.error("your home folder is a folder, not a file")
        with _translating(path), self._parent(parts) as (pfd, name):
            _require_regular(os.stat(name, dir_fd=pfd, follow_symlinks=False), path)
            fd = os.open(name, READ_FLAGS, dir_fd=pfd)
            try:
                _require_regular(os.fstat(fd), path)
                os.set_blocking(fd, True)
            except BaseException:
                os.close(fd)
                raise
            return fd

    # -- changing ------------------------------------------------------------------------------------

    def mkdir(
        self,
        path: str,
        *,
        parents: bool = False,
        exist_ok: bool = False,
        mode: int = 0o777,
        creations: Creations | None = None,
    ) -> None:
        """Create folder ``path`` (permissions ``mode & 0o777``, minus the process umask).

        With ``parents``, missing intermediate folders are created too (``mkdir -p``). With
        ``exist_ok``, an existing *folder* is fine (an existing file still raises ``exists``; an
        existing symlink raises ``symlink``). The home itself always exists. ``creations`` sees
        each folder before it is made.
        """
        parts = parse_path(path)
        mode &= 0o777
        if not parts:
            if exist_ok:
                return
            raise ErrorCode.EXISTS.error("your home folder already exists")
        refuse_reserved(parts[-1], path)  # the parents are checked as they are created
        if len(parts) > self._max_depth:
            raise _too_deep(path, self._max_depth, "below your home; ferry creates no deeper folder")
        with _translating(path), self._parent(parts, mode if parents else None, creations) as (pfd, name):
            if not _make_dir(pfd, name, mode, path, creations):
                exc = FileExistsError(errno.EEXIST, "exists")
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise _symlink_refused(path) from exc
                if not stat.S_ISDIR(st.st_mode):
                    raise ErrorCode.EXISTS.error(
                        f"{_show(path)} already exists and is not a folder"
                    ) from exc
                if not exist_ok:
                    raise ErrorCode.EXISTS.error(f"{_show(path)} already exists") from exc

    def remove(self, path: str, *, recursive: bool = False) -> int:
        """Remove file, symlink or folder ``path``.

        A symlink is removed itself, never its target. A folder must be empty unless ``recursive``;
        recursive removal walks with descriptors and O_NOFOLLOW, so a symlink inside the tree (even
        one swapped in during the removal) is unlinked and never descended into. The home itself
        cannot be removed. Returns how many entries went (see :meth:`remove_walk`).
        """
        last = collections.deque(self.remove_walk(path, recursive=recursive), maxlen=1)
        return last[0] if last else 0

    def remove_walk(self, path: str, *, recursive: bool = True) -> Generator[int, None, None]:
        """:meth:`remove` one entry at a time: yields after each entry of a recursive removal, so a
        caller can spread it over several thread jobs and stop between entries (what was removed
        stays removed, as with ``rm -r``). Close it when abandoned (it holds descriptors). Yields
        how many entries it removed so far (files, folders, links: partial uploads not counted, as
        in :meth:`usage`), so the last value is how many went."""
        parts = self._needs_name(path, "your home folder itself cannot be removed")
        with _translating(path), self._parent(parts) as (pfd, name):
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=pfd)
                yield 0 if is_partial_name(name) else 1
            elif recursive:
                removed = 0
                for counted in _rmtree_at(pfd, name, self._max_open_dirs):
                    removed += counted
                    yield removed
            else:
                try:
                    os.rmdir(name, dir_fd=pfd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        # Listings hide partial uploads, so say why a folder that looks empty is not.
                        hidden = " (it holds unfinished uploads)" if _only_partials(pfd, name) else ""
                        raise ErrorCode.NOT_EMPTY.error(
                            f"{_show(path)} is a folder that is not empty{hidden}; remove it recursively "
                            "to delete it and everything in it",
                        ) from exc
                    raise
                yield 1

    def rename(self, src: str, dst: str, *, overwrite: bool = True) -> None:
        """Rename (move) ``src`` to ``dst`` inside the home, atomically.

        With ``overwrite`` an existing destination is replaced as ``rename(2)`` does (a file replaces
        a file or symlink, a folder replaces an empty folder); without it an existing destination
        fails with ``exists`` (atomically via ``renameat2(RENAME_NOREPLACE)`` where supported).
        A symlink as ``src`` is moved itself. The parent of ``dst`` must exist. Partial uploads are
        the server's: neither name may be one (``reserved-name``).
        """
        sparts = self._needs_name(src, "your home folder itself cannot be renamed")
        dparts = self._needs_name(dst, "your home folder itself cannot be replaced")
        refuse_reserved(sparts[-1], src)
        refuse_reserved(dparts[-1], dst)
        with (
            _translating(src, dst),
            self._parent(sparts) as (sfd, sname),
            self._parent(dparts) as (dfd, dname),
        ):
            _rename(sfd, sname, dfd, dname, overwrite=overwrite)

    def utime(self, path: str, mtime_ns: int, atime_ns: int | None = None) -> None:
        """Set the modification time of ``path`` (nanoseconds); the access time is kept unless given.

        A final symlink gets its own times set (it is not followed).
        """
        parts = self._needs_name(path, "the times of your home folder cannot be changed")
        with _translating(path), self._parent(parts) as (pfd, name):
            if atime_ns is None:
                atime_ns = os.stat(name, dir_fd=pfd, follow_symlinks=False).st_atime_ns
            os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits of file or folder ``path`` to ``mode & 0o777``.

        setuid, setgid and sticky bits are dropped on purpose: a server running as a privileged user
        must not let clients create set-id programs. Symlinks are refused (they have no own mode).
        """
        parts = self._needs_name(path, "the permissions of your home folder cannot be changed")
        mode &= 0o777
        with _translating(path), self._parent(parts) as (pfd, name):
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _symlink_refused(path)
            try:
                # glibc >= 2.32 implements AT_SYMLINK_NOFOLLOW race-free (O_PATH + /proc/self/fd).
                os.chmod(name, mode, dir_fd=pfd, follow_symlinks=False)
                return
            except (NotImplementedError, ValueError):
                pass  # older libc, or the entry became a symlink: the path below decides
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise ErrorCode.NOT_A_FILE.error(f"{_show(path)} is not a regular file or folder")
            fd = os.open(name, READ_FLAGS, dir_fd=pfd)
            try:
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
