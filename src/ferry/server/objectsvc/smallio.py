"""Many small files at once on the object backend: reads, folder creation and stores of a batch.

The services call these three functions; they carry the batch semantics a tree transfer needs
(per-item errors, a quota that stops the batch in order, parents made like ``mkdir -p``). This
version makes one store call per item (a few concurrent reads); the store layer's batch calls
replace it (one query or transaction per batch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ferry.errors import NotFound, RemoteError
from ferry.store.api import Node, Parts
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.store.objects import ObjectStorage

#: Reads in flight at once for one call.
READS = 16


@dataclass(frozen=True, slots=True)
class SmallFile:
    """A small file to store: home-relative ``path``, its bytes (at most one chunk), mode, mtime."""

    path: Parts
    data: bytes
    mode: int = 0o644
    mtime: float = 0.0


@dataclass(frozen=True, slots=True)
class SmallRead:
    """A file read: its node, and its bytes when it is no larger than the read's ``max_size``."""

    node: Node
    data: bytes | None


@dataclass(slots=True)
class SmallBatch:
    """What a batch store did: per item the size of the file it replaced or its error; ``fatal`` the
    quota error that stopped the batch (that item and every later one were not stored)."""

    results: list[int | RemoteError] = field(default_factory=list)
    fatal: RemoteError | None = None
    stored: int = 0
    bytes: int = 0
    delta: int = 0


async def read_small_many(
    storage: ObjectStorage, user: str, paths: Sequence[Parts], *, max_size: int
) -> list[SmallRead | RemoteError]:
    """Each path's node and (up to ``max_size``) verified bytes, or its error, in order."""
    gate = asyncio.Semaphore(READS)

    async def one(path: Parts) -> SmallRead | RemoteError:
        async with gate:
            try:
                file = await storage.open_file(user, path)
                if file.node.size > max_size:
                    return SmallRead(file.node, None)
                parts = [await storage.read_chunk(ref) for ref in file.chunks]
                return SmallRead(file.node, b"".join(parts))
            except RemoteError as exc:
                return exc

    return list(await asyncio.gather(*(one(p) for p in paths)))


async def mkdir_many(
    storage: ObjectStorage, user: str, paths: Sequence[Parts], *, mode: int = 0o755
) -> list[RemoteError | None]:
    """``mkdir -p`` of each path (an existing folder is fine): None or the path's error, in order."""
    out: list[RemoteError | None] = []
    for path in paths:
        try:
            await storage.mkdir(user, path, parents=True, exist_ok=True, mode=mode)
            out.append(None)
        except RemoteError as exc:
            out.append(exc)
    return out


async def store_small_many(
    storage: ObjectStorage,
    user: str,
    items: Sequence[SmallFile],
    *,
    overwrite: bool,
    quota: int | None,
    parents: bool = False,
) -> SmallBatch:
    """Store ``items`` in order (missing parent folders made with ``parents``); a quota error stops
    the batch there."""
    out = SmallBatch()
    for it in items:
        if out.fatal is not None:
            out.results.append(out.fatal)
            continue
        try:
            try:
                replaced = await _store(storage, user, it, overwrite, quota)
            except NotFound:
                if not parents or len(it.path) < 2:
                    raise
                await storage.mkdir(user, it.path[:-1], parents=True, exist_ok=True)
                replaced = await _store(storage, user, it, overwrite, quota)
        except RemoteError as exc:
            if exc.code == ErrorCode.QUOTA:
                out.fatal = exc
            out.results.append(exc)
            continue
        out.results.append(replaced)
        out.stored += 1
        out.bytes += len(it.data)
        out.delta += len(it.data) - replaced
    return out


async def _store(storage: ObjectStorage, user: str, it: SmallFile, overwrite: bool, quota: int | None) -> int:
    return await storage.store_small(
        user, it.path, it.data, mode=it.mode, mtime=it.mtime, overwrite=overwrite, quota=quota
    )
