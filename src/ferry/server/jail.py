"""The jail: the one module through which the server touches a user's files.

Every client path is a POSIX string relative to the user's home. It is checked lexically first
(:func:`parse_path`: no absolute paths, no ``..``, no NUL, no empty or ``.`` components) and then
resolved *race-free*: the home is opened once as a directory file descriptor, and each component is
opened relative to its parent's descriptor with ``O_NOFOLLOW``. The kernel therefore never follows a
symbolic link on our behalf, not even one swapped into the path while a transfer runs: the swap makes
the next ``openat`` fail instead of escaping. All operations (stat, mkdir, unlink, rmdir, rename,
listing, utime, chmod) are then done relative to directory descriptors, never through a path string.

Policy (see docs/security.md): a symbolic link anywhere in a client path is refused with code
``symlink``, even one that points inside the home. Links are still listed (kind ``"link"``), can be
inspected with :meth:`Jail.lstat`, renamed, and removed (the link itself, never its target).

Partial uploads (``.NAME.ferry-part-TOKEN``) are the server's own namespace: no client operation may
create such a name or rename anything onto or off it (code ``reserved-name``). A partial is resumed
only if it is genuine: a regular file with one link that carries the :data:`PARTIAL_XATTR` mark the
server set when it created it (see :meth:`Jail.open_partial`); anything else under that name is
never read, written or truncated, only replaced by a fresh partial. :meth:`Jail.commit` moves the
inode whose descriptor the upload wrote, not whatever carries the partial's name by then.

Linux is the target platform (``O_DIRECTORY``, ``O_NOFOLLOW``, ``renameat2``); the module needs
nothing beyond the standard library. A :class:`Jail` holds only its home descriptor, so one instance
may be used from several threads at once; :meth:`Jail.close` must only be called when none is using it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import itertools
import os
import secrets
import stat
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Final, Generic, Literal, Protocol, TypeVar

import msgspec

from ferry.errors import FerryError, NotFound, RemoteError
from ferry.fskit import (
    DIR_FLAGS,
    MAX_NAME_BYTES,
    NEW_PARTIAL_FLAGS,
    PARTIAL_MARK,
    READ_FLAGS,
    TEMP_FLAGS,
    DirCache,
    is_partial_name,
    partial_name,
    store_atomically,
)
from ferry.textsafe import safe_name
from ferry.wire.codes import ErrorCode

__all__ = [
    "MAX_DEPTH",
    "MAX_PATH_BYTES",
    "PARTIAL_XATTR",
    "Creations",
    "Entry",
    "EntryKind",
    "EntryScan",
    "HomeUsage",
    "Jail",
    "ListScan",
    "ScanRecord",
    "TreeDir",
    "TreeDirs",
    "TreeFailure",
    "TreeFile",
    "TreeScan",
    "join_path",
    "parse_path",
    "refuse_reserved",
    "translate_oserror",
]

#: Longest client path accepted, in bytes of UTF-8 (Linux's PATH_MAX). Bounds the work per request.
MAX_PATH_BYTES: Final = 4096

#: Extended attribute set on every partial file the server creates; its value is the partial's own
#: name. Survives a restart (it lives with the inode), so resume after a restart still works; a
#: file that lacks it (made by anyone else, or renamed from another partial's name) is not resumed.
PARTIAL_XATTR: Final = "user.ferry.partial"

#: Deepest folder the jail creates (``mkdir``, tree uploads), counted in folders below the home, and
#: deepest a listing or tree download descends below the folder it starts from (code ``too-deep``).
#: 2,048 is the deepest folder one client path can name (4,096 bytes of ``d/d/...``), so the limit
#: refuses nothing a single request could make; it stops walks where a tree moved into another
#: goes further (walks cost linear time whatever the depth, but names grow with it). ``rm -r`` and
#: the usage count have no depth limit: they must reach whatever exists.
MAX_DEPTH: Final = 2048
#: Most directory descriptors a recursive walk (remove, usage) keeps open at once. Deeper trees still
#: work: ancestors are closed and reopened by name (with O_NOFOLLOW) on the way back up, so a
#: pathologically deep tree cannot exhaust the server's descriptors.
MAX_OPEN_DIRS: Final = 64

EntryKind = Literal["file", "dir", "link", "other"]
_R = TypeVar("_R")


class Creations(Protocol):
    """What a file-count quota needs from the jail: every file or folder it is about to make (not
    partial uploads, not a file that replaces one). Called from the thread doing the work."""

    def take(self, path: str) -> None:
        """An entry is about to be made at ``path``: raise (code ``quota``) to refuse it."""
        ...

    def give_back(self) -> None:
        """The entry :meth:`take` let through was not made after all (it existed, or it failed)."""
        ...


@dataclass
class HomeUsage:
    """What a home holds, as :meth:`Jail.usage` counts it."""

    bytes: int = 0  #: apparent size of the complete regular files (a hard-linked file once)
    #: entries of every kind but partial uploads (files, folders, links...), the home not included
    entries: int = 0
    #: partial uploads (regular files the server marked as the partial of an upload):
    #: home-relative path -> size
    partials: dict[str, int] = field(default_factory=dict)


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
# Lexical checks


def _show(path: str) -> str:
    """How a client path appears in an error message: quoted and terminal-safe; a path longer than
    a request can hold (found deep in a walk) is shortened in the middle, so that the message stays
    within what the wire carries."""
    if path in ("", "."):
        return "your home folder"
    if len(path) > 1024:
        path = f"{path[:500]}...{path[-500:]}"
    return f"'{safe_name(path)}'"


def _too_deep(path: str, levels: int, where: str) -> RemoteError:
    return ErrorCode.TOO_DEEP.error(f"{_show(path)}: goes deeper than {levels} folder levels {where}")


def parse_path(path: str) -> tuple[str, ...]:
    """Check a client path and split it into its components; ``""`` and ``"."`` give ``()`` (home).

    Raises :class:`~ferry.errors.PathRefused` with code ``outside-home`` for absolute paths and any
    ``..`` component, and ``bad-path`` for NUL characters, empty components (``a//b``, a trailing
    ``/``), ``.`` components (``./a``) and over-long paths or names. The path must be in canonical form
    (clients normalise before sending): one spelling per path lets the server compare paths as strings.
    """
    if not isinstance(path, str):
        raise ErrorCode.BAD_PATH.error(f"a path must be text, not {type(path).__name__}")
    if "\x00" in path:
        raise ErrorCode.BAD_PATH.error(f"{_show(path)}: paths may not contain NUL characters")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError as exc:
        raise ErrorCode.BAD_PATH.error(f"{_show(path)}: the path is not valid text") from exc
    if size > MAX_PATH_BYTES:
        raise ErrorCode.BAD_PATH.error(f"path too long ({size} bytes; at most {MAX_PATH_BYTES})")
    if path in ("", "."):
        return ()
    if path.startswith("/"):
        raise ErrorCode.OUTSIDE_HOME.error(
            f"{_show(path)}: absolute paths are not allowed; paths are relative to your home folder "
            "(drop the leading '/')",
        )
    parts = tuple(path.split("/"))
    # '..' is checked over all parts first so 'a//../x' reports the more important problem.
    if ".." in parts:
        raise ErrorCode.OUTSIDE_HOME.error(
            f"{_show(path)}: paths may not contain '..'; paths are relative to your home folder",
        )
    for part in parts:
        if part == "":
            raise ErrorCode.BAD_PATH.error(
                f"{_show(path)}: empty path component (a doubled, leading or trailing '/')"
            )
        if part == ".":
            raise ErrorCode.BAD_PATH.error(f"{_show(path)}: '.' components are not allowed; drop the './'")
        if len(os.fsencode(part)) > MAX_NAME_BYTES:
            raise ErrorCode.BAD_PATH.error(f"{_show(part)}: name too long (at most {MAX_NAME_BYTES} bytes)")
    return parts


def join_path(parts: Sequence[str]) -> str:
    """Inverse of :func:`parse_path`: ``("a", "b")`` -> ``"a/b"``; ``()`` -> ``""`` (home)."""
    return "/".join(parts)


def _resume_name(name: str, token: str) -> str:
    """The partial name of an upload to ``name`` with the client's resume ``token`` (see
    :func:`ferry.fskit.partial_name`; listings hide such names); a token outside the safe alphabet
    is refused (``bad-path``) here too, whoever called."""
    try:
        return partial_name(name, token)
    except ValueError:
        raise ErrorCode.BAD_PATH.error("invalid resume token (use 1-64 letters, digits, '-' or '_')") from None


def refuse_reserved(name: str, path: str) -> None:
    """Raise :class:`~ferry.errors.PathRefused` (code ``reserved-name``) if ``name``, a component
    that a client operation would create or move, lies in the partial-upload namespace.

    Partial names belong to the server: a client that could rename a file onto one (or create one)
    could make an upload resume onto, and commit, a file the server never created.
    """
    if is_partial_name(name):
        raise ErrorCode.RESERVED_NAME.error(
            f"{_show(path)}: names of the form '.NAME{PARTIAL_MARK}TOKEN' are reserved for ferry's "
            "unfinished uploads; choose another name",
        )


def _refuse_reserved_parts(parts: Sequence[str], path: str) -> None:
    for part in parts:
        refuse_reserved(part, path)


def _mark_partial(fd: int, pname: str) -> None:
    """Mark a partial the server just created (best effort: without the mark, e.g. on a filesystem
    without user extended attributes, the upload still works but cannot be resumed)."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, PARTIAL_XATTR, os.fsencode(pname))


