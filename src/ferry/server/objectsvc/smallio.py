"""Many small files at once on the object backend: reads, folder creation and stores of a batch.

The services call these three functions; they carry the batch semantics a tree transfer needs
(per-item errors, a quota that stops the batch in order, parents made like ``mkdir -p``). Each is
one call of the store layer's batch API (:meth:`ferry.store.objects.ObjectStorage.read_small_many`:
one query; ``mkdir_many`` and ``store_small_many``: one transaction each, a few statements whatever
the number of items; files of at most 64 KiB keep their bytes in the database).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ferry.errors import RemoteError
from ferry.store.api import CHUNK_SIZE, Parts, SmallBatch, SmallFile, SmallRead

if TYPE_CHECKING:
    from ferry.store.objects import ObjectStorage

__all__ = ["SmallBatch", "SmallFile", "SmallRead", "mkdir_many", "read_small_many", "store_small_many"]


async def read_small_many(
    storage: ObjectStorage, user: str, paths: Sequence[Parts], *, max_size: int
) -> list[SmallRead | RemoteError]:
    """Each path's node and (up to ``max_size``) verified bytes, or its error, in order."""
    # A file above one chunk is never sent inline; the store reads files of at most one chunk.
    return await storage.read_small_many(user, paths, max_size=min(max_size, CHUNK_SIZE))


async def mkdir_many(
    storage: ObjectStorage, user: str, paths: Sequence[Parts], *, mode: int = 0o755
) -> list[RemoteError | None]:
    """``mkdir -p`` of each path (an existing folder is fine): None or the path's error, in order."""
    return await storage.mkdir_many(user, paths, mode=mode)


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
    return await storage.store_small_many(user, items, overwrite=overwrite, quota=quota, parents=parents)
