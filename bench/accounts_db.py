"""Benchmark (not a test): how the accounts reach PostgreSQL from the server's threads.

The account code (:mod:`ferry.server.accounts`, :mod:`ferry.server.credentials`) is blocking: the
server calls it from its login threads and from ``asyncio.to_thread``. asyncpg, the object backend's
driver, has no blocking API. This compares, in one run, round-robin, medians of ``--reps``:

* ``sqlite``: the default engine (one connection behind a lock, WAL), for reference;
* ``asyncpg-bridge``: asyncpg on an event loop in a dedicated thread, each statement handed over
  with ``asyncio.run_coroutine_threadsafe`` (what ``ferry serve --db`` would do with asyncpg);
* ``psycopg``: psycopg 3's blocking connections, one per calling thread.

Workloads, each through ``--threads`` calling threads at once (the server's login threads):
a token login's reads (2 statements: the token row, then the user row) and a revocation poll
(1 statement). Also the import cost of each driver (``python -c "import X"`` minus ``python -c pass``)
and what one password login costs (argon2id with the server's parameters) for scale.

Then the real account code (:class:`ferry.server.accounts.Accounts`) on its two engines, SQLite and
PostgreSQL (psycopg, the choice these numbers led to): a token login
(``Credentials.login_token``), an account lookup (``Accounts.get``, what every password login does
first) and the change poll (``Accounts.data_version``, once a second per server).

    flock /work/bench.lock .venv/bin/python bench/accounts_db.py --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import fmt_num, median, table
from components import create_database, drop_database, dsn_with, run_sql

_USERS = 200
_SETUP = [
    "CREATE TABLE users (name TEXT PRIMARY KEY, hash TEXT NOT NULL, quota BIGINT, rev INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE tokens (id TEXT PRIMARY KEY, username TEXT NOT NULL, hash BYTEA NOT NULL)",
]


def _token_reads(run: Callable[[str, tuple[Any, ...]], list[Any]], i: int) -> None:
    row = run("SELECT hash, username FROM tokens WHERE id = ?", (f"t{i % _USERS}",))
    run("SELECT name, quota, rev FROM users WHERE name = ?", (row[0][1],))


def _poll(run: Callable[[str, tuple[Any, ...]], list[Any]], i: int) -> None:
    run("SELECT name, rev FROM users WHERE name IN (?, ?, ?)", (f"u{i % _USERS}", "u1", "u2"))


def _dollar(sql: str) -> str:
    parts = sql.split("?")
    return "".join(p + (f"${n}" if n < len(parts) else "") for n, p in enumerate(parts, start=1))


class SqliteEngine:
    name = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.conn = sqlite3.connect(folder / "users.db", check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        for stmt in _SETUP:
            self.conn.execute(stmt.replace("BYTEA", "BLOB").replace("BIGINT", "INTEGER"))
        for i in range(_USERS):
            self.conn.execute("INSERT INTO users VALUES (?, 'x', NULL, 0)", (f"u{i}",))
            self.conn.execute("INSERT INTO tokens VALUES (?, ?, ?)", (f"t{i}", f"u{i}", b"h"))
        self.lock = threading.Lock()

    def run(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        with self.lock:
            return self.conn.execute(sql, args).fetchall()

    def close(self) -> None:
        self.conn.close()


async def _no_reset(conn: Any) -> None:
    """A pool ``reset`` that adds no round trip (asyncpg's default runs a reset query per release)."""


class BridgeEngine:
    name = "asyncpg-bridge"
    reset: Any = None

    def __init__(self, dsn: str) -> None:
        import asyncpg

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make() -> Any:  # the pool must be made on its loop
            return await asyncpg.create_pool(dsn, min_size=2, max_size=8, reset=self.reset)

        self.pool: Any = self._call(make())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def run(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        return list(self._call(self.pool.fetch(_dollar(sql), *args)))

    def close(self) -> None:
        self._call(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class BridgeNoResetEngine(BridgeEngine):
    name = "asyncpg-bridge, no reset"
    reset = staticmethod(_no_reset)


class PsycopgEngine:
    name = "psycopg"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.local = threading.local()
        self.all: list[Any] = []

    def run(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        import psycopg

        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = psycopg.connect(self.dsn, autocommit=True)
            self.all.append(conn)
        return conn.execute(sql.replace("?", "%s"), args).fetchall()  # type: ignore[no-any-return]

    def close(self) -> None:
        for conn in self.all:
            conn.close()


def import_ms(module: str, reps: int) -> float:
    def once(code: str) -> float:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        return time.perf_counter() - t

    base = median(once("pass") for _ in range(reps))
    return (median(once(f"import {module}") for _ in range(reps)) - base) * 1000


def per_call_us(engine: Any, work: Callable[..., None], calls: int, threads: int) -> float:
    """Wall time per call with ``threads`` threads calling at once (microseconds)."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: work(engine.run, i), range(threads * 4)))  # connect and warm up
        t = time.perf_counter()
        list(pool.map(lambda i: work(engine.run, i), range(calls)))
        return (time.perf_counter() - t) / calls * 1e6


def real_accounts(folder: Path, dsn: str, opts: argparse.Namespace) -> str:
    """The account code itself on both engines."""
    from argon2 import PasswordHasher

    from ferry.server.accounts import Accounts
    from ferry.server.credentials import Credentials

    cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    run_sql("CREATE SCHEMA real", dsn)  # beside the prototypes' own tables
    engines = {
        "sqlite": Accounts(folder / "root", hasher=cheap),
        "postgresql": Accounts(None, hasher=cheap, db=dsn_with(dsn, schema="real")),
    }
    tokens: dict[str, list[str]] = {}
    for name, acc in engines.items():
        creds = Credentials(acc)
        tokens[name] = []
        for i in range(20):
            acc.add(f"r{i}", "pw")
            tokens[name].append(creds.add_token(f"r{i}")[1])
    work: dict[str, Callable[[str, int], None]] = {
        "token login (Credentials.login_token)": lambda e, i: _expect(Credentials(engines[e]).login_token(tokens[e][i % 20])),
        "account lookup (Accounts.get)": lambda e, i: _expect(engines[e].get(f"r{i % 20}")),
        "change poll (Accounts.data_version)": lambda e, i: engines[e].data_version(),
    }  # fmt: skip
    results: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(opts.reps):
        for label, fn in work.items():
            for threads in opts.threads:
                for name in engines:
                    with ThreadPoolExecutor(threads) as pool:
                        list(pool.map(lambda i, n=name, f=fn: f(n, i), range(threads * 4)))  # type: ignore[misc]
                        t = time.perf_counter()
                        list(pool.map(lambda i, n=name, f=fn: f(n, i), range(opts.calls)))  # type: ignore[misc]
                        us = (time.perf_counter() - t) / opts.calls * 1e6
                    results.setdefault((label, name, threads), []).append(us)
    for acc in engines.values():
        acc.close()
    rows = [[f"{label}, {threads} thread(s)", name, fmt_num(median(v), 0)] for (label, name, threads), v in results.items()]
    rows.sort(key=lambda r: (r[0], r[1]))
    return table(["workload", "engine", "us per call (median)"], rows)


def _expect(value: object) -> None:
    if value is None:
        raise AssertionError("the bench's account or token was not found")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    opts = ap.parse_args()
    name, dsn = create_database()
    folder = Path(tempfile.mkdtemp(prefix="ferry-accounts-bench-"))
    try:
        for stmt in _SETUP:
            run_sql(stmt, dsn)
        values = ", ".join(f"('u{i}', 'x', NULL, 0)" for i in range(_USERS))
        run_sql(f"INSERT INTO users VALUES {values}", dsn)
        values = ", ".join(f"('t{i}', 'u{i}', '\\x68')" for i in range(_USERS))
        run_sql(f"INSERT INTO tokens VALUES {values}", dsn)
        engines: list[Any] = [SqliteEngine(folder), BridgeEngine(dsn), BridgeNoResetEngine(dsn)]
        if importlib.util.find_spec("psycopg"):
            engines.append(PsycopgEngine(dsn))
        results: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(opts.reps):
            for work_name, work in (("token login reads", _token_reads), ("revocation poll", _poll)):
                for threads in opts.threads:
                    for engine in engines:
                        key = (engine.name, work_name, threads)
                        results.setdefault(key, []).append(per_call_us(engine, work, opts.calls, threads))
        for engine in engines:
            engine.close()
        rows = []
        for (engine_name, work_name, threads), values in results.items():
            rows.append([f"{work_name}, {threads} thread(s)", engine_name, fmt_num(median(values), 0),
                         fmt_num(statistics.pstdev(values), 0)])  # fmt: skip
        rows.sort(key=lambda r: (r[0], r[1]))
        print(table(["workload", "engine", "us per call (median)", "stdev"], rows))
        print()
        imports = [["asyncpg", fmt_num(import_ms("asyncpg", opts.reps), 0)]]
        if importlib.util.find_spec("psycopg"):
            imports.append(["psycopg", fmt_num(import_ms("psycopg", opts.reps), 0)])
        imports.append(["sqlite3", fmt_num(import_ms("sqlite3", opts.reps), 0)])
        print(table(["driver", "import ms"], imports))
        from ferry.server.accounts import default_hasher

        hasher = default_hasher()
        stored = hasher.hash("pw")
        times = []
        for _ in range(20):
            t = time.perf_counter()
            hasher.verify(stored, "pw")
            times.append((time.perf_counter() - t) * 1e6)
        print(f"\none argon2id check (the server's parameters): {fmt_num(median(times), 0)} us\n")
        print(real_accounts(folder, dsn, opts))
    finally:
        drop_database(name)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