def _is_genuine_partial(fd: int, st: os.stat_result, pname: str) -> bool:
    """True if open file ``fd`` (status ``st``) is a partial the server created under ``pname``: a
    regular file with exactly one link, carrying the mark :func:`_mark_partial` set."""
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    try:
        return os.getxattr(fd, PARTIAL_XATTR) == os.fsencode(pname)
    except OSError:  # no mark (ENODATA), or no extended attributes here at all
        return False


def _marked_partial_at(dir_fd: int, name: str, st: os.stat_result) -> bool:
    """True if entry ``name`` of folder ``dir_fd`` (status ``st``, not followed) is a regular file
    with one link that carries the partial mark for its own name (see :func:`_is_genuine_partial`)."""
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        return False
    try:
        # Through the folder's descriptor (os.getxattr has no dir_fd); the name itself not followed.
        mark = os.getxattr(f"/proc/self/fd/{dir_fd}/{name}", PARTIAL_XATTR, follow_symlinks=False)
    except OSError:
        return False
    return mark == os.fsencode(name)


def _reopen_rw(ro: int, st: os.stat_result) -> int:
    """Open the inode of read-only descriptor ``ro`` again, read-write, without a name lookup
    (``/proc/self/fd``): the inode that was checked is the one opened for writing."""
    fd = os.open(f"/proc/self/fd/{ro}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    if _ident(os.fstat(fd)) != _ident(st):  # cannot happen through /proc; never write if it did
        os.close(fd)
        raise ErrorCode.CHANGED.error("a partial file changed while it was opened; try again")
    return fd


# --------------------------------------------------------------------------------------------------
# OSError -> FerryError


def _symlink_refused(path: str) -> RemoteError:
    return ErrorCode.SYMLINK.error(
        f"{_show(path)} is a symbolic link; ferry does not follow symbolic links on the server "
        "(use the real path of the file or folder instead)",
    )


# errnos whose subject is the destination of a two-path operation (rename, commit).
_DST_ERRNOS: Final = frozenset({errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENOTEMPTY})


def translate_oserror(exc: OSError, path: str, dst: str | None = None) -> RemoteError:
    """Map an ``OSError`` raised while working on client path ``path`` to the server's error for it.

    The one translation of the server: the jail, the transfer handlers and the session (for an
    ``OSError`` a handler let through) all use it. ``dst`` is the destination of a rename; errors
    about the destination (exists, is a folder, ...) then name it instead of ``path``. Codes:
    ``not-found``, ``permission``, ``read-only``, ``disk-full``, ``quota``, ``exists``,
    ``not-a-directory``, ``is-a-directory``, ``not-empty``, ``symlink``, ``bad-path``,
    ``cross-device``, ``invalid``, ``busy``, and ``io`` for anything else.
    """
    code = exc.errno
    where = _show(dst if dst is not None and code in _DST_ERRNOS else path)
    if code == errno.ENOENT:
        return ErrorCode.NOT_FOUND.error(f"{where}: no such file or folder")
    if code in (errno.EACCES, errno.EPERM):
        return ErrorCode.PERMISSION.error(f"{where}: permission denied on the server")
    if code == errno.EROFS:
        return ErrorCode.READ_ONLY.error(f"{where}: the server's storage is read-only")
    if code == errno.ENOSPC:
        return ErrorCode.DISK_FULL.error(f"{where}: the server's disk is full")
    if code == errno.EDQUOT:
        return ErrorCode.QUOTA.error(f"{where}: disk quota exceeded on the server")
    if code == errno.EEXIST:
        return ErrorCode.EXISTS.error(f"{where} already exists")
    if code == errno.ENOTDIR:
        return ErrorCode.NOT_A_DIRECTORY.error(f"{where}: not a folder (or a part of the path is not)")
    if code == errno.EISDIR:
        return ErrorCode.IS_A_DIRECTORY.error(f"{where} is a folder")
    if code == errno.ENOTEMPTY:
        return ErrorCode.NOT_EMPTY.error(f"{where} is a folder that is not empty")
    if code == errno.ELOOP:
        # Every final open/stat here uses O_NOFOLLOW / AT_SYMLINK_NOFOLLOW: ELOOP means a symlink.
        return _symlink_refused(path)
    if code == errno.ENAMETOOLONG:
        return ErrorCode.BAD_PATH.error(f"{where}: name too long")
    if code == errno.EXDEV:
        return ErrorCode.CROSS_DEVICE.error(f"{where}: cannot move across filesystems on the server")
    if code == errno.EINVAL:
        return ErrorCode.INVALID.error(f"{where}: invalid operation (e.g. moving a folder into itself)")
    if code in (errno.EMFILE, errno.ENFILE, errno.EBUSY, errno.EAGAIN, errno.ETXTBSY):
        return ErrorCode.BUSY.error(f"{where}: the server is busy ({exc.strerror}); try again later")
    return ErrorCode.IO.error(f"{where}: {exc.strerror or 'I/O error'} on the server")


@contextlib.contextmanager
def _translating(path: str, dst: str | None = None) -> Iterator[None]:
    """Translate any ``OSError`` escaping the block (FerryErrors pass through untouched)."""
    try:
        yield
    except OSError as exc:
        raise translate_oserror(exc, path, dst) from exc


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


# --------------------------------------------------------------------------------------------------
# The jail

_UPLOAD_NEEDS_NAME: Final = "an upload needs a file name inside your home folder, not the home folder itself"


class Jail:
    """All file operations of one user, confined to their home folder.

    ``Jail(home)`` opens ``home`` (which must exist; the caller creates it) as a directory descriptor;
    the home path itself is trusted configuration and may be a symlink. Every method takes client paths
    as described in :func:`parse_path` and raises :class:`~ferry.errors.FerryError` subclasses only
    (``PathRefused``, ``NotFound``, ``PermissionDenied``, ``DiskFull``, ...), never a raw ``OSError``.
    Descriptors returned to the caller are close-on-exec and must be closed by the caller.

    Limit: a local process (not a ferry client) that moves a directory *out* of the home while an
    operation holds its descriptor would take that operation with it; local users with write access
    to the home are trusted. No client operation can do that: every rename stays inside the home.
    """

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

    def __enter__(self) -> Jail:
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

    def usage(self) -> HomeUsage:
        """What the home holds: bytes and entries of complete files, and its partial uploads.

        Bytes are the apparent size (``st_size``) of regular files, not allocated blocks: it is what
        a user can predict from what they uploaded (sparse files, compression and block rounding do
        not change it). A file with several hard links inside the home counts its bytes once.
        The partials of uploads are counted apart (:attr:`HomeUsage.partials`): they occupy the
        disk and the quota like files, but are not entries the user sees; other files with a
        partial name (a small file's temporary) are not counted. Symbolic links are never followed.
        Cost is one ``lstat`` per entry; callers should cache the result.
        """
        last = collections.deque(self.usage_walk(), maxlen=1)  # the final tally
        return last[0] if last else HomeUsage()

    def usage_walk(self) -> Generator[HomeUsage, None, None]:
        """:meth:`usage` one entry at a time: yields the running tally after each entry (one
        object, updated in place; the last value is the usage; nothing for an empty home). Lets a
        caller spread the count over several thread jobs and stop between entries; close it when
        abandoned (it holds descriptors)."""
        tally = HomeUsage()
        seen: set[tuple[int, int]] = set()

        def scan(fd: int, rel: str) -> Generator[HomeUsage, None, list[str]]:
            subdirs: list[str] = []
            with os.scandir(fd) as it:
                for de in it:
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if is_partial_name(de.name):
                        # Only the partials of uploads (marked when the server created them): a
                        # small file's temporary, there for microseconds (or left by a crash until
                        # the sweep), would stay counted as an idle partial that nobody ever frees.
                        if _marked_partial_at(fd, de.name, st):
                            tally.partials[f"{rel}/{de.name}" if rel else de.name] = st.st_size
                    else:
                        tally.entries += 1
                        if stat.S_ISDIR(st.st_mode):
                            subdirs.append(de.name)
                        elif stat.S_ISREG(st.st_mode) and (st.st_nlink == 1 or _ident(st) not in seen):
                            if st.st_nlink > 1:
                                seen.add(_ident(st))
                            tally.bytes += st.st_size
                    yield tally
            return subdirs

        with _translating(""):
            chain = _DirChain(self._home_fd(), self._max_open_dirs)
            try:
                pending = [("", (yield from scan(chain.top(), "")))]
                while pending:
                    rel, todo = pending[-1]
                    if not todo:
                        pending.pop()
                        if len(chain) > 1:
                            chain.pop()
                        continue
                    name = todo.pop()
                    try:
                        chain.push(name)
                    except OSError as exc:
                        # Vanished, or swapped for a non-directory/symlink since listed: skip it.
                        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            continue
                        raise
                    sub = f"{rel}/{name}" if rel else name
                    pending.append((sub, (yield from scan(chain.top(), sub))))
            finally:
                chain.close()

    def folder_walk(self) -> Generator[tuple[str, int, list[str]], None, None]:
        """Every folder of the home, depth-first: ``(home-relative path, its descriptor, the names of
        its entries that are not folders)``. The descriptor is valid until the next step only.

        Iterative over the same descriptor chain as :meth:`usage` (at most ``MAX_OPEN_DIRS`` open,
        linear in the entries, no depth limit: ``os.fwalk`` recurses, and a tree ~1,000 levels deep
        made it fail with RecursionError). Symbolic links are never followed. A folder that cannot
        be read (permission) or that vanished or was swapped for a link since its parent was read is
        skipped. Close the generator when abandoned (it holds descriptors)."""
        with _translating(""):
            chain = _DirChain(self._home_fd(), self._max_open_dirs)
            try:
                subdirs, others = _split_at(chain.top())
                yield "", chain.top(), others
                stack = [("", subdirs)]
                while stack:
                    rel, todo = stack[-1]
                    if not todo:
                        stack.pop()
                        if len(chain) > 1:
                            chain.pop()
                        continue
                    name = todo.pop()
                    try:
                        chain.push(name)
                    except OSError as exc:
                        if exc.errno in _SKIPPED:
                            continue
                        raise
                    try:
                        subdirs, others = _split_at(chain.top())
                    except OSError as exc:
                        if exc.errno not in _SKIPPED:
                            raise
                        subdirs, others = [], []  # unreadable: left on the way back like an empty one
                    sub = f"{rel}/{name}" if rel else name
                    yield sub, chain.top(), others
                    stack.append((sub, subdirs))
            finally:
                chain.close()

    def list_scan(self, path: str, *, recursive: bool) -> ListScan:
        """Walk folder ``path`` for a listing (see :class:`ListScan`); fails at once if it is
        missing, not a folder, or a symlink."""
        return ListScan(self, path, recursive)

    # -- opening -------------------------------------------------------------------------------------

    def open_dir(self, path: str = "") -> int:
        """Open directory ``path`` and return its fd (O_RDONLY, usable with ``os.scandir``)."""
        parts = parse_path(path)
        with _translating(path):
            return self._walk(parts)

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

    def create_temp(self, path: str) -> tuple[int, str]:
        """Create a new, empty temporary file next to ``path`` for an upload to ``path``.

        Returns ``(fd, temp_rel)``: a write-only fd (mode 0o600, created with O_EXCL|O_NOFOLLOW, so it
        is always a fresh regular file) and its client path ``.<name>.ferry-part-<random>`` in the same
        folder as ``path`` (so :meth:`commit` is an atomic rename on one filesystem). Fails early with
        ``is-a-directory`` if ``path`` is an existing folder.
        """
        parts = self._needs_name(path, _UPLOAD_NEEDS_NAME)
        refuse_reserved(parts[-1], path)
        with _translating(path), self._parent(parts) as (pfd, name):
            _refuse_existing_dir(pfd, name, path)
            for _ in range(16):
                temp = partial_name(name, secrets.token_hex(8))
                try:
                    fd = os.open(temp, TEMP_FLAGS, 0o600, dir_fd=pfd)
                except FileExistsError:
                    continue  # astronomically unlikely with 64 random bits; just pick another
                return fd, join_path((*parts[:-1], temp))
            raise ErrorCode.EXISTS.error(f"{_show(path)}: could not create a temporary file")

    def store_small(
        self,
        path: str,
        data: bytes,
        *,
        mode: int,
        mtime: float,
        overwrite: bool = True,
        creations: Creations | None = None,
    ) -> int:
        """Write a small file to ``path`` atomically, in one walk: a temp file next to it, data,
        mode and mtime, then a rename. Returns the size of the regular file it replaced (0 if none).

        For small uploads (a 10,000-file tree) the separate lstat/create_temp/commit calls walked
        the path four times. No fsync, as for ``cp`` and ``rsync``: the rename still guarantees the
        final name only ever shows complete content.
        """
        parts = self._needs_name(path, _UPLOAD_NEEDS_NAME)
        refuse_reserved(parts[-1], path)
        with _translating(path), self._parent(parts) as (pfd, name):
            return _store_small_at(
                pfd, name, path, data, mode=mode, mtime=mtime, overwrite=overwrite, creations=creations
            )

    def open_partial(
        self, path: str, token: str, *, on_foreign: Callable[[str, os.stat_result], None] | None = None
    ) -> tuple[int, str, int]:
        """Open or create the resumable partial file for an upload to ``path``.

        The name is deterministic, ``.<name>.ferry-part-<token>`` next to ``path``, so a reconnecting
        client with the same ``token`` (1-64 of ``[A-Za-z0-9_-]``) finds what it sent before. Returns
        ``(fd, partial_rel, size)``: a blocking read-write fd (read access lets the server hash the
        prefix it already has before resuming) positioned at the end, the partial's client path, and
        the size it holds.

        Only a *genuine* partial is resumed: a regular file with one link that carries the mark the
        server set when it created it under this name (:data:`PARTIAL_XATTR`). Anything else found
        under the name (a hard link to another file, a file someone else made or renamed there) is
        never read, written or truncated: a fresh partial replaces the *name* (atomically, by a
        rename), ``size`` is 0, and ``on_foreign(partial_rel, its status)`` is called so the caller
        can log it. A symlink, folder or special file under that name is refused.
        """
        parts = self._needs_name(path, _UPLOAD_NEEDS_NAME)
        refuse_reserved(parts[-1], path)
        with _translating(path), self._parent(parts) as (pfd, name):
            _refuse_existing_dir(pfd, name, path)
            pname = _resume_name(name, token)
            prel = join_path((*parts[:-1], pname))
            for _ in range(8):  # bounded: each retry means the name changed under us
                try:
                    st = os.stat(pname, dir_fd=pfd, follow_symlinks=False)
                except FileNotFoundError:
                    try:
                        fd = os.open(pname, NEW_PARTIAL_FLAGS, 0o600, dir_fd=pfd)
                    except FileExistsError:
                        continue  # created meanwhile: look at it again
                    _mark_partial(fd, pname)
                    return fd, prel, 0
                # Checked before opening, so a device planted under the name is never opened.
                _require_regular(st, prel)
                try:
                    ro = os.open(pname, READ_FLAGS, dir_fd=pfd)
                except FileNotFoundError:
                    continue
                try:
                    st = os.fstat(ro)
                    _require_regular(st, prel)  # swapped for a FIFO since the check
                    if _is_genuine_partial(ro, st, pname):
                        fd = _reopen_rw(ro, st)
                        try:
                            os.lseek(fd, 0, os.SEEK_END)
                        except BaseException:
                            os.close(fd)
                            raise
                        return fd, prel, st.st_size
                finally:
                    os.close(ro)
                # Not ours: leave its content alone and give the name to a fresh partial.
                if on_foreign is not None:
                    on_foreign(prel, st)
                return _replace_name(pfd, name, pname), prel, 0
            raise ErrorCode.CHANGED.error(f"{_show(prel)} keeps changing; try again")

    def remove_partial(self, partial_rel: str, fd: int) -> None:
        """Unlink partial ``partial_rel`` if it still names the inode open as ``fd`` (an upload
        discarding its own partial must not delete whatever was put under that name since)."""
        parts = self._needs_name(partial_rel, _UPLOAD_NEEDS_NAME)
        if not is_partial_name(parts[-1]):
            raise ErrorCode.BAD_PATH.error(f"{_show(partial_rel)} is not a ferry partial file")
        with (
            _translating(partial_rel),
            self._parent(parts) as (pfd, pname),
            contextlib.suppress(FileNotFoundError),
        ):
            if _ident(os.stat(pname, dir_fd=pfd, follow_symlinks=False)) == _ident(os.fstat(fd)):
                os.unlink(pname, dir_fd=pfd)

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

    def commit(
        self,
        temp_rel: str,
        final_rel: str,
        *,
        overwrite: bool = True,
        durable: bool = True,
        fd: int | None = None,
        creations: Creations | None = None,
    ) -> None:
        """Atomically move a finished upload from ``temp_rel`` (a partial file) to ``final_rel``.

        The caller must ``fsync`` the file's fd *before* committing, so the final name never points at
        data that a crash could lose. With ``durable`` (default) the jail then fsyncs the folder(s), so
        the rename itself survives a crash. An existing file (or symlink: the link is replaced, not
        its target) at ``final_rel`` is replaced, unless ``overwrite`` is False: then it fails with
        ``exists``, atomically, so a check made when the upload started cannot be raced. An existing
        folder is never replaced (``is-a-directory``). ``temp_rel`` must name a partial file.

        With ``fd`` (the descriptor the upload wrote and verified), the inode moved is that one:
        the partial is first renamed to a private random name, which only this call knows, and
        checked there (same device and inode as ``fd``, one link) before it gets the final name. If
        anything else carries the partial's name by then, nothing is moved (code ``changed``) and
        that file is put back where it was. ``creations`` sees the final name first if it is new.
        """
        tparts = self._needs_name(temp_rel, _UPLOAD_NEEDS_NAME)
        if not is_partial_name(tparts[-1]):
            raise ErrorCode.BAD_PATH.error(f"{_show(temp_rel)} is not a ferry partial file")
        fparts = self._needs_name(final_rel, _UPLOAD_NEEDS_NAME)
        refuse_reserved(fparts[-1], final_rel)
        with (
            _translating(temp_rel, final_rel),
            self._parent(tparts) as (sfd, sname),
            self._parent(fparts) as (dfd, dname),
        ):
            taker = creations if creations is not None and _kind_at(dfd, dname) is None else None
            if taker is not None:
                taker.take(final_rel)
            try:
                if fd is not None:
                    sname = _take_verified(sfd, sname, dname, fd, final_rel)
                try:
                    _rename(sfd, sname, dfd, dname, overwrite=overwrite)
                except BaseException:
                    if fd is not None:  # keep the partial resumable under its own name
                        with contextlib.suppress(OSError):
                            _rename_noreplace(sfd, sname, sfd, tparts[-1])
                    raise
            except BaseException:
                if taker is not None:
                    taker.give_back()
                raise
            if fd is not None:
                # A complete file is no partial any more: drop the mark (best effort).
                with contextlib.suppress(OSError):
                    os.removexattr(fd, PARTIAL_XATTR)
            if durable:
                os.fsync(dfd)
                if tparts[:-1] != fparts[:-1]:
                    os.fsync(sfd)

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

    def __init__(self, jail: Jail, path: str) -> None:
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

    def __init__(self, jail: Jail, path: str, inline_max: int) -> None:
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

    def __init__(self, jail: Jail, path: str, recursive: bool) -> None:
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
        self, jail: Jail, path: str, limit: int = 32, *, create: bool = True, creations: Creations | None = None
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


def _store_small_at(
    pfd: int,
    name: str,
    path: str,
    data: bytes,
    *,
    mode: int,
    mtime: float,
    overwrite: bool,
    admit: Callable[[int], None] | None = None,
    inspect: bool = True,
    temp: str | None = None,
    creations: Creations | None = None,
) -> int:
    """:meth:`Jail.store_small` once the parent folder is open as ``pfd`` (raises OSError as well
    as FerryErrors; the caller translates). Returns the size of the regular file it replaced.
    ``admit`` is called with that size before anything is written and may refuse by raising (a
    quota check needs to know what the file replaces). ``inspect`` False skips looking at the
    destination first (only with ``overwrite``; then 0 is returned). ``temp`` is the name of the
    hidden temp file (a partial name; default: a random one). ``creations`` sees the file first if
    it is a new name (the destination is then always looked at)."""
    replaced = 0
    st: os.stat_result | None = None
    if inspect or not overwrite or creations is not None:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise ErrorCode.IS_A_DIRECTORY.error(
                f"{_show(path)} is a folder; upload to a file name inside it"
            )
        if not overwrite:
            raise ErrorCode.EXISTS.error(f"{_show(path)} already exists")
        if stat.S_ISREG(st.st_mode):
            replaced = st.st_size
    if admit is not None:
        admit(replaced)
    taker = creations if st is None else None  # a new name: one more entry
    if taker is not None:
        taker.take(path)
    try:
        store_atomically(
            name,
            data,
            dir_fd=pfd,
            mode=mode & 0o777,
            mtime=mtime,
            temp=temp,
            rename=lambda _s, src, _d, dst: _rename(pfd, src, pfd, dst, overwrite=overwrite),
        )
    except BaseException:
        if taker is not None:
            taker.give_back()
        raise
    return replaced


def _replace_name(pfd: int, name: str, pname: str) -> int:
    """Create a fresh, marked partial for final name ``name`` under a private random name and
    rename it over ``pname`` (which holds a file the server did not create: only that *name* is
    replaced, its inode is left alone). Returns the new partial's read-write fd."""
    for _ in range(16):
        private = partial_name(name, secrets.token_hex(8))
        try:
            fd = os.open(private, NEW_PARTIAL_FLAGS, 0o600, dir_fd=pfd)
        except FileExistsError:
            continue  # astronomically unlikely with 64 random bits; pick another
        try:
            _mark_partial(fd, pname)
            os.rename(private, pname, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(private, dir_fd=pfd)
            raise
        return fd
    raise ErrorCode.EXISTS.error("could not create a partial file; try again")


def _take_verified(sfd: int, sname: str, dname: str, fd: int, final_rel: str) -> str:
    """Move partial ``sname`` (in ``sfd``) to a private random name and check that it is the inode
    open as ``fd`` with a single link; returns the private name. Otherwise the entry is put back and
    ``changed`` raised: a commit must never publish bytes it did not verify."""
    why = "was removed"
    for _ in range(16):
        private = partial_name(dname, secrets.token_hex(8))
        try:
            _rename_noreplace(sfd, sname, sfd, private)
        except FileExistsError:
            continue
        except FileNotFoundError:
            break
        mine = os.fstat(fd)
        st = os.stat(private, dir_fd=sfd, follow_symlinks=False)
        if _ident(st) == _ident(mine) and mine.st_nlink == 1:
            return private
        with contextlib.suppress(OSError):
            _rename_noreplace(sfd, private, sfd, sname)
        why = "was replaced" if _ident(st) != _ident(mine) else "got another link"
        break
    raise ErrorCode.CHANGED.error(
        f"{_show(final_rel)}: the upload's partial file {why} while the data was on its way; "
        "nothing was kept (run the upload again)",
    )


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


def _refuse_existing_dir(pfd: int, name: str, path: str) -> None:
    """Fail early, before any data is sent, if an upload's destination is an existing folder."""
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise ErrorCode.IS_A_DIRECTORY.error(f"{_show(path)} is a folder; upload to a file name inside it")


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
        jail: Jail,
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
