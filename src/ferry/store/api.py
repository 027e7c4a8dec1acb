"""The storage interface the server stands on: namespace operations, partial uploads, chunk reads and
writes, usage.

Two implementations: the folder backend (:class:`ferry.server.folder.FolderStorage`, the jail over a
local folder, the zero-configuration default) and :class:`ferry.store.objects.ObjectStorage` (chunks
in S3, namespace in PostgreSQL, shared by N servers). docs/scale-out.md maps each jail operation onto
it.

Two layers, because the two backends move file contents differently:

- :class:`Storage` -- what both implement and the server's services call for either backend: the
  namespace (stat, list, mkdir, remove, rename, attributes), small files in one step, ``close``.
- :class:`ChunkStorage` -- contents as a list of verified :data:`CHUNK_SIZE` chunks (uploads by
  chunk, reads by chunk, usage across servers, the sweeper): the object backend's way. The folder
  backend does not implement it: its contents are one file each, streamed through a descriptor
  (``sendfile``, ``pwrite`` of whatever the client's chunk size is, hashing with the client's
  algorithm beside it), and chunking them into 4 MiB BLAKE3 pieces would add a buffer and a second
  hash to every transfer. Its streaming paths, tree walkers and usage walk are folder-only methods
  of ``FolderStorage`` (docs/scale-out.md, "The folder backend").

A storage is used for one account at a time by a session (the folder backend is opened on that
account's home at login, and refuses calls that name another account); the object backend serves
every account through one pool. Calls name the account either way, so that the services read the
same for both.

Paths are *already checked* tuples of components relative to the user's home (``()`` is the home):
the server's path rules (no ``..``, no absolute paths, no empty or ``.`` components, length limits;
``parse_path`` in the jail today) run before a backend is called, once, for both backends.
:func:`check_parts` repeats the cheap part defensively. Users are named by their account name; a
backend maps the name to its own owner record.

Files are stored as a list of chunks of :data:`CHUNK_SIZE` bytes (the last one shorter), each
identified by the BLAKE3 hash of its bytes; a file's ``digest`` is ferry's tree digest of those chunk
hashes (``ferry.hashing.tree_digest("blake3", size, hashes)``), the same value a default transfer
(BLAKE3, 4 MiB chunks) carries in ``FileEnd``, so a download with the default parameters needs no
re-hashing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from ferry.errors import RemoteError
from ferry.hashing import DEFAULT_CHUNK
from ferry.wire.codes import ErrorCode

#: Bytes per stored chunk (the last chunk of a file is shorter). Equal to the default transfer chunk.
CHUNK_SIZE: Final = DEFAULT_CHUNK

#: Chunks of at most this many bytes keep their bytes in the database (the chunk row's ``data``)
#: instead of an object in the store. Below it a store request's fixed cost (a round trip, an HTTP
#: exchange, the store's per-object bookkeeping: ~1-8 ms here) dwarfs the cost of the bytes, while
#: in the database they cost a copy inside a transaction that is made anyway; above it the bytes
#: would start to dominate the database (its size, its WAL, its backups, its cache), which is meant
#: to hold the namespace, not the contents. 64 KiB puts most files of a typical tree (source, text,
#: configuration: median sizes of a few KiB) in the database and nearly all bytes in the store.
#: Measurements and the reasoning: docs/scale-out.md, "Small files".
INLINE_MAX: Final = 64 * 1024

Parts = tuple[str, ...]
#: What a node is: the object backend holds files and folders only; the folder backend also lists
#: symbolic links and other entries (FIFOs, devices) that local users made there.
NodeKind = Literal["file", "dir", "link", "other"]


def check_parts(parts: Sequence[str]) -> Parts:
    """Refuse components the server's path rules would never let through (a defence in depth: a bug
    above must not turn into a name with a ``/`` in the namespace)."""
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\x00" in part:
            raise ErrorCode.BAD_PATH.error(f"invalid path component {part!r}")
    return tuple(parts)


def show(parts: Sequence[str]) -> str:
    """How a path appears in an error message (quoted, terminal-safe), as the jail says it."""
    from ferry.textsafe import safe_name

    return "your home folder" if not parts else f"'{safe_name('/'.join(parts))}'"


@dataclass(frozen=True, slots=True)
class Node:
    """A file or folder as listed: ``mtime`` in seconds since the epoch, ``mode`` the permission bits,
    ``digest`` the file's tree digest (empty for folders, and where the backend does not keep one: the
    folder backend), ``target`` what a symbolic link says (never followed; folder backend only)."""

    name: str
    kind: NodeKind
    size: int
    mtime: float
    mode: int
    digest: bytes = b""
    target: str | None = None


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """One stored chunk: its record ``id`` (part of its object key), its ``owner`` (the de-duplication
    scope), the BLAKE3 ``hash`` of its bytes and its ``size``. ``stored`` is False while the object is
    still being written. ``data`` holds the chunk's bytes when the database keeps them (an *inline*
    chunk, at most :data:`INLINE_MAX` bytes; not yet verified: ``read_chunk`` checks them against
    ``hash``), None when they are an object in the store."""

    id: int
    owner: int
    hash: bytes
    size: int
    stored: bool = True
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class FileChunks:
    """A file opened for reading: its metadata and its chunks in order (a snapshot: the file may be
    replaced meanwhile; its chunks stay readable for the sweeper's grace period)."""

    node: Node
    chunks: tuple[ChunkRef, ...]


@dataclass(slots=True)
class Upload:
    """A partial upload to ``path``, identified across servers by ``(path, token)``.

    ``held`` are the chunks already stored for it, in order from the start (a resume sends only what
    follows them). ``owner`` and ``id`` are the backend's records.
    """

    id: int
    owner: int
    user: str
    path: Parts
    token: str
    size: int
    mode: int
    mtime: float
    held: list[ChunkRef] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Usage:
    """A user's usage: ``used`` bytes in committed files (apparent sizes, as the folder backend counts),
    ``files`` their number, ``reserved`` bytes set aside for uploads in progress."""

    used: int
    files: int
    reserved: int


@dataclass(frozen=True, slots=True)
class SmallFile:
    """One file of a batch (:meth:`ChunkStorage.store_small_many`): its ``path``, its bytes (at most
    :data:`CHUNK_SIZE`), its permission bits (``mode & 0o777`` is kept) and ``mtime`` (seconds)."""

    path: Parts
    data: bytes
    mode: int = 0o644
    mtime: float = 0.0


@dataclass(slots=True)
class SmallBatch:
    """What :meth:`ChunkStorage.store_small_many` did, item by item in the order given.

    ``results[i]`` is the size of the file item ``i`` replaced (0: none) if it was stored, else the
    error of that item (:class:`~ferry.errors.RemoteError`). ``fatal`` is the quota error that stopped
    the batch: the item that would have exceeded the quota and every later one carry it and were not
    stored; the items before were. ``stored``/``bytes`` count the files stored and their bytes,
    ``delta`` is the change of the user's usage (bytes stored minus bytes replaced).
    """

    results: list[int | RemoteError]
    fatal: RemoteError | None = None
    stored: int = 0
    bytes: int = 0
    delta: int = 0

    @property
    def failed(self) -> list[tuple[int, RemoteError]]:
        """``(index, error)`` of every item that was not stored (those stopped by ``fatal`` too)."""
        return [(i, r) for i, r in enumerate(self.results) if not isinstance(r, int)]


@dataclass(frozen=True, slots=True)
class SmallRead:
    """A file read by :meth:`ChunkStorage.read_small_many`: its metadata and, if it is at most the
    call's ``max_size``, its bytes (verified against its chunk hash); ``data`` is None for a bigger
    file (read it with ``open_file`` and ``read_chunk``)."""

    node: Node
    data: bytes | None


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one sweep removed: stale partial uploads, chunk records and chunk objects (bytes)."""

    uploads: int = 0
    chunks: int = 0
    objects: int = 0
    bytes: int = 0


class Storage(Protocol):
    """What the server does to users' files through either backend.

    All methods are coroutines; they raise :class:`ferry.errors.FerryError` subclasses with the wire
    codes the jail uses (``not-found``, ``exists``, ``not-a-directory``, ``is-a-directory``,
    ``not-empty``, ``quota``, ...) plus ``unavailable`` and ``corrupt`` (:mod:`ferry.wire.codes`).
    ``quota`` arguments are the user's quota in bytes (None: unlimited), as the accounts hold it;
    a backend shared by several servers enforces it itself, the folder backend (one server per
    folder) leaves it to the server's check against its usage count before the call.
    """

    #: False when commands cannot run next to the files (the object backend has no local folder).
    exec_supported: bool

    # -- namespace ----------------------------------------------------------------------------------

    async def stat(self, user: str, path: Parts) -> Node:
        """The file or folder at ``path`` (the home is a folder named ``""``)."""
        ...

    async def list_dir(self, user: str, path: Parts, *, after: str = "", limit: int = 1000) -> list[Node]:
        """Up to ``limit`` entries of folder ``path`` whose names sort after ``after`` (code-point order):
        a listing of any size is read page by page with bounded memory."""
        ...

    async def mkdir(
        self, user: str, path: Parts, *, parents: bool = False, exist_ok: bool = False, mode: int = 0o755
    ) -> None:
        """Create folder ``path`` (``parents``: also the missing folders above it, like ``mkdir -p``).
        When two servers create the same name at once, exactly one succeeds; the other gets ``exists``
        (or nothing, with ``exist_ok``, if the winner made a folder)."""
        ...

    async def remove(self, user: str, path: Parts, *, recursive: bool = False) -> None:
        """Remove a file, or a folder (empty unless ``recursive``); its chunks go to the sweeper."""
        ...

    async def rename(self, user: str, src: Parts, dst: Parts, *, overwrite: bool = True) -> None:
        """Move ``src`` to ``dst`` atomically, never copying data; ``overwrite`` replaces a file (or an
        empty folder by a folder) as ``rename(2)`` does, else an existing ``dst`` fails with ``exists``."""
        ...

    async def set_attrs(
        self, user: str, path: Parts, *, mtime: float | None = None, mode: int | None = None
    ) -> None:
        """Set the modification time and/or the permission bits (``mode & 0o777``)."""
        ...

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
    ) -> int:
        """Store a file of at most one chunk in one step; returns the size of the file it replaced."""
        ...

    async def close(self) -> None:
        """Release what the storage holds (connections; the folder backend: its home descriptor)."""
        ...


class ChunkStorage(Storage, Protocol):
    """Contents as chunks: uploads and reads by :data:`CHUNK_SIZE` chunk, usage across servers, the
    sweeper (the object backend; see the module docstring for why the folder backend streams instead)."""

    async def usage(self, user: str) -> Usage:
        """The user's usage, the same seen through every server."""
        ...

    # -- uploads ------------------------------------------------------------------------------------

    async def open_upload(
        self,
        user: str,
        path: Parts,
        *,
        token: str,
        size: int,
        mode: int,
        mtime: float,
        overwrite: bool,
        quota: int | None,
    ) -> Upload:
        """Start or resume (same ``path`` and ``token``, through any server) an upload of ``size`` bytes.
        Checks the quota, counting other uploads in progress, and sets ``size`` aside."""
        ...

    async def write_chunk(self, upload: Upload, index: int, data: bytes) -> ChunkRef:
        """Store chunk number ``index`` (``CHUNK_SIZE`` bytes, the last one shorter) of ``upload``. Once
        this returns, the chunk survives a crash of this server and counts in ``held`` on resume."""
        ...

    async def commit_upload(
        self, upload: Upload, *, digest: bytes, overwrite: bool, quota: int | None
    ) -> int:
        """Make the upload the file at its path, atomically (all chunks must be written); returns the
        size of the file it replaced (0 if none). The quota is checked again, across servers."""
        ...

    async def discard_upload(self, upload: Upload) -> None:
        """Forget a partial upload (integrity failure, cancelled); its chunks go to the sweeper."""
        ...

    # -- reads --------------------------------------------------------------------------------------

    async def open_file(self, user: str, path: Parts) -> FileChunks:
        """The file at ``path`` with its chunk list (``is-a-directory`` for a folder)."""
        ...

    async def read_chunk(self, ref: ChunkRef) -> bytes:
        """The bytes of one chunk, verified against its hash (``corrupt`` if missing or damaged)."""
        ...

    # -- many small files at once (tree transfers, sync) ---------------------------------------------

    async def store_small_many(
        self,
        user: str,
        items: Sequence[SmallFile],
        *,
        overwrite: bool,
        quota: int | None,
        parents: bool = False,
        dir_mode: int = 0o755,
    ) -> SmallBatch:
        """Store many files of at most one chunk each in one transaction (one lock of the user's usage,
        a few statements whatever their number). Items are taken in order, as :meth:`store_small` one
        after the other would: an item's own failure (``exists`` without ``overwrite`` or made meanwhile
        by another server, ``is-a-directory``, ``not-a-directory``, ``not-found`` parent without
        ``parents``, ``bad-path``) is reported in its result and the others go on; the first item
        that would exceed ``quota`` stops the batch (:attr:`SmallBatch.fatal`), the items before it
        are stored. ``parents``: missing folders above the files are made (mode ``dir_mode``), as a
        tree upload does. Raises (nothing of the batch stored) when the database or store is away,
        ``ValueError`` for an item over :data:`CHUNK_SIZE`."""
        ...

    async def mkdir_many(
        self, user: str, paths: Sequence[Parts], *, mode: int = 0o755
    ) -> list[RemoteError | None]:
        """Make sure each folder of ``paths`` exists, with its parents (``mkdir -p``), in one
        transaction; per path None, or its error (``exists`` if a file is there, ``not-a-directory``
        if one is above it)."""
        ...

    async def read_small_many(
        self, user: str, paths: Sequence[Parts], *, max_size: int = INLINE_MAX
    ) -> list[SmallRead | RemoteError]:
        """The files at ``paths`` (metadata, and the bytes of those of at most ``max_size`` bytes, which
        may not exceed :data:`CHUNK_SIZE`) read in one snapshot with one query; bytes held in the
        store are fetched concurrently. Per path the result or its error (``not-found``,
        ``not-a-directory``, ``is-a-directory``, ``corrupt``)."""
        ...

    # -- upkeep -------------------------------------------------------------------------------------

    async def sweep(self, *, partial_max_age: float, grace: float) -> SweepReport:
        """Remove partial uploads untouched for ``partial_max_age`` seconds, then chunks no file and no
        upload has referenced for ``grace`` seconds."""
        ...
