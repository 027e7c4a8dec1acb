"""Benchmark (not a test): which async S3 client and which PostgreSQL driver the object backend uses.

In one run, round-robin, medians of ``--reps`` repetitions:

* S3 against a real SeaweedFS (``weed mini`` from the dev extra, started here on loopback):
  obstore (the Rust ``object_store`` binding) against aiobotocore (botocore over aiohttp) —
  put and get of 4 MiB objects (``--big`` of them, 8 in flight) and of 4 KiB objects (``--small`` of
  them, 32 in flight);
* PostgreSQL (127.0.0.1:5432, a database created and dropped here): psycopg 3 (async, one
  connection) against asyncpg — sequential round trips of ``SELECT 1`` and of a one-row primary-key
  lookup with a parameter;
* import cost of each library: wall time of ``python -c "import X"`` minus ``python -c pass``.

aiobotocore and psycopg are not dependencies of ferry; install them to compare
(``.venv/bin/pip install aiobotocore 'psycopg[binary]'``); a missing one is reported as n/a.
``--uvloop`` runs the clients on uvloop (as ``ferry serve`` does when uvloop is installed).

    flock /work/bench.lock .venv/bin/python bench/store_clients.py            # defaults: 5 reps
    .venv/bin/python bench/store_clients.py --reps 3 --big 16 --small 500
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import MiB, fmt_num, median, table
from components import Weed, create_database, drop_database, run_sql, start_weed

KiB = 1 << 10


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --- S3 clients -------------------------------------------------------------------------------------


class ObstoreClient:
    name = "obstore"

    def __init__(self, weed: Weed) -> None:
        from obstore.store import S3Store

        self.store = S3Store(
            weed.bucket,
            endpoint=weed.endpoint,
            access_key_id=weed.access_key,
            secret_access_key=weed.secret_key,
            region=weed.region,
            client_options={"allow_http": True},
        )

    async def put(self, key: str, data: bytes) -> None:
        import obstore

        await obstore.put_async(self.store, key, data)

    async def get(self, key: str) -> int:
        import obstore

        r = await obstore.get_async(self.store, key)
        return len(await r.bytes_async())

    async def close(self) -> None:
        pass


class BotoClient:
    name = "aiobotocore"

    def __init__(self, weed: Weed) -> None:
        self.weed = weed
        self.client: Any = None
        self._cm: Any = None

    async def open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        session = get_session()
        self._cm = session.create_client(
            "s3",
            endpoint_url=self.weed.endpoint,
            aws_access_key_id=self.weed.access_key,
            aws_secret_access_key=self.weed.secret_key,
            region_name=self.weed.region,
            config=AioConfig(max_pool_connections=64),
        )
        self.client = await self._cm.__aenter__()

    async def put(self, key: str, data: bytes) -> None:
        await self.client.put_object(Bucket=self.weed.bucket, Key=key, Body=data)

    async def get(self, key: str) -> int:
        r = await self.client.get_object(Bucket=self.weed.bucket, Key=key)
        async with r["Body"] as body:
            return len(await body.read())

    async def close(self) -> None:
        await self._cm.__aexit__(None, None, None)


async def bounded(n: int, width: int, job: Callable[[int], Awaitable[Any]]) -> None:
    """Run ``job(0..n-1)`` with at most ``width`` in flight."""
    sem = asyncio.Semaphore(width)

    async def one(i: int) -> None:
        async with sem:
            await job(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def s3_round(client: Any, prefix: str, size: int, count: int, width: int) -> tuple[float, float]:
    """Seconds to put, then to get, ``count`` objects of ``size`` bytes."""
    data = [secrets.token_bytes(size) for _ in range(min(count, 8))]
    t0 = time.perf_counter()
    await bounded(count, width, lambda i: client.put(f"{prefix}{i}", data[i % len(data)]))
    t1 = time.perf_counter()
    got = 0

    async def get(i: int) -> None:
        nonlocal got
        n = await client.get(f"{prefix}{i}")  # not 'got += await ...': that reads got before the await
        got += n

    await bounded(count, width, get)
    t2 = time.perf_counter()
    assert got == size * count, (got, size * count)
    return t1 - t0, t2 - t1


async def bench_s3(weed: Weed, reps: int, big: int, small: int) -> list[list[str]]:
    clients: list[Any] = [ObstoreClient(weed)]
    if have("aiobotocore"):
        boto = BotoClient(weed)
        await boto.open()
        clients.append(boto)
    results: dict[tuple[str, str], list[float]] = {}
    # Warm-up round (connections, volume allocation), not counted.
    for c in clients:
        await s3_round(c, f"warm/{c.name}/", 4 * MiB, 4, 4)
    for rep in range(reps):
        for c in clients:  # round-robin: load from elsewhere hits every client alike
            put, get = await s3_round(c, f"r{rep}/{c.name}/big/", 4 * MiB, big, 8)
            results.setdefault((c.name, "put 4 MiB"), []).append(big * 4 / put)
            results.setdefault((c.name, "get 4 MiB"), []).append(big * 4 / get)
            put, get = await s3_round(c, f"r{rep}/{c.name}/small/", 4 * KiB, small, 32)
            results.setdefault((c.name, "put 4 KiB"), []).append(small / put)
            results.setdefault((c.name, "get 4 KiB"), []).append(small / get)
    for c in clients:
        await c.close()
    rows = []
    for what, unit in (
        ("put 4 MiB", "MiB/s"),
        ("get 4 MiB", "MiB/s"),
        ("put 4 KiB", "obj/s"),
        ("get 4 KiB", "obj/s"),
    ):
        row = [f"{what} ({unit})"]
        for name in ("obstore", "aiobotocore"):
            vals = results.get((name, what))
            row.append(fmt_num(median(vals)) if vals else "n/a")
        rows.append(row)
    return rows


# --- PostgreSQL drivers -----------------------------------------------------------------------------


async def pg_psycopg(dsn: str, n: int) -> tuple[float, float]:
    import psycopg

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(50):
            await conn.execute("SELECT 1")
        t0 = time.perf_counter()
        for _ in range(n):
            await (await conn.execute("SELECT 1")).fetchone()
        t1 = time.perf_counter()
        for i in range(n):
            await (await conn.execute("SELECT id, name, size FROM b WHERE id = %s", (i % 1000,))).fetchone()
        t2 = time.perf_counter()
    return (t1 - t0) / n, (t2 - t1) / n


async def pg_asyncpg(dsn: str, n: int) -> tuple[float, float]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(50):
            await conn.fetchval("SELECT 1")
        t0 = time.perf_counter()
        for _ in range(n):
            await conn.fetchrow("SELECT 1")
        t1 = time.perf_counter()
        for i in range(n):
            await conn.fetchrow("SELECT id, name, size FROM b WHERE id = $1", i % 1000)
        t2 = time.perf_counter()
    finally:
        await conn.close()
    return (t1 - t0) / n, (t2 - t1) / n


async def bench_pg(dsn: str, reps: int, n: int) -> list[list[str]]:
    drivers: list[tuple[str, Callable[[str, int], Awaitable[tuple[float, float]]]]] = [
        ("asyncpg", pg_asyncpg)
    ]
    if have("psycopg"):
        drivers.append(("psycopg", pg_psycopg))
    res: dict[tuple[str, str], list[float]] = {}
    for _ in range(reps):
        for name, fn in drivers:
            one, row = await fn(dsn, n)
            res.setdefault((name, "SELECT 1"), []).append(one * 1e6)
            res.setdefault((name, "pk lookup"), []).append(row * 1e6)
    rows = []
    for what in ("SELECT 1", "pk lookup"):
        row = [f"{what} round trip (µs)"]
        for name in ("psycopg", "asyncpg"):
            vals = res.get((name, what))
            row.append(fmt_num(median(vals)) if vals else "n/a")
        rows.append(row)
    return rows


# --- import cost ------------------------------------------------------------------------------------


def import_ms(reps: int) -> list[list[str]]:
    cases = {
        "obstore": "import obstore, obstore.store",
        "aiobotocore": "import aiobotocore.session",
        "psycopg": "import psycopg",
        "asyncpg": "import asyncpg",
    }
    times: dict[str, list[float]] = {k: [] for k in [*cases, "(python)"]}
    for _ in range(reps):
        for name, stmt in [*cases.items(), ("(python)", "pass")]:
            if name != "(python)" and not have(name):
                continue
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", stmt], check=True, timeout=60)
            times[name].append(time.perf_counter() - t0)
    base = median(times["(python)"])
    return [
        [f"import {k} (ms)", fmt_num((median(v) - base) * 1000) if v else "n/a"]
        for k, v in times.items()
        if k != "(python)"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--big", type=int, default=32, help="4 MiB objects per repetition")
    ap.add_argument("--small", type=int, default=1000, help="4 KiB objects per repetition")
    ap.add_argument("--queries", type=int, default=2000, help="sequential queries per repetition")
    ap.add_argument("--uvloop", action="store_true", help="run the clients on uvloop")
    args = ap.parse_args()
    run: Callable[[Any], Any] = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    with tempfile.TemporaryDirectory(prefix="ferry-bench-s3-") as tmp:
        weed = start_weed(Path(tmp) / "weed")
        try:
            s3_rows = run(bench_s3(weed, args.reps, args.big, args.small))
        finally:
            weed.stop()
    name, dsn = create_database()
    try:
        run_sql(  # before the loop starts: run_sql runs its own
            "CREATE TABLE b (id int PRIMARY KEY, name text, size bigint);\n"
            "INSERT INTO b SELECT i, 'name' || i, i * 7 FROM generate_series(0, 999) i",
            dsn,
        )
        pg_rows = run(bench_pg(dsn, args.reps, args.queries))
    finally:
        drop_database(name)
    print(
        f"S3 (weed mini on loopback), medians of {args.reps}; {args.big} x 4 MiB, {args.small} x 4 KiB per rep"
    )
    print(table(["", "obstore", "aiobotocore"], s3_rows))
    print(
        f"\nPostgreSQL 127.0.0.1:5432 (loop: {'uvloop' if args.uvloop else 'asyncio'}), one connection, sequential, medians of {args.reps} x {args.queries}"
    )
    print(table(["", "psycopg 3", "asyncpg"], pg_rows))
    print(f"\nimport cost over a bare interpreter, medians of {max(args.reps, 5)}; cpus={os.cpu_count()}")
    print(table(["", "ms"], import_ms(max(args.reps, 5))))


if __name__ == "__main__":
    main()
