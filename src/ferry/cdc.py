"""Content-defined chunking (FastCDC) and the chunk index of a file, shared by client and server.

A file's *chunk index* is the list of its content-defined chunks: their lengths and BLAKE3 hashes, in
file order. Chunk boundaries depend only on the bytes near them (a FastCDC gear hash over a sliding
window), so inserting or deleting a few bytes moves the boundaries of one or two chunks and leaves
every other chunk, and its hash, as it was; fixed-size blocks would shift every block after the edit.

One index serves three jobs (see docs/wire.md, "Chunk index"):

- **delta transfer**: the receiver lists the hashes of its old version, the sender sends only the
  chunks missing there (:mod:`ferry.delta`);
- **resume**: an interrupted delta transfer leaves a partial file whose chunks are a prefix of the new
  version's; the next run offers them as basis too, so nothing already received is sent again;
- **content comparison** (``sync -c``) and later de-duplication: the *content digest*
  :func:`index_digest` is built from the chunk hashes, so a file whose index is cached (per inode,
  size, mtime and ctime) is never read again to compare it.

Parameters: 64 KiB average (FastCDC's minimum 16 KiB, maximum 256 KiB). A 1 GiB file has about
13,000 chunks: its index is ~420 KiB on the wire (~0.04% of the file), and a 1 MiB change costs
the changed bytes plus at most two neighbouring chunks. Smaller chunks would find more matches in
scattered edits but make every index (sent on every delta) proportionally larger.

Why ``pyfastcdc``: a maintained FastCDC-2020 implementation in Cython (a port of the reference Rust
crate, identical cut points), ~1.8 GB/s here, releases the GIL while cutting; the pure-Python
``fastcdc`` package is ~100x slower. The files are read with ``pread`` into pyfastcdc's stream
chunker, never memory-mapped: a file truncated while mapped would kill the process with SIGBUS.
"""

from __future__ import annotations

import os
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import blake3

from ferry.errors import TransferError

if TYPE_CHECKING:
    from pyfastcdc import FastCDC

#: FastCDC parameters (bytes). Changing them changes every index: they are part of the index's name.
AVG_SIZE = 1 << 16
MIN_SIZE = 1 << 14
MAX_SIZE = 1 << 18
#: Name of this chunking scheme, in cache keys and on the wire (``Chunks.scheme``).
SCHEME = "fastcdc2020-64k-blake3"
HASH_SIZE = 32
_DIGEST_TAG = b"ferry-cdc-1"

_chunkers: list[FastCDC] = []


def _chunker() -> FastCDC:
    """The FastCDC cutter, created (and pyfastcdc imported, ~40 ms) on first use: a no-op sync
    or a plain ``ls`` never needs it."""
    if not _chunkers:
        from pyfastcdc import FastCDC

        _chunkers.append(FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE))
    return _chunkers[0]


