"""Reading a stored file's chunks on the object backend, for the services that stream or index it.

A file on the object backend is a list of verified 4 MiB chunks (:class:`~ferry.store.api.FileChunks`).
:func:`chunk_data` reads them in order with a few reads in flight (memory: that many chunks, whatever
the file's size); :func:`content_index` builds the file's content-defined chunk index
(:mod:`ferry.cdc`: what ``sync -c`` compares and deltas are made of) from that stream, and caches it
in the server's hash cache under the file's owner and stored BLAKE3 tree digest: a digest names the
content, so an index once built serves every later request of that user for the same bytes, under
any name, until the cache drops it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from ferry import cdc
from ferry.aio import cancel_and_wait
from ferry.server import work
from ferry.store.api import ChunkRef, FileChunks
from ferry.wire.codes import ErrorCode

if TYPE_CHECKING:
    from ferry.server.context import HashCache
    from ferry.store.objects import ObjectStorage

#: Chunk reads in flight ahead of the consumer (each holds one chunk of up to 4 MiB in memory).
AHEAD = 2


async def chunk_data(
    storage: ObjectStorage, chunks: Sequence[ChunkRef], *, ahead: int = AHEAD
) -> AsyncIterator[bytes]:
    """The bytes of ``chunks`` in order, each verified by the store (``corrupt`` if missing or
    damaged), with up to ``ahead`` reads in flight while the caller works on the current one."""
    pending: deque[asyncio.Task[bytes]] = deque()
    refs = iter(chunks)
    try:
        for ref in refs:
            pending.append(asyncio.ensure_future(storage.read_chunk(ref)))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            data = await pending.popleft()
            nxt = next(refs, None)
            if nxt is not None:
                pending.append(asyncio.ensure_future(storage.read_chunk(nxt)))
            yield data
    finally:
        await cancel_and_wait(*pending)  # the caller stopped early (an error, a cancel): drop the reads ahead


def index_key(user: str, digest: bytes, size: int) -> tuple[object, ...]:
    """The hash-cache key of the content index of ``user``'s stored content ``digest`` (never equal
    to a folder file's key, which starts with its device and inode numbers). Per user, as chunks are
    de-duplicated per user: an entry shared by all would tell one user, by how fast a ``sync -c`` or
    a delta answers, whether another holds the same content."""
    return ("object", user, digest, size, cdc.SCHEME)


async def content_index(
    storage: ObjectStorage, user: str, file: FileChunks, cache: HashCache
) -> cdc.ChunkIndex:
    """The content-defined chunk index of ``user``'s stored ``file``, read chunk by chunk (cut and
    hashed in the session's file threads), from ``cache`` when this content was indexed before."""
    node = file.node
    key = index_key(user, node.digest, node.size) if node.digest else None
    if key is not None:
        known = cache.get_index(key)
        if known is not None:
            return known
    indexer = cdc.Indexer()
    async for data in chunk_data(storage, file.chunks):
        await work.in_thread(indexer.feed, data)
    index = indexer.finish()
    if index.size != node.size:  # the chunk list does not add up: the namespace is damaged
        raise ErrorCode.CORRUPT.error(f"a stored file holds {index.size} bytes, not its {node.size}")
    if key is not None and node.size > cdc.MIN_SIZE:  # (one chunk: cheaper to hash again than to cache)
        cache.put_index(key, index)
    return index
