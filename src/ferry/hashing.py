"""Chunked integrity hashing shared by both ends of a transfer.

A file is hashed in fixed-size chunks (4 MiB by default); its *digest* is the hash of
``b"ferry-tree-1" + size + concat(chunk hashes)``. That digest is ferry's own: it is *not* what
``b3sum`` or ``md5sum`` print. When asked (``file_hash=True``), :class:`ChunkHasher` also computes
the standard hash of the whole file in the same pass, the value those tools print. Why not one plain hash of the file: chunk hashes let
a resumed transfer re-check only chunk boundaries (not gigabytes), can be computed in any order or
in parallel, and can be cached per file by (inode, size, mtime). BLAKE3 is the default (GB/s per core);
md5 is selectable for compatibility with the classic "simple ftp".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal, Protocol

import blake3

HashName = Literal["blake3", "md5"]
DEFAULT_CHUNK = 1 << 22  # 4 MiB: 256 chunk hashes per GiB keeps messages small and resume fine-grained
_TREE_TAG = b"ferry-tree-1"


class _Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


def new_hasher(name: HashName) -> _Hasher:
    """A fresh incremental hasher of the named algorithm."""
    if name == "blake3":
        return blake3.blake3()
    if name == "md5":
        import hashlib  # only for md5: not every command needs it (a TLS client does, for the pin)

        return hashlib.md5(usedforsecurity=False)
    raise ValueError(f"unknown hash {name!r}; use blake3 or md5")


def hash_bytes(name: HashName, data: bytes | bytearray | memoryview) -> bytes:
    """Hash of one buffer."""
    h = new_hasher(name)
    h.update(data)
    return h.digest()


def tree_digest(name: HashName, size: int, chunk_hashes: list[bytes]) -> bytes:
    """The file digest built from its chunk hashes (see module docstring)."""
    h = new_hasher(name)
    h.update(_TREE_TAG + size.to_bytes(8, "big"))
    for c in chunk_hashes:
        h.update(c)
    return h.digest()


def small_digest(name: HashName, data: bytes | bytearray | memoryview) -> bytes:
    """The file digest of ``data`` when it fits in one chunk (at most :data:`DEFAULT_CHUNK` bytes):
    what :meth:`ChunkHasher.finish` returns, without its per-call overhead (tree transfers call this
    once per small file on each side)."""
    if len(data) > DEFAULT_CHUNK:
        raise ValueError("small_digest is for data of at most one chunk")
    return tree_digest(name, len(data), [hash_bytes(name, data)])


class ChunkHasher:
    """Hashes a byte stream incrementally, producing one hash per ``chunk_size`` bytes.

    ``prefix`` are the hashes of chunks already verified before this stream started (resume).
    ``file_hash``: also hash the whole stream the standard way (:meth:`file_digest`, the value of
    ``b3sum``/``md5sum``); after a ``prefix`` the bytes it covers must be given to
    :meth:`update_file_hash` first (the chunk hashes alone cannot produce it).
    """

    def __init__(
        self,
        name: HashName,
        chunk_size: int = DEFAULT_CHUNK,
        prefix: list[bytes] | None = None,
        *,
        file_hash: bool = False,
    ) -> None:
        self.name = name
        self.chunk_size = chunk_size
        self.chunk_hashes: list[bytes] = list(prefix or [])
        self.size = len(self.chunk_hashes) * chunk_size
        self._current = new_hasher(name)
        self._fill = 0
        self._file: _Hasher | None = new_hasher(name) if file_hash else None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes; closes a chunk every ``chunk_size`` bytes."""
        view = memoryview(data)
        self.size += len(view)
        if self._file is not None:
            self._file.update(view)
        while view:
            take = min(len(view), self.chunk_size - self._fill)
            self._current.update(view[:take])
            self._fill += take
            view = view[take:]
            if self._fill == self.chunk_size:
                self.chunk_hashes.append(self._current.digest())
                self._current = new_hasher(self.name)
                self._fill = 0

    def update_file_hash(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes of the ``prefix`` (already held before this stream) to the whole-file hash only."""
        assert self._file is not None, "ChunkHasher(file_hash=True) computes the whole-file hash"
        self._file.update(data)

    def file_digest(self) -> bytes | None:
        """The standard hash of everything hashed so far (None without ``file_hash``)."""
        return None if self._file is None else self._file.digest()

    def finish(self) -> tuple[list[bytes], bytes]:
        """Close the last partial chunk; return (chunk hashes, file digest)."""
        if self._fill or not self.chunk_hashes:
            self.chunk_hashes.append(self._current.digest())
            self._current = new_hasher(self.name)
            self._fill = 0
        return self.chunk_hashes, tree_digest(self.name, self.size, self.chunk_hashes)


def hash_fd_chunks(
    fd: int,
    name: HashName,
    chunk_size: int = DEFAULT_CHUNK,
    start: int = 0,
    end: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> list[bytes]:
    """Hashes of the whole chunks of ``fd`` between chunk-aligned ``start`` and ``end`` (default: EOF),
    plus the final partial chunk when ``end`` is EOF. Reads with ``pread``: bounded memory, no seek."""
    if end is None:
        end = os.fstat(fd).st_size
    if start == end == 0:  # an empty file still has one (empty) chunk, as ChunkHasher.finish() says
        return [new_hasher(name).digest()]
    out: list[bytes] = []
    pos = start
    block = min(chunk_size, 1 << 20)
    while pos < end:
        h = new_hasher(name)
        stop = min(pos + chunk_size, end)
        while pos < stop:
            data = os.pread(fd, min(block, stop - pos), pos)
            if not data:
                raise OSError(f"file shrank while hashing (at byte {pos})")
            h.update(data)
            pos += len(data)
        out.append(h.digest())
        if on_chunk is not None:
            on_chunk(pos)
    return out


def file_hash_prefix(hasher: ChunkHasher, fd: int, end: int) -> None:
    """Give bytes ``[0, end)`` of ``fd`` to ``hasher``'s whole-file hash (a resumed transfer's
    prefix, which this stream does not carry). Reads with ``pread`` in bounded blocks."""
    pos = 0
    while pos < end:
        data = os.pread(fd, min(1 << 20, end - pos), pos)
        if not data:
            raise OSError(f"file shrank while hashing (at byte {pos})")
        hasher.update_file_hash(data)
        pos += len(data)


def matching_prefix(ours: list[bytes], theirs: list[bytes]) -> int:
    """How many leading chunk hashes agree."""
    n = 0
    for a, b in zip(ours, theirs, strict=False):
        if a != b:
            break
        n += 1
    return n