def chunk_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The hash of one chunk (BLAKE3, 32 bytes)."""
    return blake3.blake3(data).digest()


#: Bytes of each chunk hash a receiver sends as its basis (the default of sync): enough that two
#: different chunks of one transfer never look alike by chance (96 bits), and a mistake would
#: still be caught by the content digest of the result; a third of a full hash on the wire.
BASIS_WIDTH = 12


def truncate(hashes: bytes, width: int) -> bytes:
    """Concatenated chunk hashes cut to their first ``width`` bytes each (``width`` 32: as they are)."""
    if width >= HASH_SIZE:
        return hashes
    return b"".join(hashes[i : i + width] for i in range(0, len(hashes), HASH_SIZE))


def index_digest(size: int, hashes: bytes) -> bytes:
    """The content digest of a file from its size and concatenated chunk hashes.

    Equal digests mean equal content (BLAKE3 over the chunk hashes, tagged so it can never equal a
    chunk hash or a fixed-chunk file digest from ``ferry.hashing``)."""
    h = blake3.blake3(_DIGEST_TAG + size.to_bytes(8, "big"))
    h.update(hashes)
    return h.digest()


@dataclass(slots=True)
class ChunkIndex:
    """The chunks of one file: ``lengths[i]`` bytes hashed to ``hashes[32*i:32*i+32]``.

    Compact on purpose (one ``array`` and one ``bytes``, ~36 bytes a chunk): indexes are cached
    per file by the server.
    """

    size: int = 0
    lengths: array[int] = field(default_factory=lambda: array("I"))
    hashes: bytes = b""

    @property
    def count(self) -> int:
        """How many chunks (an index is never falsy: an empty file has zero chunks but an index)."""
        return len(self.lengths)

    def hash(self, i: int) -> bytes:
        """The hash of chunk ``i``."""
        return self.hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE]

    def hash_list(self) -> list[bytes]:
        """Every chunk hash, in file order."""
        h = self.hashes
        return [h[i : i + HASH_SIZE] for i in range(0, len(h), HASH_SIZE)]

    def offsets(self) -> array[int]:
        """Where each chunk starts."""
        out = array("Q")
        pos = 0
        for n in self.lengths:
            out.append(pos)
            pos += n
        return out

    @property
    def digest(self) -> bytes:
        """The content digest (:func:`index_digest`)."""
        return index_digest(self.size, self.hashes)

    @classmethod
    def from_hashes(cls, size: int, lengths: list[int], hashes: list[bytes]) -> ChunkIndex:
        """Build an index from its parts."""
        return cls(size, array("I", lengths), b"".join(hashes))


class Source(Protocol):
    """Random access to the bytes of a file that is not a descriptor (a file of the object backend,
    read by stored chunk): what chunking, delta encoding and assembling need of a file."""

    def preadv(self, buffers: list[memoryview], offset: int) -> int:
        """Read into ``buffers`` from ``offset`` as :func:`os.preadv` does (fewer bytes at the end)."""
        ...


#: A file to read: an open descriptor, or a :class:`Source`.
Readable = int | Source


def preadv(f: Readable, buffers: list[memoryview], offset: int) -> int:
    """:func:`os.preadv` on a descriptor or a :class:`Source`."""
    if isinstance(f, int):
        return os.preadv(f, buffers, offset)
    return f.preadv(buffers, offset)


class _PreadReader:
    """A ``readinto`` over ``fd`` with ``pread`` from a moving offset (no seek: the descriptor may be
    shared), stopping at ``end``."""

    def __init__(self, fd: Readable, start: int, end: int, on_read: Callable[[int], None] | None) -> None:
        self.fd, self.pos, self.end = fd, start, end
        self.on_read = on_read

    def readinto(self, b: memoryview) -> int:
        want = min(len(b), self.end - self.pos, 1 << 20)
        if want <= 0:
            return 0
        n = preadv(self.fd, [b[:want]], self.pos)
        self.pos += n
        if self.on_read is not None and n:
            self.on_read(n)
        return n


def iter_chunks(
    fd: Readable, size: int, *, start: int = 0, on_read: Callable[[int], None] | None = None
) -> Iterator[tuple[int, memoryview]]:
    """``(offset, data)`` of each content-defined chunk of bytes ``[start, size)`` of ``fd``.

    ``start`` must be a chunk boundary (0, or where an earlier pass stopped): a cut point depends
    only on the bytes from its chunk's start, so chunking from there gives the same chunks as a
    pass from 0. ``data`` is valid only until the next chunk is produced (copy it to keep it). A
    file that is shorter than ``size`` yields fewer bytes: callers compare the total with what they
    expected.
    """
    if size <= start:
        return
    chunks: Any = _chunker().cut_stream(_PreadReader(fd, start, size, on_read))
    for ch in chunks:
        yield start + ch.offset, ch.data


def chunk_buffer(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, memoryview]]:
    """``(offset, data)`` of each content-defined chunk of an in-memory buffer."""
    for ch in _chunker().cut_buf(data):
        yield ch.offset, ch.data


def index_fd(
    fd: Readable,
    size: int | None = None,
    *,
    on_read: Callable[[int], None] | None = None,
    stop: threading.Event | None = None,
) -> ChunkIndex:
    """Chunk and hash the file open as ``fd`` (its first ``size`` bytes, default: all of it; a
    :class:`Source` needs ``size``).

    With ``stop``, the work ends at the first chunk boundary after it is set: the index then
    covers a prefix of the file (its ``size`` says how much), and :func:`iter_chunks` can go on
    from there. Raises :class:`FileChanged` when the file turns out shorter than ``size`` (it
    shrank meanwhile).
    """
    if size is None:
        if not isinstance(fd, int):
            raise TypeError("index_fd of a Source needs its size")
        size = os.fstat(fd).st_size
    lengths = array("I")
    parts: list[bytes] = []
    total = 0
    for _off, data in iter_chunks(fd, size, on_read=on_read):
        lengths.append(len(data))
        parts.append(blake3.blake3(data).digest())
        total += len(data)
        if stop is not None and stop.is_set():
            return ChunkIndex(total, lengths, b"".join(parts))
    if total != size:
        raise FileChanged(f"the file shrank while it was being read (at byte {total} of {size})")
    return ChunkIndex(size, lengths, b"".join(parts))


def index_bytes(data: bytes | bytearray | memoryview) -> ChunkIndex:
    """The chunk index of an in-memory buffer (a small file read whole)."""
    lengths = array("I")
    parts: list[bytes] = []
    for _off, piece in chunk_buffer(data):
        lengths.append(len(piece))
        parts.append(blake3.blake3(piece).digest())
    return ChunkIndex(len(data), lengths, b"".join(parts))


class Indexer:
    """Builds the chunk index of a stream handed over piece by piece (the object backend's stored
    4 MiB chunks, read one at a time): same chunks as :func:`index_fd` of the whole file.

    A cut point depends only on the bytes from its chunk's start, so every piece of a buffer but
    the last ends at a true boundary; the last may have been cut by the buffer's end and is
    chunked again with the next piece (it is at most :data:`MAX_SIZE` bytes)."""

    def __init__(self) -> None:
        self.size = 0
        self._lengths = array("I")
        self._parts: list[bytes] = []
        self._tail = b""

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next ``data`` of the stream (CPU-bound: call it in a thread for large pieces)."""
        buf = self._tail + bytes(data) if self._tail else data
        last: memoryview | None = None
        for _off, piece in chunk_buffer(buf):
            if last is not None:
                self._add(last)
            last = piece
        self._tail = bytes(last) if last is not None else b""

    def finish(self) -> ChunkIndex:
        """The index of everything fed."""
        if self._tail:
            self._add(memoryview(self._tail))  # the stream's end: a true boundary
            self._tail = b""
        return ChunkIndex(self.size, self._lengths, b"".join(self._parts))

    def _add(self, piece: memoryview) -> None:
        self._lengths.append(len(piece))
        self._parts.append(blake3.blake3(piece).digest())
        self.size += len(piece)


def small_content_digest(data: bytes | bytearray | memoryview) -> bytes:
    """:func:`index_digest` of a buffer no larger than :data:`MIN_SIZE` (always one chunk): the
    fast path for comparing small files by content."""
    if len(data) > MIN_SIZE:
        return index_bytes(data).digest
    if not data:
        return index_digest(0, b"")
    return index_digest(len(data), blake3.blake3(data).digest())


def content_digest_fd(fd: int, size: int) -> bytes:
    """The content digest of the first ``size`` bytes of ``fd`` (see :func:`index_digest`)."""
    if size <= MIN_SIZE:
        data = os.pread(fd, size + 1, 0)
        if len(data) != size:
            raise FileChanged(f"the file changed size while it was being read ({len(data)} != {size})")
        return small_content_digest(data)
    return index_fd(fd, size).digest


class FileChanged(TransferError):
    """A file changed (size, content) while it was being read; the result would be wrong."""


def stat_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies one version of a file for caching its index: device, inode, size, mtime and
    ctime in nanoseconds (a rewrite that restores the mtime still changes the ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
