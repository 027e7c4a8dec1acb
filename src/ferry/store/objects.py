"""The object backend: :class:`ObjectStorage` implements :class:`ferry.store.api.ChunkStorage` with chunk
objects in S3 (:mod:`ferry.store.chunks`) and the namespace in PostgreSQL (:mod:`ferry.store.namespace`).

Order of writes, which is what makes a crash at any point harmless:

1. hash the chunk (BLAKE3);
2. claim it in the database (a chunk row, linked to the upload) — from here the sweeper keeps it;
3. if its row says the object is not stored yet, write the object (put-if-absent), then mark it stored;
4. only then acknowledge the chunk (``held`` on resume counts stored chunks only);
5. the commit makes the file in one transaction; readers see the whole new file or the old one.

A crash between 2 and 3 leaves a row whose object is missing and not marked stored: a resume writes
it again. A crash after 3 leaves an object the row knows. An object whose row was swept (the sweeper
crashed between deleting the row and the object) is found by the orphan pass of :meth:`sweep`.

Small chunks (at most :data:`~ferry.store.api.INLINE_MAX` bytes) skip steps 3 and the store
altogether: their bytes go into the chunk row at its claim (the row is stored from the start), and
reads verify them against the hash like any object. Many small files are stored in one transaction
by :meth:`ObjectStorage.store_small_many` and read in one query by
:meth:`ObjectStorage.read_small_many` (tree transfers and sync): a file then costs a share of a few
statements instead of a transaction and a store request of its own.

Space comes back in :meth:`ObjectStorage.sweep`: stale partial uploads are deleted, then chunk rows
nothing references (and untouched for the grace period) are deleted one by one, each followed by its
object; then objects without a row are deleted. See docs/scale-out.md for why this never removes a
chunk that a live file or an upload in progress references, also when a delete and an upload of the
same content race on two servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Final

import blake3

from ferry.errors import ChunkDamaged, RemoteError
from ferry.store.api import (
    CHUNK_SIZE,
    INLINE_MAX,
    ChunkRef,
    ChunkStorage,
    FileChunks,
    Node,
    Parts,
    SmallBatch,
    SmallFile,
    SmallRead,
    SweepReport,
    Upload,
    Usage,
)
from ferry.store.chunks import ChunkStore, verified
from ferry.store.namespace import ChunkGone, Namespace

#: Seconds an unreferenced chunk is kept before the sweeper deletes it: downloads of a file removed
#: meanwhile can finish, and a small file's chunk is safe between its claim and its commit.
DEFAULT_GRACE: Final = 3600.0


def chunk_hash(data: bytes | memoryview) -> bytes:
    """The BLAKE3 hash that names a chunk (the same as a default transfer's chunk hash)."""
    return blake3.blake3(data).digest()


class ObjectStorage:
    """Chunks in an S3 store, namespace in PostgreSQL: one namespace for every server sharing both."""

    exec_supported = False

    def __init__(self, namespace: Namespace, chunks: ChunkStore, *, inline_max: int = INLINE_MAX) -> None:
        self.namespace = namespace
        self.chunks = chunks
        #: Chunks of at most this many bytes are kept in the database (-1: none; benchmarks compare).
        self.inline_max = inline_max

    # -- namespace (delegated) ----------------------------------------------------------------------

    async def stat(self, user: str, path: Parts) -> Node:
        """See :meth:`ferry.store.api.Storage.stat`."""
        return await self.namespace.stat(user, path)

    async def list_dir(self, user: str, path: Parts, *, after: str = "", limit: int = 1000) -> list[Node]:
        """See :meth:`ferry.store.api.Storage.list_dir`."""
        return await self.namespace.list_dir(user, path, after=after, limit=limit)

    async def mkdir(
        self, user: str, path: Parts, *, parents: bool = False, exist_ok: bool = False, mode: int = 0o755
    ) -> None:
        """See :meth:`ferry.store.api.Storage.mkdir`."""
        await self.namespace.mkdir(user, path, parents=parents, exist_ok=exist_ok, mode=mode)

    async def remove(self, user: str, path: Parts, *, recursive: bool = False) -> None:
        """See :meth:`ferry.store.api.Storage.remove`."""
        await self.namespace.remove(user, path, recursive=recursive)

    async def rename(self, user: str, src: Parts, dst: Parts, *, overwrite: bool = True) -> None:
        """See :meth:`ferry.store.api.Storage.rename`."""
        await self.namespace.rename(user, src, dst, overwrite=overwrite)

    async def set_attrs(
        self, user: str, path: Parts, *, mtime: float | None = None, mode: int | None = None
    ) -> None:
        """See :meth:`ferry.store.api.Storage.set_attrs`."""
        await self.namespace.set_attrs(user, path, mtime=mtime, mode=mode)

    async def usage(self, user: str) -> Usage:
        """See :meth:`ferry.store.api.ChunkStorage.usage`."""
        return await self.namespace.usage(user)

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
        """See :meth:`ferry.store.api.ChunkStorage.open_upload`."""
        return await self.namespace.open_upload(
            user, path, token=token, size=size, mode=mode, mtime=mtime, overwrite=overwrite, quota=quota
        )

    async def write_chunk(self, upload: Upload, index: int, data: bytes) -> ChunkRef:
        """See :meth:`ferry.store.api.ChunkStorage.write_chunk` (the write order is in the module docstring)."""
        end = index * CHUNK_SIZE + len(data)
        # Every chunk but the last is whole: chunk i always starts at i * CHUNK_SIZE (resume, ranges).
        if (
            index < 0
            or len(data) > CHUNK_SIZE
            or end > upload.size
            or (end < upload.size and len(data) < CHUNK_SIZE)
        ):
            raise ValueError(f"chunk {index} of {len(data)} bytes does not fit an upload of {upload.size}")
        inline = bytes(data) if len(data) <= self.inline_max else None
        ref = await self.namespace.claim_chunk(upload, index, chunk_hash(data), len(data), inline)
        if not ref.stored:
            await self.chunks.put(ref, data)
            await self.namespace.mark_stored(ref)
            ref = replace(ref, stored=True)
        self._held(upload, index, ref)
        return ref

    async def link_chunk(self, upload: Upload, index: int, ref: ChunkRef) -> ChunkRef | None:
        """Make chunk ``index`` of ``upload`` the stored chunk ``ref`` of the same user without its
        bytes (a delta upload whose new version holds a piece of the old one at the same place):
        one database statement, no read and no write of the object. None if that chunk is not
        stored any more (swept after its file went): the caller writes the bytes instead."""
        end = index * CHUNK_SIZE + ref.size
        if (
            ref.owner != upload.owner
            or index < 0
            or end > upload.size
            or (end < upload.size and ref.size != CHUNK_SIZE)
        ):
            raise ValueError(f"chunk {ref.id} of {ref.size} bytes does not fit chunk {index} of this upload")
        claimed = await self.namespace.claim_chunk(upload, index, ref.hash, ref.size)
        if not claimed.stored:
            return None
        self._held(upload, index, claimed)
        return claimed

    @staticmethod
    def _held(upload: Upload, index: int, ref: ChunkRef) -> None:
        """Count a stored chunk in ``upload.held`` (the stored prefix, as a resume sees it)."""
        if index == len(upload.held):
            upload.held.append(ref)
        elif index < len(upload.held):
            upload.held[index] = ref

    async def commit_upload(
        self, upload: Upload, *, digest: bytes, overwrite: bool, quota: int | None
    ) -> int:
        """See :meth:`ferry.store.api.ChunkStorage.commit_upload`."""
        return await self.namespace.commit_upload(upload, digest=digest, overwrite=overwrite, quota=quota)

    async def discard_upload(self, upload: Upload) -> None:
        """See :meth:`ferry.store.api.ChunkStorage.discard_upload`."""
        await self.namespace.discard_upload(upload)

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
        """See :meth:`ferry.store.api.Storage.store_small`: a batch of one (one transaction of five
        statements for a file kept inline; a larger one also pays its object's put first)."""
        batch = await self.store_small_many(
            user, [SmallFile(path, data, mode, mtime)], overwrite=overwrite, quota=quota
        )
        result = batch.results[0]
        if isinstance(result, RemoteError):
            raise result
        return result

    # -- reads --------------------------------------------------------------------------------------

    async def open_file(self, user: str, path: Parts) -> FileChunks:
        """See :meth:`ferry.store.api.ChunkStorage.open_file`."""
        return await self.namespace.open_file(user, path)

    async def read_chunk(self, ref: ChunkRef) -> bytes:
        """See :meth:`ferry.store.api.ChunkStorage.read_chunk` (an inline chunk's bytes came with its
        ref; they are verified the same way)."""
        if ref.data is not None:
            return verified(ref, ref.data, "the database")
        return await self.chunks.get(ref)

    # -- many small files at once -------------------------------------------------------------------

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
        """See :meth:`ferry.store.api.ChunkStorage.store_small_many`. Files over ``inline_max`` are
        written to the store first (concurrently; their rows claimed in one statement), then every
        file of the batch is committed in one transaction."""
        if any(len(it.data) > CHUNK_SIZE for it in items):
            raise ValueError("store_small_many is for files of at most one chunk")
        if not items:
            return SmallBatch([])
        owner = await self.namespace.owner_id(user)
        hashes = [chunk_hash(it.data) for it in items]
        big = {h: it.data for h, it in zip(hashes, items, strict=True) if len(it.data) > self.inline_max}
        for _ in range(3):  # a claimed chunk can only be swept before its commit after a grace period
            refs: dict[bytes, ChunkRef] = {}
            if big:
                refs = await self.namespace.claim_chunks(owner, [(h, len(d), None) for h, d in big.items()])
                todo = [r for r in refs.values() if not r.stored]
                failures = await asyncio.gather(
                    *(self.chunks.put(r, big[r.hash]) for r in todo), return_exceptions=True
                )
                for failure in failures:
                    if isinstance(failure, BaseException):
                        raise failure
                if todo:
                    await self.namespace.mark_stored_many(todo)
            try:
                return await self.namespace.commit_small_many(
                    user, items, hashes, refs, inline_max=self.inline_max, overwrite=overwrite,
                    quota=quota, parents=parents, dir_mode=dir_mode,
                )  # fmt: skip
            except ChunkGone:
                continue
        raise AssertionError("a chunk was swept three times between its claim and its commit")

    async def mkdir_many(
        self, user: str, paths: Sequence[Parts], *, mode: int = 0o755
    ) -> list[RemoteError | None]:
        """See :meth:`ferry.store.api.ChunkStorage.mkdir_many`."""
        return await self.namespace.mkdir_many(user, paths, mode=mode)

    async def read_small_many(
        self, user: str, paths: Sequence[Parts], *, max_size: int = INLINE_MAX
    ) -> list[SmallRead | RemoteError]:
        """See :meth:`ferry.store.api.ChunkStorage.read_small_many`: one query; the bytes of inline
        chunks come with it, the others are fetched from the store concurrently."""
        if max_size > CHUNK_SIZE:
            raise ValueError("read_small_many reads files of at most one chunk")
        found = await self.namespace.read_small_many(user, paths, max_size=max_size)
        out: list[SmallRead | RemoteError] = []
        fetch: list[tuple[int, Node, ChunkRef]] = []
        for entry in found:
            if isinstance(entry, RemoteError):
                out.append(entry)
                continue
            node, ref = entry
            if ref is None:
                out.append(SmallRead(node, None))
            elif ref.data is None:
                fetch.append((len(out), node, ref))
                out.append(SmallRead(node, None))  # replaced below
            else:
                try:
                    out.append(SmallRead(node, verified(ref, ref.data, "the database")))
                except ChunkDamaged as exc:
                    out.append(exc)
        got = await asyncio.gather(*(self.chunks.get(ref) for _, _, ref in fetch), return_exceptions=True)
        for (i, node, _), data in zip(fetch, got, strict=True):
            if isinstance(data, ChunkDamaged):
                out[i] = data
            elif isinstance(data, BaseException):
                raise data  # the store is away: the whole read fails, as one file's read would
            else:
                out[i] = SmallRead(node, data)
        return out

    # -- upkeep -------------------------------------------------------------------------------------

    async def sweep(
        self, *, partial_max_age: float, grace: float = DEFAULT_GRACE, pages: int = 100
    ) -> SweepReport:
        """Give space back (see the module docstring); at most ``pages`` pages of 500 chunks per call."""
        uploads = await self.namespace.expire_uploads(partial_max_age) if partial_max_age > 0 else 0
        chunks = objects = nbytes = 0
        for _ in range(pages):
            refs = await self.namespace.unreferenced_chunks(grace)
            for ref in refs:
                # Row first, object second: once the row is gone no new reference can reach this key
                # (a new upload of the same bytes gets a new row and key).
                forgotten = await self.namespace.forget_chunk(ref, grace)
                if forgotten == "kept":
                    continue
                chunks += 1
                nbytes += ref.size
                if forgotten == "object":  # an inline chunk has none
                    await self.chunks.delete(self.chunks.key(ref))
                    objects += 1
            if len(refs) < 500:
                break
        orphans, orphan_bytes = await self.sweep_orphans(grace)
        return SweepReport(uploads, chunks, objects + orphans, nbytes + orphan_bytes)

    async def sweep_orphans(self, grace: float) -> tuple[int, int]:
        """Delete chunk objects that have no row and were written more than ``grace`` seconds ago (a
        sweep that stopped between deleting a row and its object). An object is only ever written after
        its row exists, so a missing row means the chunk was swept."""
        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=grace)
        count = nbytes = 0
        # Closed here whatever happens: a listing left suspended (the database failing between two
        # pages) would hold obstore's stream until the garbage collector finalised it outside the
        # runtime it belongs to (seen once as a Rust panic at a server's exit).
        async with contextlib.aclosing(self.chunks.list_chunks()) as pages:
            async for page in pages:
                ids = {o.key: self.chunks.parse_key(o.key) for o in page}
                known = await self.namespace.known_chunk_ids([i for i in ids.values() if i is not None])
                for obj in page:
                    cid = ids[obj.key]
                    if cid is not None and cid not in known and obj.last_modified < cutoff:
                        await self.chunks.delete(obj.key)
                        count += 1
                        nbytes += obj.size
        return count, nbytes

    async def close(self) -> None:
        """Close the database pool (the S3 client holds no connection that needs closing)."""
        await self.namespace.close()


if TYPE_CHECKING:  # mypy proves that ObjectStorage implements the interface

    def _implements(storage: ObjectStorage) -> ChunkStorage:
        return storage
