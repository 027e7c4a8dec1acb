"""Delta transfer of one file: the sender's encoder and the receiver's assembler (no I/O but ``pread`` /
``pwrite`` on descriptors the caller opened; used by client and server alike).

The receiver owns a *basis*: the chunk index (:mod:`ferry.cdc`) of its old version of the file, and of
a partial file left by an interrupted transfer. It sends the basis' chunk hashes; the sender chunks the
new version the same way and describes it as a list of *ops*, flat triples of integers:

====================  ========================================================================
``(0, start, count)``  copy ``count`` consecutive basis chunks starting at basis chunk ``start``
``(1, length, 0)``     one chunk of ``length`` literal bytes follows in the data, as it is
``(2, length, size)``  one chunk of ``length`` literal bytes follows as a zstd frame of ``size``
====================  ========================================================================

Each literal op is exactly one chunk of the new version, and copies are whole basis chunks, so the
receiver knows every chunk of the new version and its hash (the basis' hash for copies, verified
against the bytes it copies; the hash of the bytes received for literals). At the end it compares
the content digest built from them with the sender's (:func:`ferry.cdc.index_digest`) before the
caller renames the assembled temp file into place: what lands is byte for byte the sender's file.
A copy whose bytes no longer match the basis hash (the old file changed meanwhile) fails the file
with :class:`BasisChanged`; the caller sends it whole instead.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import blake3

from ferry.cdc import (
    HASH_SIZE,
    MAX_SIZE,
    ChunkIndex,
    FileChanged,
    Readable,
    index_digest,
    iter_chunks,
    preadv,
    truncate,
)
from ferry.compress import RAW, ZSTD, Compressor, Decompressor
from ferry.errors import IntegrityError, TransferError

COPY = 0  #: op kind: copy basis chunks
#: Literal payload bytes per batch of ops (a DeltaData message): well below the 1 MiB message cap
#: even with one more maximal chunk and the ops on top.
BATCH_BYTES = 1 << 18
#: Ops triples per batch.
BATCH_OPS = 4096
#: Bytes of copies after which a batch goes out even with little literal data: the receiver starts
#: copying while the sender is still chunking (a 1 GiB file with a small change is one long copy).
COPY_FLUSH = 32 << 20
#: Most bytes of basis chunks copied with one read (a run of chunks contiguous in one file; one
#: chunk is at most 256 KiB, so a run always holds at least one).
_RUN = 4 << 20


class Sink(Protocol):
    """Where an :class:`Assembler` writes the new version when it is not a descriptor (an upload of
    the object backend, stored by chunk): written in order, from offset 0 on."""

    def pwrite(self, data: memoryview, offset: int) -> int:
        """Write ``data`` at ``offset`` as :func:`os.pwrite` does; returns the bytes taken."""
        ...


@runtime_checkable
class RangeSink(Sink, Protocol):
    """A :class:`Sink` that also takes copies of *trusted* basis files (:attr:`BasisFile.trusted`)
    by reference, without their bytes being read: the object backend reuses a stored piece of the
    old version that the new one holds at the same place instead of reading and storing it again."""

    def copy(self, basis: int, start: int, length: int, offset: int) -> None:
        """Bytes ``[start, start + length)`` of basis file number ``basis`` go at ``offset`` (in order,
        as :meth:`Sink.pwrite` data does)."""
        ...


class BasisChanged(TransferError):
    """A basis chunk no longer has the hash the receiver announced (its old file changed)."""


@dataclass
class Batch:
    """One batch of ops and the literal payloads they refer to."""

    ops: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)


class DeltaEncoder:
    """Describes the file open as ``fd`` (``size`` bytes) against a receiver's basis hashes.

    Call :meth:`next_batch` (in a thread; one call at a time) until it says it is the last one; then
    :attr:`index` is the new version's chunk index and :attr:`digest` its content digest. Counts:
    :attr:`copied` bytes the receiver already had, :attr:`literal` bytes sent, :attr:`wire` bytes of
    payload after compression.

    With ``index`` (the file's chunk index, computed beforehand: e.g. while the receiver was still
    listing its basis, or from a cache) the file is not chunked again: only the literal chunks are
    read, each checked against its hash (a file changed since it was indexed raises
    :class:`~ferry.cdc.FileChanged`). The index may cover only a prefix of the file (chunking was
    stopped when the basis arrived): the rest is chunked as it is sent.
    """

    def __init__(
        self,
        fd: Readable,
        size: int,
        basis: bytes,
        *,
        width: int = HASH_SIZE,
        compress: bool = False,
        index: ChunkIndex | None = None,
    ) -> None:
        self.size = size
        self._fd = fd
        self._width = width
        # First position of each basis hash (a hash listed twice: either copy is as good). The
        # receiver may send its hashes cut to ``width`` bytes: they are looked up cut as well.
        self._where: dict[bytes, int] = {}
        for i in range(len(basis) // width - 1, -1, -1):
            self._where[basis[i * width : (i + 1) * width]] = i
        if index is not None and index.size > size:
            raise ValueError("the index is of another version of the file")
        self._given = index if index is not None and index.size == size else None
        self._chunks: Iterator[tuple[int, memoryview | bytes, bytes]] = (
            self._indexed(index) if index is not None else self._chunked(0)
        )
        self._compressor = Compressor() if compress else None
        self._lengths = array("I")
        self._hashes: list[bytes] = []
        self._total = 0
        self.copied = 0
        self.literal = 0
        self.wire = 0
        self.index: ChunkIndex | None = None

    def _chunked(self, start: int) -> Iterator[tuple[int, memoryview | bytes, bytes]]:
        for _off, chunk in iter_chunks(self._fd, self.size, start=start):
            yield len(chunk), chunk, blake3.blake3(chunk).digest()

    def _indexed(self, index: ChunkIndex) -> Iterator[tuple[int, memoryview | bytes, bytes]]:
        """The chunks of a given index (the bytes read only for chunks the receiver lacks), then
        those of the rest of the file, if the index covers only a prefix."""
        pos = 0
        for i, n in enumerate(index.lengths):
            h = index.hash(i)
            data: bytes = b""
            if self._lookup(h) is None:
                data = _pread(self._fd, n, pos)
                if len(data) != n or blake3.blake3(data).digest() != h:
                    raise FileChanged(f"the file changed since it was indexed (at byte {pos})")
            yield n, data, h
            pos += n
        yield from self._chunked(pos)

    def _lookup(self, h: bytes) -> int | None:
        """The basis chunk with hash ``h``, if the receiver has one."""
        return self._where.get(h[: self._width])

    @property
    def digest(self) -> bytes:
        """The new version's content digest (after the last batch)."""
        assert self.index is not None
        return self.index.digest

    def next_batch(self) -> tuple[Batch, bool]:
        """The next batch of ops, and whether it is the last one."""
        batch = Batch()
        ops, data = batch.ops, batch.data
        lookup = self._lookup
        copied = 0
        for n, chunk, h in self._chunks:
            self._lengths.append(n)
            self._hashes.append(h)
            self._total += n
            i = lookup(h)
            if i is not None:
                self.copied += n
                copied += n
                # Extend the previous copy when this chunk follows it in the basis too.
                if ops and ops[-3] == COPY and ops[-2] + ops[-1] == i:
                    ops[-1] += 1
                else:
                    ops += (COPY, i, 1)
            else:
                self.literal += n
                payload: bytes | memoryview = chunk
                kind = RAW
                if self._compressor is not None:
                    kind, payload = self._compressor.pack(chunk)
                ops += (kind, n, len(payload) if kind == ZSTD else 0)
                data += payload
                self.wire += len(payload)
            if len(data) >= BATCH_BYTES or len(ops) >= 3 * BATCH_OPS or copied >= COPY_FLUSH:
                return batch, False
        if self._total != self.size:
            raise FileChanged(f"the file shrank while it was being sent ({self._total} of {self.size} bytes)")
        self.index = self._given or ChunkIndex(self.size, self._lengths, b"".join(self._hashes))
        return batch, True


