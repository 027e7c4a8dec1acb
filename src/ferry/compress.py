"""Adaptive per-chunk zstd compression for ``-z/--compress`` (client and server).

Each chunk of literal data is compressed on its own (one zstd frame) and sent compressed only if
that saved at least 1/32 of it; otherwise the raw bytes go (so random or already-compressed data
costs one failed attempt per chunk at most, and nothing on the wire). After a run of chunks that
did not shrink, only every 16th chunk is tried until one shrinks again: on incompressible data the
CPU cost falls to a few percent of a single attempt per chunk. Hashes are always of the raw bytes.

Why ``zstandard``: the maintained binding of the reference zstd library (frames carry their content
size, so the receiver can bound each decompression exactly: no decompression bombs).
"""

from __future__ import annotations

from typing import Any

from ferry.errors import IntegrityError
from ferry.wire import messages as m
from ferry.wire.errors import MalformedMessage

#: zstd level: 3 is zstd's default; ~300-500 MB/s a core on text, ratio close to gzip -6's.
LEVEL = 3
#: Chunks that did not shrink in a row before attempts become sparse.
_GIVE_UP_AFTER = 8
_RETRY_EVERY = 16

RAW = 1  #: op kind: literal bytes as they are
ZSTD = 2  #: op kind: literal bytes as one zstd frame


class Compressor:
    """Packs literal chunks for the wire (one per transfer direction and file; not thread-safe)."""

    def __init__(self, level: int = LEVEL) -> None:
        import zstandard  # only -z needs it (~40 ms to import)

        self._z = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True)
        self._misses = 0
        self._skipped = 0
        self.raw_bytes = 0  #: literal bytes packed
        self.wire_bytes = 0  #: bytes they took after packing

    def pack(self, data: bytes | memoryview) -> tuple[int, bytes]:
        """``(RAW or ZSTD, payload)`` for one chunk of literal data."""
        n = len(data)
        self.raw_bytes += n
        if self._misses >= _GIVE_UP_AFTER:
            self._skipped += 1
            if self._skipped < _RETRY_EVERY:
                self.wire_bytes += n
                return RAW, bytes(data)
            self._skipped = 0
        packed = self._z.compress(data)
        if len(packed) <= n - (n >> 5):
            self._misses = 0
            self.wire_bytes += len(packed)
            return ZSTD, packed
        self._misses += 1
        self.wire_bytes += n
        return RAW, bytes(data)


class Decompressor:
    """Unpacks what :class:`Compressor` packed (not thread-safe)."""

    def __init__(self) -> None:
        self._z: Any = None  # created on the first packed chunk (most transfers have none)

    def unpack(self, kind: int, payload: bytes | memoryview, size: int) -> bytes | memoryview:
        """The ``size`` raw bytes of one packed chunk; IntegrityError if it does not unpack to that."""
        if kind == RAW:
            if len(payload) != size:
                raise IntegrityError(f"a literal chunk has {len(payload)} bytes, {size} announced")
            return payload
        if kind != ZSTD:
            raise IntegrityError(f"unknown chunk encoding {kind}")
        import zstandard

        if self._z is None:
            self._z = zstandard.ZstdDecompressor()
        try:
            out: bytes = self._z.decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"a compressed chunk does not decompress: {exc}") from exc
        if len(out) != size:
            raise IntegrityError(f"a compressed chunk unpacked to {len(out)} bytes, {size} announced")
        return out


def pack_block(data: bytes) -> bytes | None:
    """``data`` (a whole batch of records) as one zstd frame, or None if that would not save at
    least 1/32 of it (then it travels as it is)."""
    import zstandard

    packed: bytes = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(data)
    return packed if len(packed) <= len(data) - (len(data) >> 5) else None


def unpack_block(packed: bytes, limit: int) -> bytes:
    """What :func:`pack_block` packed; IntegrityError if it is not a zstd frame or would unpack to
    more than ``limit`` bytes (nothing larger is ever allocated)."""
    import zstandard

    try:
        params = zstandard.get_frame_parameters(packed)
        if params.content_size <= 0 or params.content_size > limit:
            raise IntegrityError(f"a packed batch claims {params.content_size} bytes (at most {limit})")
        out: bytes = zstandard.ZstdDecompressor().decompress(packed, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"a packed batch does not unpack: {exc}") from exc
    return out


def tree_batch(req_id: int, items: list[m.TreeItem], end: bool, pack: bool) -> m.TreeItems:
    """The TreeItems message of one batch: with ``pack``, its records as one zstd frame when that
    saves at least 1/32 (text, sources), else as they are (random data is not packed twice)."""
    if pack and items:
        packed = pack_block(m.encode_tree_items(items))
        if packed is not None:
            return m.TreeItems(id=req_id, end=end, packed=packed)
    return m.TreeItems(id=req_id, items=items, end=end)


def tree_records(msg: m.TreeItems) -> list[m.TreeItem]:
    """The records of a TreeItems batch, unpacked if it was packed (MalformedMessage when a packed
    batch does not unpack, is too large, or does not decode as records)."""
    if not msg.packed:
        return msg.items
    if msg.items:
        raise MalformedMessage("a tree batch has both records and packed records")
    try:
        raw = unpack_block(msg.packed, m.TREE_UNPACKED_MAX)
    except IntegrityError as exc:
        raise MalformedMessage(str(exc)) from exc
    return m.decode_tree_items(raw)
