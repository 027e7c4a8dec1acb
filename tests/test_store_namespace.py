"""The object backend's namespace over the real PostgreSQL and SeaweedFS: the tree, errors, races
between two "servers" (two pools), atomic rename, schema versions."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from components import Weed, run_sql
from ferry.errors import (
    AlreadyExists,
    DirectoryNotEmpty,
    IsADirectory,
    NotADirectory,
    NotFound,
    PathRefused,
    RemoteError,
    StoreUnavailable,
)
from ferry.store.namespace import Namespace
from ferry.store.schema import SCHEMA_VERSION
from store_support import object_keys, open_storage, put_file, read_file, run


def test_tree_operations_and_their_errors(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            home = await st.stat("alice", ())
            assert (home.kind, home.name, home.mode) == ("dir", "", 0o700)
            await st.mkdir("alice", ("a",))
            await st.mkdir("alice", ("a", "b", "c"), parents=True)
            await st.mkdir("alice", ("a",), exist_ok=True)
            with pytest.raises(AlreadyExists):
                await st.mkdir("alice", ("a",))
            with pytest.raises(NotFound):
                await st.mkdir("alice", ("x", "y"))  # no parents=True
            await put_file(st, "alice", ("a", "f.txt"), b"hello")
            with pytest.raises(NotADirectory):
                await st.stat("alice", ("a", "f.txt", "z"))
            with pytest.raises(AlreadyExists):
                await st.mkdir("alice", ("a", "f.txt"), exist_ok=True)  # a file is not a folder
            f = await st.stat("alice", ("a", "f.txt"))
            assert (f.kind, f.size, f.mode, f.mtime) == ("file", 5, 0o644, 1_700_000_000.5)
            assert [n.name for n in await st.list_dir("alice", ("a",))] == ["b", "f.txt"]
            # Rename a file and a folder; the folder's content moves with it.
            await st.rename("alice", ("a", "f.txt"), ("a", "b", "g.txt"))
            await st.rename("alice", ("a", "b"), ("moved",))
            assert await read_file(st, "alice", ("moved", "g.txt")) == b"hello"
            with pytest.raises(NotFound):
                await st.stat("alice", ("a", "b"))
            with pytest.raises(RemoteError) as into_itself:
                await st.rename("alice", ("moved",), ("moved", "c", "inner"))
            assert into_itself.value.code == "invalid"
            await st.mkdir("alice", ("a", "b"))
            with pytest.raises(AlreadyExists):
                await st.rename("alice", ("moved",), ("a",), overwrite=False)
            with pytest.raises(IsADirectory):
                await st.rename("alice", ("moved", "g.txt"), ("a", "b"))
            with pytest.raises(DirectoryNotEmpty):
                await st.rename("alice", ("moved",), ("a",))  # 'a' holds 'b'
            await st.rename("alice", ("moved",), ("a", "b"))  # an empty folder is replaced
            with pytest.raises(DirectoryNotEmpty):
                await st.remove("alice", ("a",))
            with pytest.raises(PathRefused):
                await st.remove("alice", ())
            await st.set_attrs("alice", ("a", "b", "g.txt"), mtime=12.25, mode=0o4755)
            g = await st.stat("alice", ("a", "b", "g.txt"))
            assert (g.mtime, g.mode) == (12.25, 0o755)  # set-id bits dropped, as the jail does
            assert (await st.usage("alice")).used == 5
            await st.remove("alice", ("a",), recursive=True)
            assert await st.list_dir("alice", ()) == []
            usage = await st.usage("alice")
            assert (usage.used, usage.files) == (0, 0)
            # Another user sees nothing of alice's.
            assert await st.list_dir("bob", ()) == []
        finally:
            await st.close()

    run(main())


def test_listing_pages_in_code_point_order(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    names = [f"n{i:02d}" for i in range(23)] + ["B", "a", "é", "Z"]

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            for name in names:
                await st.mkdir("alice", (name,))
            seen: list[str] = []
            after = ""
            for _ in range(20):  # bounded
                page = await st.list_dir("alice", (), after=after, limit=7)
                if not page:
                    break
                assert len(page) <= 7
                seen += [n.name for n in page]
                after = page[-1].name
            assert seen == sorted(names)  # Python's order is code-point order, as the store's
        finally:
            await st.close()

    run(main())


def test_two_servers_creating_one_path_exactly_one_wins(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    async def main() -> None:
        a = await open_storage(weed, s3_prefix, pg_dsn)
        b = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await a.mkdir("alice", ("d",))
            await b.stat("alice", ("d",))
            for i in range(15):
                results = await asyncio.gather(
                    a.mkdir("alice", ("d", f"x{i}")), b.mkdir("alice", ("d", f"x{i}")), return_exceptions=True
                )
                assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "NoneType"], results
                # Two uploads racing to create one new file (no overwrite): one file, one clear error.
                results = await asyncio.gather(
                    put_file(a, "alice", ("d", f"f{i}"), b"from a", overwrite=False),
                    put_file(b, "alice", ("d", f"f{i}"), b"from b", overwrite=False),
                    return_exceptions=True,
                )
                assert sorted(type(r).__name__ for r in results) == ["AlreadyExists", "int"], results
                assert await read_file(a, "alice", ("d", f"f{i}")) in (b"from a", b"from b")
            usage = await b.usage("alice")
            assert (usage.used, usage.files) == (15 * 6, 15)  # the losers left no trace in the usage
        finally:
            await a.close()
            await b.close()

    run(main())


def test_rename_through_another_server_moves_no_data(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    data = os.urandom(5 << 20)  # two chunks

    async def main() -> None:
        a = await open_storage(weed, s3_prefix, pg_dsn)
        b = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            await a.mkdir("alice", ("src",))
            await put_file(a, "alice", ("src", "big"), data)
            before = await a.open_file("alice", ("src", "big"))
            keys = await object_keys(a)
            await b.rename("alice", ("src",), ("dst",))
            # Visible through the other server at once, with the same chunks: nothing was copied.
            after = await a.open_file("alice", ("dst", "big"))
            assert after.chunks == before.chunks
            assert await object_keys(a) == keys
            assert await read_file(a, "alice", ("dst", "big")) == data
        finally:
            await a.close()
            await b.close()

    run(main())


def test_schema_is_versioned_and_a_newer_one_refused(pg_dsn: str) -> None:
    async def main() -> None:
        ns = await Namespace.connect(pg_dsn)
        await ns.close()
        ns = await Namespace.connect(pg_dsn)  # a second server: nothing to migrate
        await ns.close()

    run(main())
    assert run_sql("SELECT value FROM ferry_meta", pg_dsn) == [str(SCHEMA_VERSION)]
    run_sql(f"UPDATE ferry_meta SET value = '{SCHEMA_VERSION + 1}'", pg_dsn)
    with pytest.raises(StoreUnavailable, match="newer than this ferry"):
        run(Namespace.connect(pg_dsn))


def test_database_constraints_back_the_guarantees(pg_dsn: str) -> None:
    """The invariants hold in the database itself, not only in our code paths."""

    async def main() -> None:
        ns = await Namespace.connect(pg_dsn)
        await ns.close()
        conn = await asyncpg.connect(pg_dsn)
        try:
            owner = await conn.fetchval("INSERT INTO owners (name) VALUES ('u') RETURNING id")
            home = await conn.fetchval(
                "INSERT INTO nodes (owner_id, name, kind, mtime_ns, mode) VALUES ($1, '', 'd', 0, 448) RETURNING id",
                owner,
            )
            insert = "INSERT INTO nodes (owner_id, parent_id, name, kind, mtime_ns, mode) VALUES ($1, $2, 'x', 'd', 0, 448)"
            await conn.execute(insert, owner, home)
            with pytest.raises(asyncpg.exceptions.UniqueViolationError):
                await conn.execute(insert, owner, home)  # one name per folder
            chunk = await conn.fetchval(
                "INSERT INTO chunks (owner_id, hash, size) VALUES ($1, '\\x00', 1) RETURNING id", owner
            )
            f = await conn.fetchval(
                "INSERT INTO nodes (owner_id, parent_id, name, kind, mtime_ns, mode) VALUES ($1, $2, 'f', 'f', 0, 420) RETURNING id",
                owner,
                home,
            )
            await conn.execute("INSERT INTO file_chunks VALUES ($1, 0, $2)", f, chunk)
            with pytest.raises(asyncpg.exceptions.ForeignKeyViolationError):
                await conn.execute("DELETE FROM chunks WHERE id = $1", chunk)  # referenced: never deleted
        finally:
            await conn.close()

    run(main())


def test_a_pooled_operation_sends_no_reset_statement(pg_dsn: str) -> None:
    """A stat is one statement: the pool does not add asyncpg's reset query (a round trip) each time a
    connection goes back to it (bench/scale.py measured 13 statements per small-file commit with it, 10
    without)."""
    seen: list[str] = []

    async def setup(conn: asyncpg.Connection[asyncpg.Record]) -> None:
        conn.add_query_logger(lambda record: seen.append(record.query))

    async def main() -> None:
        ns = await Namespace.connect(pg_dsn, max_size=1, setup=setup)
        try:
            await ns.mkdir("u", ("d",))
            seen.clear()
            for _ in range(3):
                await ns.stat("u", ("d",))
        finally:
            await ns.close()

    run(main())
    assert not [q for q in seen if "RESET ALL" in q or "pg_advisory_unlock_all" in q], seen
    assert len(seen) == 3, seen