def _pread(f: Readable, n: int, pos: int) -> bytes:
    """Up to ``n`` bytes of ``f`` at ``pos`` (fewer at its end)."""
    if isinstance(f, int):
        return os.pread(f, n, pos)
    buf = bytearray(n)
    got = preadv(f, [memoryview(buf)], pos)
    return bytes(buf[:got])


@dataclass
class BasisFile:
    """One file of a receiver's basis: an open descriptor (or a :class:`~ferry.cdc.Source`) and its
    chunk index."""

    fd: Readable
    index: ChunkIndex
    #: its bytes are known to be those its index describes (a stored file, immutable and read by
    #: verified pieces, indexed under its content digest): copies of it need no read and re-hash
    #: where the output takes them by reference (:class:`RangeSink`)
    trusted: bool = False


class Assembler:
    """Builds the new version in ``out_fd`` (an empty temp file, or a :class:`Sink`) from ops, basis
    chunks and literals.

    ``basis`` are the files whose chunks were announced, in the order announced (chunk numbers run on
    from one file to the next). Call :meth:`apply` per batch (in a thread; one at a time), then
    :meth:`finish`. Raises :class:`~ferry.errors.IntegrityError` for anything inconsistent (bad op,
    wrong length, digest mismatch) and :class:`BasisChanged` when a basis chunk changed.
    """

    def __init__(
        self,
        out_fd: int | Sink,
        size: int,
        basis: Sequence[BasisFile] = (),
        *,
        on_write: Callable[[int], None] | None = None,
    ) -> None:
        self.out_fd = out_fd
        self.size = size
        self.pos = 0
        self.on_write = on_write
        self._files: array[int] = array("I")
        self._offsets: array[int] = array("Q")
        self._lengths: array[int] = array("I")
        self._fds = [b.fd for b in basis]
        # Copies of trusted basis files go to the sink by reference when it takes them so.
        self._ranges = out_fd if isinstance(out_fd, RangeSink) else None
        self._trusted = [b.trusted and self._ranges is not None for b in basis]
        hashes: list[bytes] = []
        for k, b in enumerate(basis):
            off = 0
            for n in b.index.lengths:
                self._files.append(k)
                self._offsets.append(off)
                self._lengths.append(n)
                off += n
            hashes.append(b.index.hashes)
        self._basis_hashes = b"".join(hashes)
        self._new_lengths = array("I")
        self._new_hashes: list[bytes] = []
        self._unpack = Decompressor()
        self._buf: memoryview | None = None
        self.copied = 0
        self.received = 0  #: literal bytes received (unpacked)
        self.wire = 0  #: the bytes they took on the wire (packed)

    @property
    def basis_count(self) -> int:
        """How many chunks the basis offers."""
        return len(self._lengths)

    def basis_hashes(self, width: int = HASH_SIZE) -> bytes:
        """The concatenated hashes of the basis chunks, in announced order (cut to ``width`` bytes
        each, as sent to the sender; copies are still checked against the full hashes)."""
        return truncate(self._basis_hashes, width)

    def apply(self, ops: Sequence[int], data: bytes | memoryview) -> None:
        """Write the chunks one batch of ops describes."""
        if len(ops) % 3:
            raise IntegrityError("malformed delta: ops are not triples")
        view = memoryview(data)
        used = 0
        for j in range(0, len(ops), 3):
            kind, a, b = ops[j], ops[j + 1], ops[j + 2]
            if kind == COPY:
                if b <= 0 or a < 0 or a + b > len(self._lengths):
                    raise IntegrityError(f"malformed delta: copy of chunks {a}..{a + b} of {len(self._lengths)}")
                self._copy(a, b)
                continue
            if kind not in (RAW, ZSTD) or not 0 < a <= MAX_SIZE:
                raise IntegrityError(f"malformed delta: op {kind} of {a} bytes")
            take = a if kind == RAW else b
            if take <= 0 or used + take > len(view):
                raise IntegrityError("malformed delta: literal data shorter than its ops say")
            chunk = self._unpack.unpack(kind, view[used : used + take], a)
            used += take
            self.wire += take
            self._write(chunk)
            self._new_lengths.append(a)
            self._new_hashes.append(blake3.blake3(chunk).digest())
            self.received += a
        if used != len(view):
            raise IntegrityError("malformed delta: literal data longer than its ops say")

    def _copy(self, start: int, count: int) -> None:
        files, offsets, lengths = self._files, self._offsets, self._lengths
        i, end = start, start + count
        while i < end:
            k, first = files[i], offsets[i]
            if self._trusted[k]:
                i = self._copy_trusted(i, end)
                continue
            # Read a run of chunks that are contiguous in one basis file with one pread (<= 4 MiB).
            j, span = i, 0
            while j < end and files[j] == k and offsets[j] == first + span and span + lengths[j] <= _RUN:
                span += lengths[j]
                j += 1
            # One buffer for every run: fresh memory for each (page faults) costs more than the copy.
            view = self._buffer()[:span]
            got = 0
            while got < span:
                n = preadv(self._fds[k], [view[got:]], first + got)
                if n <= 0:
                    raise BasisChanged("the old version of the file changed while the new one was being built")
                got += n
            pos = 0
            for c in range(i, j):
                n = lengths[c]
                h = blake3.blake3(view[pos : pos + n]).digest()
                if h != self._basis_hashes[c * HASH_SIZE : (c + 1) * HASH_SIZE]:
                    raise BasisChanged("the old version of the file changed while the new one was being built")
                self._new_lengths.append(n)
                self._new_hashes.append(h)
                pos += n
            self._write(view)
            self.copied += span
            i = j

    def _copy_trusted(self, i: int, end: int) -> int:
        """Hand a run of chunks contiguous in one trusted basis file to the sink by reference (their
        hashes are the index's); returns where the run ended."""
        files, offsets, lengths = self._files, self._offsets, self._lengths
        k, first = files[i], offsets[i]
        j, span = i, 0
        while j < end and files[j] == k and offsets[j] == first + span:
            span += lengths[j]
            j += 1
        if self.pos + span > self.size:
            raise IntegrityError(f"malformed delta: more than the announced {self.size} bytes")
        assert self._ranges is not None
        self._ranges.copy(k, first, span, self.pos)
        hashes = self._basis_hashes
        for c in range(i, j):
            self._new_lengths.append(lengths[c])
            self._new_hashes.append(hashes[c * HASH_SIZE : (c + 1) * HASH_SIZE])
        if self.on_write is not None:
            self.on_write(span)
        self.pos += span
        self.copied += span
        return j

    def _buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = memoryview(bytearray(_RUN))
        return self._buf

    def _write(self, data: bytes | memoryview) -> None:
        if self.pos + len(data) > self.size:
            raise IntegrityError(f"malformed delta: more than the announced {self.size} bytes")
        view = memoryview(data)
        pos = self.pos
        out = self.out_fd
        while view:
            n = os.pwrite(out, view, pos) if isinstance(out, int) else out.pwrite(view, pos)
            view, pos = view[n:], pos + n
        if self.on_write is not None:
            self.on_write(pos - self.pos)
        self.pos = pos

    def finish(self, digest: bytes) -> ChunkIndex:
        """Check the size and the content digest; return the new version's chunk index."""
        if self.pos != self.size:
            raise IntegrityError(f"the new version has {self.pos} bytes, {self.size} announced; nothing was kept")
        index = ChunkIndex(self.size, self._new_lengths, b"".join(self._new_hashes))
        if index_digest(self.size, index.hashes) != digest:
            raise IntegrityError("the assembled file does not match the sender's digest; nothing was kept")
        return index


def basis_id(hashes: bytes) -> bytes:
    """What names a basis on the wire (``DeltaPut.basis``): the BLAKE3 of its concatenated chunk
    hashes. The receiver recomputes it from its current files before using them: a basis that
    changed since it was listed is refused instead of misread."""
    return blake3.blake3(hashes).digest()
