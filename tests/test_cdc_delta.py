"""Content-defined chunking, the delta encoder/assembler and per-chunk compression (pure, on temp files)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from ferry import cdc
from ferry.compress import RAW, ZSTD, Compressor, Decompressor
from ferry.delta import COPY, Assembler, BasisChanged, BasisFile, DeltaEncoder
from ferry.errors import IntegrityError

MiB = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def index_of(path: Path) -> cdc.ChunkIndex:
    fd = os.open(path, os.O_RDONLY)
    try:
        return cdc.index_fd(fd)
    finally:
        os.close(fd)


def transfer(tmp_path: Path, old: bytes, new: bytes, *, compress: bool = False) -> tuple[DeltaEncoder, bytes]:
    """Encode ``new`` against ``old``'s index and assemble it from ``old``: (encoder, result)."""
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    basis = index_of(tmp_path / "old")
    src = os.open(tmp_path / "new", os.O_RDONLY)
    bfd = os.open(tmp_path / "old", os.O_RDONLY)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        enc = DeltaEncoder(src, len(new), basis.hashes, compress=compress)
        asm = Assembler(out, len(new), [BasisFile(bfd, basis)])
        done = False
        while not done:
            batch, done = enc.next_batch()
            asm.apply(batch.ops, bytes(batch.data))
        index = asm.finish(enc.digest)
        assert enc.index is not None and index.hashes == enc.index.hashes
    finally:
        for fd in (src, bfd, out):
            os.close(fd)
    return enc, (tmp_path / "out").read_bytes()


def test_chunks_are_content_defined_an_insertion_shifts_nothing() -> None:
    data = rand(8 * MiB, 1)
    a = cdc.index_bytes(data)
    b = cdc.index_bytes(data[: 3 * MiB] + b"x" * 100 + data[3 * MiB :])
    assert min(a.lengths[:-1]) >= cdc.MIN_SIZE and max(a.lengths) <= cdc.MAX_SIZE
    assert 60 < a.count < 200  # ~64 KiB + 16 KiB on average
    shared = set(a.hash_list()) & set(b.hash_list())
    assert len(shared) >= a.count - 2  # only the chunk(s) around the insertion differ
    # fixed-size blocks, for contrast, would share nothing after the insertion point
    assert a.digest != b.digest and a.digest == cdc.index_bytes(data).digest


def test_index_fd_matches_index_bytes_and_small_digest(tmp_path: Path) -> None:
    for size in (0, 1, cdc.MIN_SIZE, cdc.MIN_SIZE + 1, 3 * MiB + 5):
        data = rand(size, size)
        p = tmp_path / f"f{size}"
        p.write_bytes(data)
        idx = index_of(p)
        assert idx.size == size and sum(idx.lengths) == size
        assert idx.digest == cdc.index_bytes(data).digest
        fd = os.open(p, os.O_RDONLY)
        try:
            assert cdc.content_digest_fd(fd, size) == idx.digest
        finally:
            os.close(fd)
        if size <= cdc.MIN_SIZE:
            assert cdc.small_content_digest(data) == idx.digest


