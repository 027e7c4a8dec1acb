"""The local-filesystem kit: what the client and the server both do to files, written once.

* **Open flags** (:data:`DIR_FLAGS`, :data:`READ_FLAGS`, :data:`TEMP_FLAGS`, ...): every open is
  ``O_CLOEXEC`` (no descriptor leaks into a command ferry runs) and ``O_NOFOLLOW`` where a link in
  that place would redirect the write or the read.
* **Partial names** (:func:`partial_name`, :func:`is_partial_name`): a file being written is never
  under its final name but a hidden ``.NAME.ferry-part-TOKEN`` next to it (same folder, so the
  final rename is atomic), deterministic for a resumable transfer, a hash of NAME when the result
  would exceed the 255-byte name limit.
* **Atomic small-file writes** (:func:`write_new`, :func:`store_atomically`): a new file
  (``O_EXCL``: never an existing file or a planted link) with its data, permission bits and time,
  renamed into place only when complete; on any failure it is removed again. No half-written file
  ever appears under its final name.
* **A directory-handle cache** (:class:`DirCache`): folders of a tree opened once, relative to
  their parent, kept (least recently used first out) up to a limit, so a file costs no path walk.

Linux first (``O_DIRECTORY``, ``O_NOFOLLOW``, ``*at`` calls); standard library only; no policy:
what a refusal means (an error code for a client, a message for a user) is the caller's.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Callable
from typing import Final

__all__ = [
    "DIR_FLAGS",
    "MAX_NAME_BYTES",
    "NEW_PARTIAL_FLAGS",
    "PARTIAL_MARK",
    "READ_FLAGS",
    "RESUME_FLAGS",
    "TEMP_FLAGS",
    "TOKEN_RE",
    "DirCache",
    "is_partial_name",
    "partial_name",
    "store_atomically",
    "write_new",
]

#: Longest single name (NAME_MAX on every Linux filesystem ferry cares about).
MAX_NAME_BYTES: Final = 255

# --- open flags ---------------------------------------------------------------------------------

#: A folder, never through a link. O_RDONLY (not O_PATH) so the same descriptor also works for
#: os.scandir() and fsync().
DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A file to read. O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOCTTY: a terminal must
#: never become the process's controlling terminal. Both are harmless for regular files.
READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: A new temp file: a fresh inode (O_EXCL), never an existing file or a link planted under the name.
TEMP_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: A new partial file, read-write (a resume hashes the prefix already there), always a fresh inode.
NEW_PARTIAL_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: A partial file that may already hold a prefix to resume after (created if missing), not a link.
RESUME_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC

# --- partial names ----------------------------------------------------------------------------------

#: Marker in the names of partial (in-progress) files: ``.<name>.ferry-part-<token>``.
PARTIAL_MARK: Final = ".ferry-part-"
#: A token (resume token, temp tag): a safe alphabet, so a name built with it never holds a '/'.
TOKEN_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PARTIAL_RE: Final = re.compile(r"\..+\.ferry-part-[A-Za-z0-9_-]{1,64}", re.DOTALL)


def partial_name(name: str, token: str) -> str:
    """The partial name for final name ``name``: ``.<name>.ferry-part-<token>``.

    Deterministic (a resume finds the same file again); if it would exceed the 255-byte name limit,
    ``<name>`` is replaced by a hash of it, so the result still fits and is still recognised by
    :func:`is_partial_name`. Raises ValueError for a token outside :data:`TOKEN_RE`.
    """
    if TOKEN_RE.fullmatch(token) is None:
        raise ValueError(f"invalid token {token!r} (use 1-64 letters, digits, '-' or '_')")
    candidate = f".{name}{PARTIAL_MARK}{token}"
    if len(candidate) <= 63 or len(os.fsencode(candidate)) <= MAX_NAME_BYTES:  # (63 characters: at most 252 bytes)
        return candidate
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:32]
    return f".{digest}{PARTIAL_MARK}{token}"


def is_partial_name(name: str) -> bool:
    """True if ``name`` (one component) has the form of a partial file (``.x.ferry-part-T``)."""
    # Every listed name comes through here: most do not start with a dot and skip the pattern.
    return name[:1] == "." and _PARTIAL_RE.fullmatch(name) is not None


def safe_relative(name: str) -> bool:
    """True for a relative POSIX path of plain names (no empty, ``.`` or ``..`` parts, no NUL):
    a name from the other side that may become a local path."""
    if not name or "\0" in name or (os.sep != "/" and os.sep in name):
        return False
    # Three substring searches instead of a split per name (a listing checks 10,000 of them):
    # an empty, "." or ".." part shows as "//", "/./" or "/../" once the name is framed in '/'.
    framed = f"/{name}/"
    return "//" not in framed and "/./" not in framed and "/../" not in framed


# --- atomic small-file writes -------------------------------------------------------------------


def write_new(
    name: str | os.PathLike[str],
    data: bytes,
    *,
    dir_fd: int | None = None,
    mode: int,
    mtime: float | None = None,
    fsync: bool = False,
) -> None:
    """Create ``name`` (relative to ``dir_fd`` when given) as a new file holding ``data``, with
    exactly the permission bits ``mode`` (the umask does not apply) and, if given, ``mtime``;
    ``fsync``: on disk before returning. Fails if anything exists under the name (a link
    included); the file is removed again if writing it fails."""
    fd = os.open(name, TEMP_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        if mtime is not None:
            os.utime(fd, (mtime, mtime))
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
        raise
    os.close(fd)


Rename = Callable[[int | None, str, int | None, str], None]
"""``rename(src_dir_fd, src, dst_dir_fd, dst)``: how :func:`store_atomically` publishes a file."""


def _replace(sfd: int | None, src: str, dfd: int | None, dst: str) -> None:
    os.replace(src, dst, src_dir_fd=sfd, dst_dir_fd=dfd)


def store_atomically(
    name: str | os.PathLike[str],
    data: bytes,
    *,
    dir_fd: int | None = None,
    mode: int,
    mtime: float | None = None,
    fsync: bool = False,
    temp: str | None = None,
    rename: Rename = _replace,
) -> None:
    """Store ``data`` as ``name`` (relative to ``dir_fd`` when given) all at once: written to a new
    hidden temp file in the same folder (:func:`write_new`; ``temp`` names it, default a random
    partial name), then renamed over ``name`` (``rename``, default :func:`os.replace`: a file of
    that name is replaced, a link is replaced itself and never followed). Readers see the old
    file or the whole new one; the temp file is removed if anything fails."""
    path = os.fspath(name)
    folder, _, base = path.rpartition("/")
    if temp is None:
        temp = partial_name(base, secrets.token_hex(6))
    temp_path = f"{folder}/{temp}" if folder else temp
    write_new(temp_path, data, dir_fd=dir_fd, mode=mode, mtime=mtime, fsync=fsync)
    try:
        rename(dir_fd, temp_path, dir_fd, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path, dir_fd=dir_fd)
        raise


# --- a directory-handle cache ----------------------------------------------------------------------


OpenChild = Callable[[int, str, str], int]
"""``open_child(parent_fd, name, rel)``: open (or create) folder ``name`` in ``parent_fd``; ``rel``
is its path below the root, for messages. Returns the new descriptor."""


class DirCache:
    """Descriptors of the folders below ``root_fd`` (paths relative to it, ``a/b``), each opened
    once with ``open_child`` from its nearest cached ancestor down (a loop, however deep), at most
    ``limit`` kept (the least recently used closed first; the root is always kept). Paths must be
    validated by the caller (plain names joined by ``/``). :meth:`close` closes them all, the root
    included."""

    def __init__(self, root_fd: int, open_child: OpenChild, limit: int = 32) -> None:
        self.root = root_fd
        self._open_child = open_child
        self._limit = max(2, limit)
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def cached(self, rel: str) -> int | None:
        """The descriptor of ``rel`` if it is open (the root for ``""``), else None."""
        if not rel:
            return self.root
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
        return fd

    def get(self, rel: str) -> int:
        """The descriptor of folder ``rel``, opened (see ``open_child``) if it is not cached."""
        fd = self.cached(rel)
        if fd is not None:
            return fd
        # The nearest ancestor already open (a tree lists folders before their contents: usually
        # the parent), else the root.
        end = rel.rfind("/")
        while end > 0 and rel[:end] not in self._fds:
            end = rel.rfind("/", 0, end)
        fd = self.root if end <= 0 else self._fds[rel[:end]]
        while True:
            nxt = rel.find("/", end + 1)
            sub = rel if nxt < 0 else rel[:nxt]
            fd = self._open_child(fd, sub[end + 1 :] if end > 0 else sub, sub)
            self._fds[sub] = fd
            while len(self._fds) > self._limit:  # the folder just opened is the newest: never evicted
                os.close(self._fds.popitem(last=False)[1])
            if nxt < 0:
                return fd
            end = nxt

    def trim(self) -> None:
        """Close every descriptor but the root's: whoever waits between uses of the cache (a tree
        upload waiting for its next batch) holds one descriptor, not ``limit``. Folders are opened
        again when next needed."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def close(self) -> None:
        """Close every descriptor, the root's too (idempotent)."""
        self.trim()
        if self.root >= 0:
            os.close(self.root)
            self.root = -1
