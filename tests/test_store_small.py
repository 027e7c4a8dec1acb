"""Small files on the object backend over the real SeaweedFS and PostgreSQL: inline chunks (bytes in
the chunk row, verified on read, de-duplicated, swept, counted in quotas like objects), the schema
migration that adds them, and the batch calls (``store_small_many``, ``mkdir_many``,
``read_small_many``) with per-item failures, the quota stop, and batches racing on two "servers"."""

from __future__ import annotations

import asyncio
import os

import pytest

from components import Weed, run_sql
from ferry.errors import (
    AlreadyExists,
    ChunkDamaged,
    DiskFull,
    IsADirectory,
    NotADirectory,
    NotFound,
    PathRefused,
    RemoteError,
)
from ferry.store.api import CHUNK_SIZE, INLINE_MAX, SmallFile, SmallRead
from ferry.store.objects import chunk_hash
from ferry.store.schema import SCHEMA_VERSION
from store_support import digest_of, object_keys, open_storage, put_file, read_file, run


async def sql(statements: str, dsn: str) -> list[str]:
    """``components.run_sql`` from a test coroutine (it runs its own event loop: in a thread)."""
    return await asyncio.to_thread(run_sql, statements, dsn)


def small(path: str, data: bytes, mtime: float = 1_700_000_000.5) -> SmallFile:
    """A batch item at ``path`` ('/'-separated)."""
    return SmallFile(tuple(path.split("/")), data, 0o640, mtime)