def test_index_fd_reports_a_file_that_shrank(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(rand(MiB, 2))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(cdc.FileChanged):
            cdc.index_fd(fd, 2 * MiB)
    finally:
        os.close(fd)


def test_delta_sends_only_changed_chunks(tmp_path: Path) -> None:
    old = rand(6 * MiB, 3)
    new = old[: 2 * MiB] + rand(MiB, 4) + old[3 * MiB :]  # 1 MiB overwritten in the middle
    enc, out = transfer(tmp_path, old, new)
    assert out == new
    assert MiB <= enc.literal <= MiB + 2 * cdc.MAX_SIZE
    assert enc.copied == len(new) - enc.literal


def test_delta_insertion_and_deletion(tmp_path: Path) -> None:
    old = rand(5 * MiB, 5)
    for new in (old[:MiB] + b"inserted" * 12 + old[MiB:], old[: 2 * MiB] + old[2 * MiB + 100 :], b"", old[:10]):
        enc, out = transfer(tmp_path, old, new)
        assert out == new
        assert enc.literal <= 2 * cdc.MAX_SIZE


def test_delta_without_basis_and_compressed(tmp_path: Path) -> None:
    text = b"".join(b"2026-12-02 13:%02d:%02d GET /index.html 200 %d\n" % (i % 60, i % 7, i) for i in range(60000))
    enc, out = transfer(tmp_path, b"", text, compress=True)
    assert out == text and enc.copied == 0 and enc.literal == len(text)
    assert enc.wire < len(text) / 4  # logs compress well
    noise = rand(2 * MiB, 6)
    enc, out = transfer(tmp_path, b"", noise, compress=True)
    assert out == noise and enc.wire == len(noise)  # incompressible chunks go as they are


def test_compressor_is_adaptive_and_bounded() -> None:
    c, d = Compressor(), Decompressor()
    noise = rand(64 << 10, 7)
    kinds = [c.pack(noise)[0] for _ in range(40)]
    assert set(kinds) == {RAW}
    kind, packed = c.pack(b"a" * 65536)  # tried again only every 16th chunk after 8 misses
    tried = [c.pack(b"a" * 65536)[0] for _ in range(16)]
    assert ZSTD in [kind, *tried]
    kind, packed = Compressor().pack(b"b" * 65536)
    assert kind == ZSTD and d.unpack(kind, packed, 65536) == b"b" * 65536
    with pytest.raises(IntegrityError):
        d.unpack(ZSTD, packed, 1000)  # announced smaller than the frame: refused, not allocated
    with pytest.raises(IntegrityError):
        d.unpack(ZSTD, b"not zstd at all", 10)
    with pytest.raises(IntegrityError):
        d.unpack(RAW, b"abc", 4)


def test_assembler_refuses_bad_ops_and_digests(tmp_path: Path) -> None:
    old = rand(2 * MiB, 8)
    (tmp_path / "old").write_bytes(old)
    basis = index_of(tmp_path / "old")
    bfd = os.open(tmp_path / "old", os.O_RDONLY)
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for ops, data in (
            ([COPY, 0, basis.count + 1], b""),  # beyond the basis
            ([RAW, 10, 0], b"short"),  # literal shorter than announced
            ([RAW, 3, 0], b"abcd"),  # data left over
            ([9, 1, 1], b"x"),  # unknown kind
            ([RAW, 1], b"x"),  # not triples
        ):
            asm = Assembler(out, len(old), [BasisFile(bfd, basis)])
            with pytest.raises(IntegrityError):
                asm.apply(ops, data)
        asm = Assembler(out, len(old), [BasisFile(bfd, basis)])
        asm.apply([COPY, 0, basis.count], b"")
        with pytest.raises(IntegrityError):
            asm.finish(b"\0" * 32)
        assert asm.finish(basis.digest).hashes == basis.hashes
        # the basis changed after it was indexed: detected on copy
        os.pwrite(os.open(tmp_path / "old", os.O_WRONLY), b"changed", 10)
        asm = Assembler(out, len(old), [BasisFile(bfd, basis)])
        with pytest.raises(BasisChanged):
            asm.apply([COPY, 0, 1], b"")
    finally:
        os.close(bfd)
        os.close(out)


def test_two_basis_files_partial_resume(tmp_path: Path) -> None:
    """A partial file from an interrupted transfer is a second basis: its chunks are not sent again."""
    new = rand(4 * MiB, 9)
    (tmp_path / "old").write_bytes(rand(MiB, 10))  # unrelated old version
    (tmp_path / "part").write_bytes(new[: 3 * MiB])  # what arrived before the interruption
    b1, b2 = index_of(tmp_path / "old"), index_of(tmp_path / "part")
    (tmp_path / "new").write_bytes(new)
    fds = [os.open(tmp_path / n, os.O_RDONLY) for n in ("old", "part", "new")]
    out = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        asm = Assembler(out, len(new), [BasisFile(fds[0], b1), BasisFile(fds[1], b2)])
        enc = DeltaEncoder(fds[2], len(new), asm.basis_hashes())
        done = False
        while not done:
            batch, done = enc.next_batch()
            asm.apply(batch.ops, bytes(batch.data))
        asm.finish(enc.digest)
    finally:
        for fd in (*fds, out):
            os.close(fd)
    assert (tmp_path / "out").read_bytes() == new
    assert enc.literal <= MiB + cdc.MAX_SIZE


def test_encoder_with_a_precomputed_index(tmp_path: Path) -> None:
    """An index computed beforehand (while the receiver listed its basis) gives the same ops and
    digest; only literal chunks are read, and one that changed since is detected."""
    old = rand(4 * MiB, 50)
    new = old[:MiB] + rand(300_000, 51) + old[MiB:]
    (tmp_path / "new").write_bytes(new)
    basis = cdc.index_bytes(old).hashes
    fd = os.open(tmp_path / "new", os.O_RDWR)
    try:
        index = cdc.index_fd(fd)
        plain, given = DeltaEncoder(fd, len(new), basis), DeltaEncoder(fd, len(new), basis, index=index)
        for enc in (plain, given):
            done = False
            while not done:
                _batch, done = enc.next_batch()
        assert plain.digest == given.digest and plain.literal == given.literal
        os.pwrite(fd, b"changed!", MiB + 10)  # inside a literal chunk
        with pytest.raises(cdc.FileChanged):
            enc = DeltaEncoder(fd, len(new), basis, index=index)
            while not enc.next_batch()[1]:
                pass
    finally:
        os.close(fd)


def test_stopped_index_and_short_hashes(tmp_path: Path) -> None:
    """Chunking stopped early (the basis arrived) covers a prefix and goes on where it stopped with
    the same chunks; a basis of hashes cut to 12 bytes finds the same matches."""
    import threading

    old = rand(6 * MiB, 60)
    new = old[: 2 * MiB] + rand(500_000, 61) + old[2 * MiB :]
    (tmp_path / "new").write_bytes(new)
    full = cdc.index_bytes(old)
    fd = os.open(tmp_path / "new", os.O_RDONLY)
    try:
        stop = threading.Event()
        stop.set()
        prefix = cdc.index_fd(fd, len(new), stop=stop)
        assert 0 < prefix.size < len(new) and prefix.count == 1
        results = []
        for width, index in ((32, None), (32, prefix), (cdc.BASIS_WIDTH, prefix)):
            enc = DeltaEncoder(fd, len(new), cdc.truncate(full.hashes, width), width=width, index=index)
            while not enc.next_batch()[1]:
                pass
            results.append((enc.digest, enc.literal, enc.copied))
        assert results[0] == results[1] == results[2]
        assert results[0][0] == cdc.index_bytes(new).digest
        assert len(cdc.truncate(full.hashes, 12)) == 12 * full.count
    finally:
        os.close(fd)


def test_packed_tree_batches_are_bounded_and_validated() -> None:
    from ferry.compress import pack_block, tree_batch, tree_records
    from ferry.wire import messages as m
    from ferry.wire.errors import MalformedMessage

    items = [m.TreeItem(path=f"d/f{i}.txt", kind="file", size=10, data=b"x" * 10, digest=b"d") for i in range(50)]
    packed = tree_batch(7, items, True, pack=True)
    assert packed.packed and not packed.items and tree_records(packed) == items
    assert tree_batch(7, items, True, pack=False).items == items
    bomb = pack_block(b"\0" * (m.TREE_UNPACKED_MAX + 1))  # unpacks past the limit
    assert bomb is not None
    for bad in (
        m.TreeItems(id=1, packed=b"not zstd"),
        m.TreeItems(id=1, packed=bomb),
        m.TreeItems(id=1, packed=pack_block(b"\x91\xc1" * 100) or b""),  # not records
        m.TreeItems(id=1, items=items[:1], packed=packed.packed),  # both
    ):
        with pytest.raises(MalformedMessage):
            tree_records(bad)


def test_hash_cache_is_bounded_by_bytes() -> None:
    """Chunk indexes grow with their files: the server's cache evicts by bytes, not only by count."""
    from ferry.server.context import HashCache

    cache = HashCache(max_entries=100, max_bytes=100_000)
    big = cdc.ChunkIndex.from_hashes(1 << 30, [1 << 16] * 2000, [b"h" * 32] * 2000)  # ~72 KB
    cache.put_index(("a",), big)
    cache.put_index(("b",), big)  # both do not fit: the older goes
    assert cache.get_index(("a",)) is None and cache.get_index(("b",)) is big
    assert cache.size <= 100_000
    huge = cdc.ChunkIndex.from_hashes(1 << 40, [1 << 16] * 5000, [b"h" * 32] * 5000)
    cache.put_index(("c",), huge)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get_index(("c",)) is None and cache.get_index(("b",)) is big
    cache.put(("d",), [b"x" * 32] * 10)
    assert cache.get(("d",)) is not None and cache.get_index(("d",)) is None
