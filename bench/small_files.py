"""Benchmark (not a test): many small files through the object backend's store layer.

10,000 files of 4 KiB (``--files``) stored and read back through :class:`ferry.store.objects.ObjectStorage`
over a real ``weed mini`` (volumes on tmpfs) and a PostgreSQL database created and dropped here:

* one by one: ``store_small`` per file, ``open_file`` + ``read_chunk`` per file (``--one`` files:
  the one-by-one cost is per file, no need for 10,000 of them), with the bytes inline in the
  database (the default) and as objects in the store (``inline_max=-1``, what the backend did before);
* batched: ``store_small_many`` / ``read_small_many`` in batches of 64 (what one tree message of
  256 KiB carries at 4 KiB a file) and of 1,000, inline and as objects.

Per case: ms per file, database statements per file (asyncpg's query logger, BEGIN/COMMIT included)
and object-store requests per file. Round-robin over the cases, medians of ``--reps``.

    flock /work/bench.lock .venv/bin/python bench/small_files.py
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _common import KiB, log, median, table
from components import create_database, drop_database
from ferry.store.api import SmallFile, SmallRead
from ferry.store.namespace import Namespace
from ferry.store.objects import ObjectStorage
from scale import CountingChunkStore, Statements, chunk_store, weed_at


async def open_objects(dsn: str, weed: Any, stmts: Statements, inline_max: int) -> ObjectStorage:
    """An ObjectStorage whose statements and store requests are counted."""

    async def setup(conn: Any) -> None:
        conn.add_query_logger(stmts)

    ns = await Namespace.connect(dsn, max_size=16, setup=setup)
    store = chunk_store(weed, f"bench/{secrets.token_hex(4)}/", cls=CountingChunkStore)
    return ObjectStorage(ns, store, inline_max=inline_max)


Counts = Callable[[], tuple[int, int]]


async def one_by_one(
    st: ObjectStorage, user: str, folder: str, datas: list[bytes], counts: Counts
) -> tuple[float, float, tuple[int, int]]:
    """Seconds per file to store, then to read back (verified), one call per file; ``counts()``
    (statements, store requests) after the stores."""
    await st.mkdir(user, (folder,))
    t = time.perf_counter()
    for i, data in enumerate(datas):
        await st.store_small(user, (folder, f"f{i:05d}"), data, mode=0o644, mtime=1.7e9, overwrite=True, quota=None)
    put = (time.perf_counter() - t) / len(datas)
    between = counts()
    t = time.perf_counter()
    for i, data in enumerate(datas):
        f = await st.open_file(user, (folder, f"f{i:05d}"))
        assert await st.read_chunk(f.chunks[0]) == data
    return put, (time.perf_counter() - t) / len(datas), between


async def batched(
    st: ObjectStorage, user: str, folder: str, datas: list[bytes], size: int, counts: Counts
) -> tuple[float, float, tuple[int, int]]:
    """Seconds per file to store (``store_small_many``, making the folder as a tree upload does)
    and read back (``read_small_many``), ``size`` files per call."""
    paths = [(folder, f"d{i // 1000:02d}", f"f{i:05d}") for i in range(len(datas))]
    t = time.perf_counter()
    for start in range(0, len(datas), size):
        items = [SmallFile(paths[i], datas[i], 0o644, 1.7e9) for i in range(start, min(start + size, len(datas)))]
        batch = await st.store_small_many(user, items, overwrite=True, quota=1 << 40, parents=True)
        assert batch.fatal is None and batch.stored == len(items), batch.failed[:3]
    put = (time.perf_counter() - t) / len(datas)
    between = counts()
    t = time.perf_counter()
    for start in range(0, len(datas), size):
        got = await st.read_small_many(user, paths[start : start + size], max_size=64 * KiB)
        for i, r in enumerate(got, start):
            assert isinstance(r, SmallRead) and r.data == datas[i]
    return put, (time.perf_counter() - t) / len(datas), between


async def measure(opts: argparse.Namespace, dsn: str, weed: Any) -> list[list[str]]:
    """Every case, round-robin, ``opts.reps`` times; the table rows."""
    stmts = Statements()
    stores = {
        "inline": await open_objects(dsn, weed, stmts, 64 * KiB),
        "objects": await open_objects(dsn, weed, stmts, -1),
    }
    datas = [secrets.token_bytes(4 * KiB) for _ in range(opts.files)]
    Case = Callable[[ObjectStorage, str, str, Counts], Awaitable[tuple[float, float, tuple[int, int]]]]
    cases: dict[str, Case] = {
        "one by one": lambda st, u, f, c: one_by_one(st, u, f, datas[: opts.one], c),
        "batches of 64": lambda st, u, f, c: batched(st, u, f, datas, 64, c),
        "batches of 1,000": lambda st, u, f, c: batched(st, u, f, datas, 1000, c),
    }
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    try:
        for st in stores.values():  # warm up: pools, the first volumes
            await one_by_one(st, "warm", secrets.token_hex(4), datas[:20], lambda: (0, 0))
        for rep in range(opts.reps):
            for kind, st in stores.items():
                for label, case in cases.items():
                    count = opts.one if label == "one by one" else opts.files
                    user = f"u{secrets.token_hex(4)}"
                    await st.usage(user)  # the owner row and home, outside the counts
                    requests = st.chunks.count()  # type: ignore[attr-defined]

                    def counts(requests: Any = requests) -> tuple[int, int]:
                        return stmts.count, sum(requests.values())

                    s0, r0 = counts()
                    put, get, (s1, r1) = await case(st, user, "tree", counts)
                    s2, r2 = counts()
                    results.setdefault((kind, label), []).append(
                        (put, get, (s1 - s0) / count, (s2 - s1) / count, (r1 - r0) / count, (r2 - r1) / count)
                    )
                    log(f"rep {rep + 1}: {kind}, {label}: put {put * 1e3:.3f} ms, get {get * 1e3:.3f} ms per file")
    finally:
        for st in stores.values():
            await st.close()
    rows = []
    for (kind, label), runs in results.items():
        put = median([r[0] for r in runs])
        get = median([r[1] for r in runs])
        rows.append(
            [
                f"{label}, {'bytes in the database' if kind == 'inline' else 'one object per file'}",
                f"{put * 1e3:.3f}",
                f"{get * 1e3:.3f}",
                f"{(put + get) * opts.files:.2f} s",
                f"{median([r[2] for r in runs]):.2f} / {median([r[3] for r in runs]):.2f}",
                f"{median([r[4] for r in runs]):.2f} / {median([r[5] for r in runs]):.2f}",
            ]
        )
    return rows


def main() -> None:
    """Run the benchmark and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000, help="files of 4 KiB per batched case")
    parser.add_argument("--one", type=int, default=1_000, help="files per one-by-one case")
    parser.add_argument("--reps", type=int, default=3)
    opts = parser.parse_args()
    name, dsn = create_database()
    try:
        with weed_at(Path("/dev/shm"), "small") as weed:
            rows = asyncio.run(measure(opts, dsn, weed))
    finally:
        drop_database(name)
    print(
        f"\n## {opts.files:,} x 4 KiB through the object backend's store layer "
        f"(weed on tmpfs, PostgreSQL on loopback; {opts.reps} reps, medians)\n"
    )
    print(
        table(
            [
                "case",
                "put ms/file",
                "get ms/file",
                f"put+get of {opts.files:,}",
                "statements/file (put / get)",
                "S3 requests/file (put / get)",
            ],
            rows,
            markdown=True,
        )
    )


if __name__ == "__main__":
    main()