def test_small_chunks_live_in_the_database_and_read_back_verified(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    tail = os.urandom(1000)
    big = os.urandom(CHUNK_SIZE) + tail
    edge, over = os.urandom(INLINE_MAX), os.urandom(INLINE_MAX + 1)

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await st.store_small("alice", ("s",), b"4 KiB or so", mode=0o600, mtime=2.0, overwrite=True, quota=None)
            await st.store_small("alice", ("edge",), edge, mode=0o600, mtime=2.0, overwrite=True, quota=None)
            await st.store_small("alice", ("over",), over, mode=0o600, mtime=2.0, overwrite=True, quota=None)
            await put_file(st, "alice", ("big",), big)  # its 1000-byte last chunk is inline too
            # Objects only for the chunks above the limit: 'over' and the first chunk of 'big'.
            assert len(await object_keys(st)) == 2
            for name, data in [("s", b"4 KiB or so"), ("edge", edge), ("over", over), ("big", big)]:
                f = await st.open_file("alice", (name,))
                assert [c.data is not None for c in f.chunks] == [len(c) <= INLINE_MAX for c in [data[:CHUNK_SIZE], data[CHUNK_SIZE:]] if c]
                assert f.node.digest == digest_of(data)
                assert await read_file(st, "alice", (name,)) == data
            usage = await st.usage("alice")
            assert (usage.used, usage.files) == (11 + len(edge) + len(over) + len(big), 4)
        finally:
            await st.close()

    run(main())


def test_damaged_inline_bytes_are_detected_on_read(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await st.store_small("alice", ("f",), b"precious bytes", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            await st.store_small("alice", ("g",), b"other bytes", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            # Same size, other bytes: only the hash can tell.
            await sql("UPDATE chunks SET data = 'precious bytez'::bytea WHERE data = 'precious bytes'::bytea", pg_dsn)
            (ref,) = (await st.open_file("alice", ("f",))).chunks
            with pytest.raises(ChunkDamaged) as damaged:
                await st.read_chunk(ref)
            assert damaged.value.code == "corrupt" and "in the database does not match" in str(damaged.value)
            got = await st.read_small_many("alice", [("f",), ("g",)])
            assert isinstance(got[0], ChunkDamaged)
            assert isinstance(got[1], SmallRead) and got[1].data == b"other bytes"
        finally:
            await st.close()

    run(main())


def test_inline_chunks_are_deduplicated_swept_and_counted_in_quotas(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    data = os.urandom(3000)

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await st.store_small("alice", ("one",), data, mode=0o644, mtime=1.0, overwrite=True, quota=None)
            batch = await st.store_small_many(
                "alice", [small("two", data), small("three", data)], overwrite=True, quota=None
            )
            assert batch.results == [0, 0] and (batch.stored, batch.bytes, batch.delta) == (2, 6000, 6000)
            await st.store_small("bob", ("one",), data, mode=0o644, mtime=1.0, overwrite=True, quota=None)
            alice = await st.namespace.owner_id("alice")
            rows = await sql("SELECT owner_id || ':' || octet_length(data) FROM chunks ORDER BY owner_id", pg_dsn)
            assert rows == [f"{alice}:3000", f"{await st.namespace.owner_id('bob')}:3000"]  # one per user
            assert await object_keys(st) == set()
            # Quotas count inline files like any: a batch that would exceed stops there.
            with pytest.raises(DiskFull):
                await st.store_small("alice", ("four",), data, mode=0o644, mtime=1.0, overwrite=True, quota=10_000)
            # The sweeper keeps the chunk while a file references it, and removes the row after.
            await st.remove("alice", ("one",))
            await st.remove("alice", ("two",))
            assert (await st.sweep(partial_max_age=3600, grace=0)).chunks == 0
            assert await read_file(st, "alice", ("three",)) == data
            await st.remove("alice", ("three",))
            report = await st.sweep(partial_max_age=3600, grace=0)
            assert (report.chunks, report.objects, report.bytes) == (1, 0, 3000)
            assert (await st.usage("alice")).used == 0
            # The same bytes stored again after the sweep: a fresh row, readable.
            await st.store_small("alice", ("again",), data, mode=0o644, mtime=1.0, overwrite=True, quota=None)
            assert await read_file(st, "alice", ("again",)) == data
        finally:
            await st.close()

    run(main())


def test_existing_databases_migrate_and_their_objects_stay_readable(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn, inline_max=-1)
        try:
            await st.store_small("alice", ("old",), b"stored as an object", mode=0o644, mtime=1.0, overwrite=True, quota=None)
        finally:
            await st.close()
        # Back to what version 1 was: no data column.
        await sql("ALTER TABLE chunks DROP COLUMN data;\nUPDATE ferry_meta SET value = '1'", pg_dsn)
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            assert await read_file(st, "alice", ("old",)) == b"stored as an object"
            # The same bytes again: the row that has an object keeps it (de-duplication).
            await st.store_small("alice", ("new",), b"stored as an object", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            assert (await st.open_file("alice", ("new",))).chunks[0].data is None
            await st.store_small("alice", ("tiny",), b"inline", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            assert (await st.open_file("alice", ("tiny",))).chunks[0].data == b"inline"
        finally:
            await st.close()
        assert await sql("SELECT value FROM ferry_meta WHERE key = 'schema_version'", pg_dsn) == [str(SCHEMA_VERSION)]

    run(main())


def test_batch_reports_each_items_failure_and_stores_the_rest(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    big = os.urandom(INLINE_MAX + 500)  # an object in the store, in the same batch

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await st.mkdir("alice", ("d", "folder"), parents=True)
            await st.store_small("alice", ("d", "kept"), b"old", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            await st.store_small("alice", ("d", "file"), b"a file", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            items = [
                small("d/new", b"new bytes"),
                small("d/kept", b"would replace"),  # exists: not overwrite
                small("d/folder", b"x"),  # a folder is there
                small("d/file/under", b"x"),  # a file is on the way
                small("nowhere/f", b"x"),  # no parents
                SmallFile((), b"x"),  # the home
                SmallFile(("d", ".."), b"x"),  # a path the rules refuse
                small("d/big", big),
                small("d/twice", b"first"),
                small("d/twice", b"second"),  # the same path again: exists (no overwrite)
            ]
            batch = await st.store_small_many("alice", items, overwrite=False, quota=None)
            kinds = [r if isinstance(r, int) else type(r) for r in batch.results]
            assert kinds == [
                0, AlreadyExists, IsADirectory, NotADirectory, NotFound, PathRefused, PathRefused, 0, 0,
                AlreadyExists,
            ]  # fmt: skip
            assert batch.fatal is None and batch.stored == 3 and batch.delta == 9 + len(big) + 5
            assert [i for i, _ in batch.failed] == [1, 2, 3, 4, 5, 6, 9]
            assert await read_file(st, "alice", ("d", "kept")) == b"old"
            f = await st.stat("alice", ("d", "new"))
            assert (f.size, f.mode, f.mtime, f.digest) == (9, 0o640, 1_700_000_000.5, digest_of(b"new bytes"))
            # With overwrite and parents: replaced sizes per item, missing folders made, the later of
            # two items at one path wins.
            batch = await st.store_small_many(
                "alice",
                [small("d/kept", b"replaced"), small("a/b/c/f", b"deep"), small("d/twice", b"2nd"), small("d/twice", b"3rd!")],
                overwrite=True,
                quota=None,
                parents=True,
            )
            assert batch.results == [3, 0, 5, 3]
            assert await read_file(st, "alice", ("d", "twice")) == b"3rd!"
            assert (await st.stat("alice", ("a", "b"))).kind == "dir"
            usage = await st.usage("alice")
            assert (usage.used, usage.files) == (len(b"replaced") + 6 + 9 + len(big) + 4 + 4, 6)
            # Reads: one call, per path its bytes or its error; big files without bytes beyond max_size.
            got = await st.read_small_many(
                "alice", [("d", "new"), ("d", "big"), ("d",), ("d", "none"), ("d", "new", "x"), ("a", "b", "c", "f")]
            )
            assert isinstance(got[0], SmallRead) and got[0].data == b"new bytes" and got[0].node.size == 9
            assert isinstance(got[1], SmallRead) and got[1].data is None and got[1].node.size == len(big)
            assert [type(g) for g in got[2:5]] == [IsADirectory, NotFound, NotADirectory]
            assert isinstance(got[5], SmallRead) and got[5].data == b"deep"
            fetched = await st.read_small_many("alice", [("d", "big")], max_size=CHUNK_SIZE)
            assert isinstance(fetched[0], SmallRead) and fetched[0].data == big  # from the store
        finally:
            await st.close()

    run(main())


def test_quota_stops_a_batch_in_order_and_keeps_what_came_before(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await st.store_small("alice", ("r",), b"x" * 500, mode=0o644, mtime=1.0, overwrite=True, quota=None)
            items = [small(f"f{i}", bytes(300)) for i in range(5)] + [small("r", b"x" * 100)]
            # 500 used + 300 + 300 fits 1,200; the third 300 does not; nothing after it is stored
            # (not even the replacement of 'r', which would have freed space: order decides).
            batch = await st.store_small_many("alice", items, overwrite=True, quota=1200)
            assert isinstance(batch.fatal, DiskFull) and batch.fatal.code == "quota"
            assert batch.results[:2] == [0, 0] and all(r is batch.fatal for r in batch.results[2:])
            assert (await st.usage("alice")).used == 1100
            assert [n.name for n in await st.list_dir("alice", ())] == ["f0", "f1", "r"]
        finally:
            await st.close()

    run(main())


def test_mkdir_many_makes_parents_and_reports_files_in_the_way(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await st.mkdir("alice", ("have",))
            await st.store_small("alice", ("file",), b"x", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            got = await st.mkdir_many(
                "alice",
                [("have",), ("a", "b", "c"), ("a", "b"), ("a", "x"), ("file",), ("file", "y"), (), ("a", "")],
                mode=0o750,
            )
            assert [None if g is None else type(g) for g in got] == [
                None, None, None, None, AlreadyExists, NotADirectory, None, PathRefused,
            ]  # fmt: skip
            assert (await st.stat("alice", ("a", "b", "c"))).mode == 0o750
            assert [n.name for n in await st.list_dir("alice", ("a",))] == ["b", "x"]
        finally:
            await st.close()

    run(main())


def test_batches_racing_on_two_servers_create_each_path_once(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    """Two "servers" store overlapping batches without overwrite while a third makes folders with
    some of the same names: every name ends as exactly one thing, each batch item either stored or
    refused with ``exists``, usage exact."""
    names = [f"n{i:03d}" for i in range(200)]

    async def main() -> None:
        a = await open_storage(weed, s3_prefix, pg_dsn)
        b = await open_storage(weed, s3_prefix, pg_dsn)
        c = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await a.mkdir("alice", ("t",))
            one = [small(f"t/{n}", b"A" * 10) for n in names[:150]]
            two = [small(f"t/{n}", b"B" * 20) for n in reversed(names[50:])]
            dirs = [("t", n) for n in names[::7]]
            ra, rb, rc = await asyncio.gather(
                a.store_small_many("alice", one, overwrite=False, quota=None),
                b.store_small_many("alice", two, overwrite=False, quota=None),
                c.mkdir_many("alice", dirs),
            )
            won: dict[str, str] = {}
            for label, items, batch in [("A", one, ra), ("B", two, rb)]:
                for item, result in zip(items, batch.results, strict=True):
                    if isinstance(result, RemoteError):
                        assert isinstance(result, AlreadyExists | IsADirectory), result
                    else:
                        assert item.path[-1] not in won
                        won[item.path[-1]] = label
            for (_, n), result in zip(dirs, rc, strict=True):
                if result is None:
                    assert won.get(n) is None
                    won[n] = "dir"
                else:
                    assert isinstance(result, AlreadyExists)
            listed = {}
            after = ""
            for _ in range(10):
                page = await a.list_dir("alice", ("t",), after=after, limit=100)
                if not page:
                    break
                listed.update({n.name: n for n in page})
                after = page[-1].name
            assert set(listed) == set(won) == set(names)
            for n, node in listed.items():
                assert {"A": ("file", 10), "B": ("file", 20), "dir": ("dir", 0)}[won[n]] == (node.kind, node.size)
            usage = await a.usage("alice")
            files = [n for n in listed.values() if n.kind == "file"]
            assert (usage.used, usage.files) == (sum(n.size for n in files), len(files))
        finally:
            for s in (a, b, c):
                await s.close()

    run(main(), timeout=90)


def test_an_inline_claim_fills_a_row_whose_object_is_still_being_written(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    """Server A (objects only) has claimed a chunk row and not written its object yet when server B
    stores the same bytes as a small file: B's row holds the bytes and is readable at once; A's late
    object is one nothing needs, which the sweeper's orphan pass removes once the row is gone."""
    data = os.urandom(5000)

    async def main() -> None:
        a = await open_storage(weed, s3_prefix, pg_dsn, inline_max=-1)
        b = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            owner = await a.namespace.owner_id("alice")
            ref = await a.namespace.claim_loose_chunk(owner, chunk_hash(data), len(data))
            assert not ref.stored
            await b.store_small("alice", ("f",), data, mode=0o644, mtime=1.0, overwrite=True, quota=None)
            (inline,) = (await b.open_file("alice", ("f",))).chunks
            assert inline.id == ref.id and inline.data == data  # the same row, now with the bytes
            await a.chunks.put(ref, data)  # A goes on: its object arrives late
            await a.namespace.mark_stored(ref)
            assert await read_file(a, "alice", ("f",)) == data
            await b.remove("alice", ("f",))
            report = await a.sweep(partial_max_age=3600, grace=0)
            # The row went as an inline one (no object delete for it); the orphan pass found A's object.
            assert (report.chunks, report.objects) == (1, 1)
            assert await object_keys(a) == set()
        finally:
            await a.close()
            await b.close()

    run(main())
