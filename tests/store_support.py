"""Helpers for the object-backend tests: an ObjectStorage per "server" over the real weed and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Coroutine
from typing import Any, TypeVar

from components import Weed
from ferry.hashing import tree_digest
from ferry.store.api import CHUNK_SIZE, INLINE_MAX, Upload
from ferry.store.chunks import ChunkStore
from ferry.store.config import S3Config
from ferry.store.namespace import Namespace
from ferry.store.objects import ObjectStorage, chunk_hash

T = TypeVar("T")


def s3_config(weed: Weed, prefix: str, endpoint: str | None = None, **kw: Any) -> S3Config:
    """The S3 configuration of the test store (``endpoint`` overrides weed's, e.g. a proxy in front)."""
    return S3Config(
        bucket=weed.bucket,
        prefix=prefix,
        endpoint=endpoint or weed.endpoint,
        access_key=weed.access_key,
        secret_key=weed.secret_key,
        region=weed.region,
        **kw,
    )


async def open_storage(
    weed: Weed,
    prefix: str,
    dsn: str,
    *,
    endpoint: str | None = None,
    upload_lease: float = 900.0,
    inline_max: int = INLINE_MAX,
    **s3: Any,
) -> ObjectStorage:
    """One "server": its own database pool and S3 client over the shared database and bucket.
    ``inline_max=-1`` keeps every chunk in the store (tests about objects: damage, sweeping, the store
    going away)."""
    namespace = await Namespace.connect(dsn, max_size=4, upload_lease=upload_lease)
    return ObjectStorage(
        namespace, ChunkStore.from_config(s3_config(weed, prefix, endpoint, **s3)), inline_max=inline_max
    )


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a test coroutine on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def chunks_of(data: bytes) -> list[bytes]:
    """``data`` cut into stored chunks (an empty file is one empty chunk)."""
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]


def digest_of(data: bytes) -> bytes:
    """The file digest the store records for ``data``."""
    return tree_digest("blake3", len(data), [chunk_hash(c) for c in chunks_of(data)])


async def put_file(
    storage: ObjectStorage,
    user: str,
    path: tuple[str, ...],
    data: bytes,
    *,
    overwrite: bool = True,
    quota: int | None = None,
    token: str | None = None,
) -> int:
    """Upload ``data`` through the chunked path (open, write every chunk, commit)."""
    up = await storage.open_upload(
        user,
        path,
        token=token or secrets.token_hex(8),
        size=len(data),
        mode=0o644,
        mtime=1_700_000_000.5,
        overwrite=overwrite,
        quota=quota,
    )
    await write_from(storage, up, data, len(up.held))
    return await storage.commit_upload(up, digest=digest_of(data), overwrite=overwrite, quota=quota)


async def write_from(
    storage: ObjectStorage, up: Upload, data: bytes, first: int, stop: int | None = None
) -> None:
    """Write chunks ``first`` up to ``stop`` (default: all) of ``data`` to upload ``up``."""
    parts = chunks_of(data)
    for i in range(first, len(parts) if stop is None else stop):
        await storage.write_chunk(up, i, parts[i])


async def read_file(storage: ObjectStorage, user: str, path: tuple[str, ...]) -> bytes:
    """The whole file, every chunk verified."""
    f = await storage.open_file(user, path)
    return b"".join([await storage.read_chunk(ref) for ref in f.chunks])


async def object_keys(storage: ObjectStorage, owner: int | None = None) -> set[str]:
    """Keys of the chunk objects in the store (of one owner, or all under the storage's prefix)."""
    keys: set[str] = set()
    async for page in storage.chunks.list_chunks(owner):
        keys.update(o.key for o in page)
    return keys
