"""The file-count quota (issue 10): ``ferry user --max-files N`` bounds the files and folders of a
home, on every path that creates one, over real sockets against a real server; and the column it
needs, migrated on both account engines.

The attack it answers: quotas counted bytes only, so 20,000 empty files passed a 1 MiB quota.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from components import run_sql
from ferry.client.stdio import put_stream
from ferry.errors import DiskFull
from ferry.server.accounts import Accounts
from ferry.server.accounts_schema import POSTGRES, SCHEMA_VERSION, SQLITE
from transfer_support import connect, running_server, write_random

HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
KiB = 1 << 10


def _entries(h: Path) -> int:
    """Files and folders under home ``h`` (partial uploads not counted), as found on disk."""
    return sum(len(dirs) + sum(".ferry-part-" not in n for n in files) for _, dirs, files in os.walk(h))


async def _refused(coro: object) -> str:
    """The message of the quota refusal ``coro`` must end with."""
    with pytest.raises(DiskFull) as info:
        await coro  # type: ignore[misc]
    assert info.value.code == "quota", info.value
    return str(info.value)


@pytest.mark.timeout(120)
def test_many_empty_files_stop_at_the_file_limit_on_every_create_path(tmp_path: Path) -> None:
    """The 20,000-empty-files shape with a limit of 40: empty puts, a tree upload of 200 empty files,
    mkdir and mkdir -p, a large and a streamed put and a sync all stop at the limit with code quota
    (files and folders both count, like inode quotas); df shows used/limit; removing one frees one."""
    limit = 40
    with running_server(tmp_path / "root", users=()) as srv:
        h = srv.add_user("alice", quota=1 << 20, max_files=limit)
        (tmp_path / "empty").write_bytes(b"")
        tree = tmp_path / "tree"
        tree.mkdir()
        for i in range(200):
            (tree / f"e{i:03d}").write_bytes(b"")
        big = tmp_path / "big.bin"
        write_random(big, 300 * KiB, 1)
        local = tmp_path / "sync-src"
        local.mkdir()
        (local / "new.txt").write_bytes(b"x")

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                await c.mkdir("d")
                ok = 0
                for i in range(60):  # bounded: at most 60 empty files are tried
                    try:
                        await c.put(tmp_path / "empty", f"d/f{i:02d}")
                    except DiskFull as exc:
                        assert exc.code == "quota" and "at most 40 files and folders" in str(exc), exc
                        break
                    ok += 1
                assert ok == limit - 1  # 'd' is one of the 40
                assert _entries(h) == limit
                await c.put(tmp_path / "empty", "d/f00")  # replacing a file makes none
                msg = await _refused(c.mkdir("more"))
                assert "ferry user mod --max-files" in msg and "ferry rm" in msg, msg
                await _refused(c.mkdir("a/b/c", parents=True))
                await _refused(c.put_tree(tree, "t"))
                await _refused(c.put(big, "big.bin"))
                fd = os.open(big, os.O_RDONLY)
                try:
                    await _refused(put_stream(c.mux, fd, "streamed.bin"))
                finally:
                    os.close(fd)
                with pytest.raises(DiskFull):
                    await c.sync(str(local) + "/", ":d/")
                assert _entries(h) == limit, sorted(p.name for p in h.rglob("*"))
                df = await c.df()
                assert (df.files, df.max_files) == (limit, limit)
                await c.remove("d/f01")
                await c.put(big, "d/big.bin")  # the freed place is taken again
                await _refused(c.put(tmp_path / "empty", "d/one-more"))
                await c.remove("d", recursive=True)  # everything goes: all 40 places free
                assert (await c.df()).files == 0
                await _refused(c.put_tree(tree, "t"))

        asyncio.run(main())
        assert _entries(h) == limit  # the tree stopped at the limit: 't' and 39 of its files


@pytest.mark.timeout(120)
def test_two_sessions_creating_at_once_stay_within_the_file_limit(tmp_path: Path) -> None:
    """Entries are counted where they are made, under one lock per user: two sessions uploading
    trees of empty files and making folders at the same time together stop at the limit."""
    limit = 50
    with running_server(tmp_path / "root", users=()) as srv:
        h = srv.add_user("alice", max_files=limit)
        for k in (1, 2):
            tree = tmp_path / f"tree{k}"
            tree.mkdir()
            for i in range(60):
                (tree / f"e{i:02d}").write_bytes(b"")

        async def lane(k: int) -> None:
            async with await connect(srv, tmp_path) as c:
                with pytest.raises(DiskFull):
                    await c.put_tree(tmp_path / f"tree{k}", f"t{k}")
                for i in range(30):
                    try:
                        await c.mkdir(f"m{k}-{i}")
                    except DiskFull:
                        break

        async def main() -> None:
            await asyncio.gather(lane(1), lane(2))

        asyncio.run(main())
        assert _entries(h) == limit


def _version_2_sqlite(root: Path) -> None:
    root.mkdir()
    conn = sqlite3.connect(root / "users.db")
    for step in (1, 2):
        for statement in SQLITE[step]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO users (name, hash, quota) VALUES ('old', 'x', 5)")
    conn.commit()
    conn.close()


def _version_2_postgres(dsn: str) -> None:
    for statement in POSTGRES[2]:
        run_sql(statement, dsn)
    run_sql("CREATE TABLE ferry_meta (key text PRIMARY KEY, value text NOT NULL)", dsn)
    run_sql("INSERT INTO ferry_meta VALUES ('accounts_schema_version', '2')", dsn)
    run_sql("INSERT INTO users (name, hash, quota) VALUES ('old', 'x', 5)", dsn)


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_the_file_limit_column_is_a_migration_on_both_engines(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Accounts written by the previous version get the column (NULL: unlimited, so nothing
    changes for existing users); add, modify, clear and read it the same on SQLite and PostgreSQL."""
    assert SCHEMA_VERSION == 3
    db = request.getfixturevalue("pg_dsn") if engine == "postgresql" else None
    if db is None:
        _version_2_sqlite(tmp_path / "root")
    else:
        _version_2_postgres(db)
    with Accounts(tmp_path / "root", hasher=HASHER, db=db) as acc:
        old = acc.get("old")
        assert old is not None and old.quota == 5 and old.max_files is None
        assert acc.modify("old", max_files=20_000).max_files == 20_000
        assert acc.add("new", "pw", max_files=7).max_files == 7
        assert [(u.name, u.max_files) for u in acc.list()] == [("new", 7), ("old", 20_000)]
        assert acc.verify("new", "pw").max_files == 7
        assert acc.modify("old", max_files=None).max_files is None
        with pytest.raises(Exception, match="file limit"):
            acc.modify("old", max_files=-1)
    if db is None:
        conn = sqlite3.connect(tmp_path / "root" / "users.db")
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        conn.close()
    else:
        assert run_sql("SELECT value FROM ferry_meta WHERE key = 'accounts_schema_version'", db) == ["3"]
