"""Benchmark (not a test): the scale-out groundwork (docs/scale-out.md, issue 14).

Measures the primitives the object backend stands on, with the real components started here on
loopback (SeaweedFS's ``weed mini`` from the dev extra, a PostgreSQL database created and dropped
here), in one run, round-robin, medians of ``--reps``:

* ``store``: put and get of 4 MiB chunks through :class:`ferry.store.chunks.ChunkStore` (the real
  code: put-if-absent, BLAKE3 check on every get) with 1, 4, 8 and 16 requests in flight, and 4 KiB
  objects with 32 in flight, against weed with its volumes on the disk and on a tmpfs (/dev/shm);
  beside them the client-side limit (BLAKE3 of the same bytes in this process);
* ``namespace``: per small-file commit (``ObjectStorage.store_small``) the database round trips
  (statements counted by asyncpg's query logger, including BEGIN/COMMIT and the pool's reset on
  release) and the object-store requests, and its time sequentially and with 16 in flight; the same
  with the pool's reset query turned off; stat and a listing page; and a batching lower bound (100
  node rows in one ``INSERT ... SELECT unnest(...)`` in one transaction);
* ``servers``: 1 and 3 ``ferry serve --db --cert --key [--store]`` processes sharing one PostgreSQL
  database and one certificate behind HAProxy (TCP, round robin), alternating: C clients (default
  200, an account each) started within one second log in with a password, get and put 4 KiB;
  ok/failed, login and client p50/p99, the servers' CPU per client and the database transactions
  per client (pg_stat_database); the servers run with ``--password-cache 0``, so every login pays
  its argon2id check (the worst case: a burst of new logins). By default the files are on the object
  backend (one namespace for all servers); ``--servers-backend folder`` measures the front ends alone;
* ``backends``: the folder backend against the object backend through the ferry CLI (plain TCP): a
  1 GiB put and get and a 10,000 x 4 KiB tree put -r and get -r, round-robin, alternating which goes
  first; per operation the server's CPU, the store's (weed's) CPU, database round trips (a counting
  relay in front of PostgreSQL) and S3 requests (weed's Prometheus counter).

    flock /work/bench.lock .venv/bin/python bench/scale.py                    # everything, 3 reps
    .venv/bin/python bench/scale.py --parts store --reps 5 --big 32
    .venv/bin/python bench/scale.py --parts backends --size-mib 64 --tree 500 --reps 1   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import blake3

from _common import (
    FERRY,
    FerryServer,
    KiB,
    cpu_seconds,
    ferry_add_user,
    fmt_num,
    is_tmpfs,
    log,
    make_big_file,
    make_tree,
    median,
    table,
    wait_quiet,
)
from components import Weed, create_database, drop_database, run_sql, start_haproxy, start_weed
from ferry.server.accounts import Accounts, default_hasher
from ferry.server.tls import generate_certificate
from ferry.store.api import CHUNK_SIZE, ChunkRef
from ferry.store.chunks import ChunkStore, open_store
from load import PASSWORD, Logins, burst, percentile
from store_support import s3_config

# --- components -------------------------------------------------------------------------------------


@contextlib.contextmanager
def weed_at(base: Path, label: str, args: list[str] | None = None) -> Iterator[Weed]:
    """``weed mini`` with its data under ``base`` (stopped, and its folder removed, afterwards)."""
    folder = Path(tempfile.mkdtemp(prefix=f"ferry-bench-weed-{label}-", dir=base))
    log(f"starting weed mini in {folder} ({'tmpfs' if is_tmpfs(folder) else 'disk'})")
    weed = start_weed(folder, args=args or ())
    try:
        yield weed
    finally:
        weed.stop()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def chunk_store(weed: Weed, prefix: str, concurrency: int = 32, cls: type[ChunkStore] = ChunkStore) -> Any:
    """The object backend's chunk store over ``weed`` (what a server would use)."""
    config = s3_config(weed, prefix)
    return cls(open_store(config), config.prefix, concurrency=concurrency)


class CountingChunkStore(ChunkStore):
    """A chunk store that counts its requests (put, get, delete)."""

    requests: Counter[str]

    def count(self) -> Counter[str]:
        """The counter (created on first use)."""
        if not hasattr(self, "requests"):
            self.requests = Counter()
        return self.requests

    async def put(self, ref: ChunkRef, data: bytes | memoryview) -> None:
        self.count()["put"] += 1
        await super().put(ref, data)

    async def get(self, ref: ChunkRef) -> bytes:
        self.count()["get"] += 1
        return await super().get(ref)


# --- part 1: the object store -----------------------------------------------------------------------

_ids = iter(range(1, 1 << 62))


async def bounded(jobs: list[Callable[[], Awaitable[Any]]], inflight: int) -> None:
    """Run ``jobs`` with at most ``inflight`` at once."""
    slots = asyncio.Semaphore(inflight)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with slots:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


class Timing:
    """Wall time and CPU time (this process, and the store's process) of one measured step."""

    def __init__(self, store_pid: int) -> None:
        self.store_pid = store_pid

    @contextlib.contextmanager
    def measure(self, out: dict[str, float]) -> Iterator[None]:
        wall, mine, theirs = time.perf_counter(), time.process_time(), cpu_seconds(self.store_pid) or 0.0
        yield
        out["wall"] = time.perf_counter() - wall
        out["client_cpu"] = time.process_time() - mine
        out["store_cpu"] = (cpu_seconds(self.store_pid) or 0.0) - theirs


async def put_get(
    store: ChunkStore, data: bytes, count: int, inflight: int, timing: Timing
) -> tuple[dict[str, float], dict[str, float]]:
    """Put ``count`` objects of ``data`` (distinct keys), then get them all; the timings of both."""
    digest = blake3.blake3(data).digest()
    refs = [ChunkRef(next(_ids), 1, digest, len(data), False) for _ in range(count)]
    put: dict[str, float] = {}
    get: dict[str, float] = {}
    with timing.measure(put):
        await bounded([lambda r=r: store.put(r, data) for r in refs], inflight)  # type: ignore[misc]
    with timing.measure(get):
        await bounded([lambda r=r: store.get(r) for r in refs], inflight)  # type: ignore[misc]
    for r in refs:
        await store.delete(store.key(r))
    return put, get


def part_store(opts: argparse.Namespace) -> None:
    """4 MiB chunks and 4 KiB objects against weed on disk and on tmpfs, round-robin."""
    disk_base = Path(opts.disk_dir)
    if is_tmpfs(disk_base):
        log(f"note: {disk_base} is a tmpfs; give --disk-dir on a disk to compare")
    big = os.urandom(CHUNK_SIZE)
    small = os.urandom(4 * KiB)
    results: dict[tuple[str, str], list[float]] = {}
    with weed_at(disk_base, "disk") as on_disk, weed_at(Path("/dev/shm"), "tmpfs") as on_tmpfs:
        weeds = {"disk": on_disk, "tmpfs": on_tmpfs}

        async def run() -> None:
            stores = {name: chunk_store(w, f"bench/{secrets.token_hex(4)}/") for name, w in weeds.items()}
            timings = {name: Timing(w.proc.pid) for name, w in weeds.items()}

            def note(name: str, what: str, value: float) -> None:
                results.setdefault((name, what), []).append(value)

            for name, store in stores.items():  # warm up: connections, first volumes
                await put_get(store, big, 4, 4, timings[name])
            for rep in range(opts.reps):
                log(f"store: rep {rep + 1}/{opts.reps}")
                for name, store in stores.items():
                    for inflight in opts.inflight:
                        put, get = await put_get(store, big, opts.big, inflight, timings[name])
                        for verb, t in (("put", put), ("get", get)):
                            note(name, f"{verb} 4 MiB, {inflight} in flight: MiB/s", opts.big * 4 / t["wall"])
                            if inflight == max(opts.inflight):
                                note(name, f"{verb} 4 MiB: store CPU ms per chunk", t["store_cpu"] * 1e3 / opts.big)
                                note(name, f"{verb} 4 MiB: client CPU ms per chunk", t["client_cpu"] * 1e3 / opts.big)
                    for inflight in (1, 32):
                        put, get = await put_get(store, small, opts.small, inflight, timings[name])
                        for verb, t in (("put", put), ("get", get)):
                            note(name, f"{verb} 4 KiB, {inflight} in flight: per s", opts.small / t["wall"])
                            if inflight == 32:
                                note(name, f"{verb} 4 KiB: store CPU ms per object", t["store_cpu"] * 1e3 / opts.small)

        asyncio.run(run())
    t = time.perf_counter()
    for _ in range(64):
        blake3.blake3(big).digest()
    hash_rate = 64 * 4 / (time.perf_counter() - t)
    what = list(dict.fromkeys(k[1] for k in results))
    rows = [[w, fmt_num(median(results[("disk", w)]), 1 if "CPU" in w else 0),
             fmt_num(median(results[("tmpfs", w)]), 1 if "CPU" in w else 0)] for w in what]  # fmt: skip
    print(f"\n## object store (weed mini, {opts.reps} reps, medians; {opts.big} x 4 MiB, {opts.small} x 4 KiB)\n")
    print(table(["operation", "weed on disk", "weed on tmpfs"], rows, markdown=True))
    print(f"\nclient-side limit: BLAKE3 of a 4 MiB chunk in this process, 1 thread: {hash_rate:,.0f} MiB/s")


# --- part 2: the namespace ------------------------------------------------------------------------


class Statements:
    """Counts the statements (round trips) asyncpg sends, through its query logger."""

    def __init__(self) -> None:
        self.count = 0
        self.by_text: Counter[str] = Counter()

    def __call__(self, record: Any) -> None:
        self.count += 1
        self.by_text[" ".join(str(record.query).split())[:60]] += 1


class Phases:
    """Time spent in some coroutine methods of some objects (wrapped on the instances)."""

    def __init__(self, targets: dict[str, tuple[Any, str]]) -> None:
        self.seconds: Counter[str] = Counter()
        for label, (obj, method) in targets.items():
            setattr(obj, method, self._timed(label, getattr(obj, method)))

    def _timed(self, label: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args, **kw)
            finally:
                self.seconds[label] += time.perf_counter() - t

        return wrapper


async def _no_reset(conn: Any) -> None:
    """A pool ``reset`` without a round trip (asyncpg's default sends a reset query on each release)."""


@contextlib.asynccontextmanager
async def storage(dsn: str, weed: Weed, *, reset: bool, stmts: Statements) -> AsyncIterator[Any]:
    """An ObjectStorage over its own pool (statement counting on, the pool's reset on or off)."""
    import asyncpg

    from ferry.store.namespace import Namespace
    from ferry.store.objects import ObjectStorage
    from ferry.store.schema import migrate

    async def init(conn: Any) -> None:
        conn.add_query_logger(stmts)

    pool = await asyncpg.create_pool(
        dsn, min_size=2, max_size=16, init=init, reset=None if reset else _no_reset
    )
    async with pool.acquire() as conn:
        await migrate(conn)
    store = chunk_store(weed, f"bench/{secrets.token_hex(4)}/", cls=CountingChunkStore)
    try:
        yield ObjectStorage(Namespace(pool), store)
    finally:
        await pool.close()


async def small_files(st: Any, user: str, folder: str, count: int, inflight: int) -> float:
    """Store ``count`` 4 KiB files in ``folder`` with ``inflight`` at once; seconds per file."""
    await st.mkdir(user, (folder,), exist_ok=True)
    datas = [secrets.token_bytes(4 * KiB) for _ in range(count)]
    t = time.perf_counter()
    await bounded(
        [
            lambda i=i: st.store_small(  # type: ignore[misc]
                user, (folder, f"f{i:05d}"), datas[i], mode=0o644, mtime=1.7e9, overwrite=True, quota=None
            )
            for i in range(count)
        ],
        inflight,
    )
    return (time.perf_counter() - t) / count


async def small_files_many_users(st: Any, users: list[str], count: int, inflight: int) -> float:
    """Like :func:`small_files`, the files spread over ``users`` (no shared owner-row lock)."""
    for u in users:
        await st.mkdir(u, ("multi",), exist_ok=True)
    datas = [secrets.token_bytes(4 * KiB) for _ in range(count)]
    t = time.perf_counter()
    await bounded(
        [
            lambda i=i: st.store_small(  # type: ignore[misc]
                users[i % len(users)], ("multi", f"f{i:05d}"), datas[i], mode=0o644, mtime=1.7e9,
                overwrite=True, quota=None,
            )
            for i in range(count)
        ],
        inflight,
    )
    return (time.perf_counter() - t) / count


async def batched_nodes(st: Any, user: str, count: int, *, inline: bool) -> float:
    """Lower bound of a batched commit of ``count`` small files: their node rows in one statement
    in one transaction that also locks the owner and updates its usage once; with ``inline``, each
    row also carries the file's 4 KiB (a ``bytea`` column the bench adds: content in the database,
    no object per file). Seconds per file."""
    ns = st.namespace
    owner = await ns.owner_id(user)
    folder = f"batch-{secrets.token_hex(4)}"
    await st.mkdir(user, (folder,))
    pool = ns._pool  # a benchmark of raw statements beside the real ones
    await pool.execute("ALTER TABLE nodes ADD COLUMN IF NOT EXISTS bench_data bytea")
    parent = await pool.fetchval("SELECT id FROM nodes WHERE owner_id = $1 AND name = $2", owner, folder)
    names = [f"f{i:05d}" for i in range(count)]
    datas = [secrets.token_bytes(4 * KiB) if inline else None for _ in range(count)]
    t = time.perf_counter()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT used FROM owners WHERE id = $1 FOR UPDATE", owner)
        await conn.execute(
            "INSERT INTO nodes (owner_id, parent_id, name, kind, size, mtime_ns, mode, bench_data) "
            "SELECT $1, $2, n, 'f', 4096, 0, 420, d FROM unnest($3::text[], $4::bytea[]) AS x(n, d)",
            owner,
            parent,
            names,
            datas,
        )
        await conn.execute("UPDATE owners SET used = used + $2, files = files + $3 WHERE id = $1", owner,
                           4096 * count, count)  # fmt: skip
    return (time.perf_counter() - t) / count


async def packed_object(st: Any, count: int) -> float:
    """``count`` small files packed into one object (one put of ``count`` x 4 KiB); seconds per file."""
    data = secrets.token_bytes(4 * KiB * count)
    ref = ChunkRef(next(_ids), 1, blake3.blake3(data).digest(), len(data), False)
    t = time.perf_counter()
    await st.chunks.put(ref, data)
    took = time.perf_counter() - t
    await st.chunks.delete(st.chunks.key(ref))
    return took / count


async def round_trips(dsn: str, reps: int, count: int = 300) -> list[list[str]]:
    """The database's primitive costs: a round trip, and a write transaction's commit (WAL flush)
    with ``synchronous_commit`` on (PostgreSQL's default) and off."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_probe (id int PRIMARY KEY, v bigint)")
        await conn.execute("INSERT INTO bench_probe VALUES (1, 0) ON CONFLICT DO NOTHING")
        cases = [
            ("round trip (SELECT 1)", "SELECT 1", "on"),
            ("write transaction, synchronous_commit on (flush to disk)", "UPDATE bench_probe SET v = v + 1", "on"),
            ("write transaction, synchronous_commit off", "UPDATE bench_probe SET v = v + 1", "off"),
        ]
        times: dict[str, list[float]] = {}
        for _ in range(reps):
            for label, sql, sync in cases:
                await conn.execute(f"SET synchronous_commit = {sync}")
                t = time.perf_counter()
                for _ in range(count):
                    await conn.execute(sql)
                times.setdefault(label, []).append((time.perf_counter() - t) / count)
        setting = await conn.fetchval("SHOW wal_sync_method")
    finally:
        await conn.close()
    return [[label, f"{median(times[label]) * 1e3:.3f} ms", f"wal_sync_method {setting}" if "on (" in label else ""]
            for label, _, _ in cases]  # fmt: skip


def part_namespace(opts: argparse.Namespace) -> None:
    """Round trips and time per small-file commit; reads; batching."""
    name, dsn = create_database()
    rows: list[list[str]] = []
    try:
        rows.extend(asyncio.run(round_trips(dsn, opts.reps)))
        with weed_at(Path("/dev/shm"), "ns") as weed:

            async def run() -> None:
                for reset in (True, False):
                    stmts = Statements()
                    async with storage(dsn, weed, reset=reset, stmts=stmts) as st:
                        user = f"u{secrets.token_hex(3)}"
                        await st.usage(user)  # owner row and home made once, outside the counts
                        await small_files(st, user, "warm", 20, 1)
                        label = "pool reset on (asyncpg default)" if reset else "pool reset off"
                        seq, par, many = [], [], []
                        stmts.count, requests = 0, st.chunks.count()
                        requests.clear()
                        per_file_stmts = per_file_s3 = 0.0
                        phases = Phases(
                            {
                                "claim the chunk row": (st.namespace, "claim_loose_chunk"),
                                "put the object": (st.chunks, "put"),
                                "mark it stored": (st.namespace, "mark_stored"),
                                "commit (one transaction)": (st.namespace, "commit_small"),
                            }
                        )
                        for rep in range(opts.reps):
                            before, s3_before = stmts.count, sum(requests.values())
                            phases.seconds.clear()
                            seq.append(await small_files(st, user, f"seq{rep}", opts.files, 1))
                            split = ", ".join(f"{k} {v / opts.files * 1e3:.2f}" for k, v in phases.seconds.items())
                            log(f"sequential small-file commit, ms per file ({label}): {split}")
                            per_file_stmts = (stmts.count - before - 1) / opts.files  # the mkdir: 1 tx
                            per_file_s3 = (sum(requests.values()) - s3_before) / opts.files
                            par.append(await small_files(st, user, f"par{rep}", opts.files, 16))
                            users = [f"m{rep}x{i}{secrets.token_hex(2)}" for i in range(16)]
                            many.append(await small_files_many_users(st, users, opts.files, 16))
                        stat_t = []
                        for _ in range(opts.reps):
                            t = time.perf_counter()
                            for i in range(200):
                                await st.stat(user, ("seq0", f"f{i % opts.files:05d}"))
                            stat_t.append((time.perf_counter() - t) / 200)
                        before = stmts.count
                        await st.stat(user, ("seq0", "f00000"))
                        stat_stmts = stmts.count - before
                        list_t = []
                        for _ in range(opts.reps):
                            t = time.perf_counter()
                            await st.list_dir(user, ("seq0",), limit=1000)
                            list_t.append(time.perf_counter() - t)
                        batch = [await batched_nodes(st, user, 100, inline=False) for _ in range(opts.reps)]
                        inline = [await batched_nodes(st, user, 100, inline=True) for _ in range(opts.reps)]
                        packed = [await packed_object(st, 100) for _ in range(opts.reps)]
                        rows.extend(
                            [
                                [f"small file (4 KiB) commit, sequential — {label}", f"{median(seq) * 1e3:.2f} ms",
                                 f"{per_file_stmts:.1f} statements, {per_file_s3:.1f} S3 requests"],
                                [f"small file commit, 16 in flight, one user — {label}", f"{median(par) * 1e3:.2f} ms", ""],
                                [f"small file commit, 16 in flight, 16 users — {label}", f"{median(many) * 1e3:.2f} ms",
                                 ""],
                                [f"stat of a file two levels down — {label}", f"{median(stat_t) * 1e3:.2f} ms",
                                 f"{stat_stmts} statements"],
                                [f"list a folder of {opts.files} files (one page) — {label}",
                                 f"{median(list_t) * 1e3:.1f} ms", ""],
                                [f"batched commit of 100 files, node rows only — {label}",
                                 f"{median(batch) * 1e3:.3f} ms", "4 statements per 100 files"],
                                [f"batched commit of 100 files, 4 KiB inline in each row — {label}",
                                 f"{median(inline) * 1e3:.3f} ms", "4 statements per 100 files, no object"],
                                [f"100 files packed in one 400 KiB object — {label}",
                                 f"{median(packed) * 1e3:.3f} ms", "1 S3 put per 100 files"],
                            ]
                        )  # fmt: skip
                        if reset:
                            top = stmts.by_text.most_common(12)
                            log("statements seen (most frequent first):\n" + "\n".join(f"  {n:6d}  {q}" for q, n in top))

            asyncio.run(run())
    finally:
        drop_database(name)
    print(f"\n## namespace (PostgreSQL on loopback, weed on tmpfs, {opts.reps} reps, medians; time per file)\n")
    print(table(["operation", "time", "round trips"], rows, markdown=True))


# --- servers: 1 and 3 ferry serve behind HAProxy, a burst of clients -----------------------------------


async def _seed(port: int, names: list[str], f4k: Path, base: Path) -> None:
    """Put ``f4k`` into every account's home (object backend: one namespace for all servers)."""
    from ferry.client.aclient import AsyncClient
    from ferry.client.known_hosts import KnownHosts

    known = KnownHosts(base / "seed_known_hosts")
    slots = asyncio.Semaphore(8)

    async def one(user: str) -> None:
        async with slots, await AsyncClient.connect("127.0.0.1", port, user=user, password=PASSWORD, known_hosts=known) as c:
            await c.put(f4k, "f4k")

    await one(names[0])  # pins the certificate once
    await asyncio.gather(*(one(n) for n in names[1:]))


def _pg_transactions(dbname: str) -> int:
    """Committed + rolled-back transactions of ``dbname`` so far (pg_stat_database)."""
    return int(run_sql(f"SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{dbname}'")[0])


def _settled_transactions(dbname: str, timeout: float = 15.0) -> int:
    """:func:`_pg_transactions` once it stops moving: PostgreSQL backends report their counts when
    idle, up to ~10 s late, so a count read at once would miss the burst's last transactions."""
    deadline = time.monotonic() + timeout
    last = _pg_transactions(dbname)
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = _pg_transactions(dbname)
        if now == last:
            break
        last = now
    return last


def part_servers(opts: argparse.Namespace) -> None:
    """``opts.clients`` clients started within one second (login with a password, 4 KiB get, 4 KiB
    put) through HAProxy in front of 1 and of 3 ``ferry serve`` processes that share one PostgreSQL
    accounts database and one certificate, alternating 1 and 3 for ``opts.reps`` rounds.

    ``--servers-backend object`` (the default): the servers share one namespace too (``--store`` on a
    weed of this run, ``--db``), every account's 4 KiB file put once through a client beforehand.
    ``folder``: each server its own ``--root``, the file written into every home on every server, so
    this measures the front ends alone (TLS, login, sessions, the shared accounts).
    """
    name, dsn = create_database()
    servers: list[FerryServer] = []
    proxies: list[Any] = []
    objects = opts.servers_backend == "object"
    try:
        with tempfile.TemporaryDirectory(prefix="ferry-scale-servers-") as tmp, contextlib.ExitStack() as stack:
            base = Path(tmp)
            weed = stack.enter_context(weed_at(Path("/dev/shm"), "servers")) if objects else None
            cert_pem, key_pem = generate_certificate()
            (base / "cert.pem").write_bytes(cert_pem)
            (base / "key.pem").write_bytes(key_pem)
            os.chmod(base / "key.pem", 0o600)
            names = [f"u{i:04d}" for i in range(opts.users)]
            log(f"servers: {len(names)} accounts (production argon2id) in PostgreSQL...")
            acc = Accounts(None, db=dsn, hasher=default_hasher())
            try:
                for n in names:
                    acc.add(n, PASSWORD)
            finally:
                acc.close()
            f4k = os.urandom(4 * KiB)
            local = base / "local"
            local.mkdir()
            limits = [
                "--max-pending-logins-per-address",
                str(opts.clients + 64),
                "--max-pending-logins",
                "2048",
                # Every login pays its argon2id check (no verified-password cache): otherwise a
                # repetition would find the previous one's passwords cached on one server and not on
                # three, and the comparison would measure the cache, not the servers.
                "--password-cache",
                "0",
            ]
            common = ["--db", dsn, "--cert", str(base / "cert.pem"), "--key", str(base / "key.pem"), *limits]
            env = dict(os.environ)
            if weed is not None:
                common += ["--store", f"s3://{weed.bucket}/servers/"]
                env.update(weed.env())
            for i in range(4):  # one alone, then three together
                root = base / f"root{i}"
                for n in names if weed is None else ():
                    (root / "homes" / n).mkdir(parents=True, mode=0o700)
                    (root / "homes" / n / "f4k").write_bytes(f4k)
                servers.append(FerryServer(root, False, env=env, args=common).start())
            if weed is not None:
                (base / "f4k").write_bytes(f4k)
                log(f"servers: putting f4k for {len(names)} accounts into the shared namespace...")
                asyncio.run(_seed(servers[0].port, names, base / "f4k", base))
            sets = {1: servers[:1], 3: servers[1:]}
            for count, members in sets.items():
                proxies.append(
                    start_haproxy(base / f"haproxy{count}", [("127.0.0.1", s.port) for s in members])
                )
            ports = {1: proxies[0].port, 3: proxies[1].port}
            results: dict[int, list[dict[str, float]]] = {1: [], 3: []}
            failures: dict[int, Counter[str]] = {1: Counter(), 3: Counter()}
            for rep in range(opts.reps):
                for count in (1, 3) if rep % 2 == 0 else (3, 1):
                    members = sets[count]
                    here = local / f"r{rep}-{count}"
                    here.mkdir()
                    (here / "up4k").write_bytes(os.urandom(4 * KiB))
                    cpu0 = [s.cpu() or 0.0 for s in members]
                    tx0 = _settled_transactions(name)
                    res = asyncio.run(
                        burst(
                            ports[count],
                            False,
                            Logins("password"),
                            names,
                            local / f"r{rep}-{count}",
                            opts.clients,
                            1.0,
                        )
                    )
                    cpu = sum((s.cpu() or 0.0) - c for s, c in zip(members, cpu0, strict=True))
                    tx = _settled_transactions(name) - tx0
                    ok = [o for o in res.outcomes if o.ok]
                    failures[count].update(o.kind for o in res.outcomes if not o.ok)
                    logins = [o.login for o in res.outcomes if o.login is not None]
                    # n clients, the pinning client and the straggler all logged in and were served
                    served = len(res.outcomes) + 2
                    results[count].append(
                        {
                            "ok": len(ok),
                            "failed": len(res.outcomes) - len(ok),
                            "login_p50": percentile(logins, 0.5),
                            "login_p99": percentile(logins, 0.99),
                            "total_p99": percentile([o.total for o in ok], 0.99),
                            "wall": res.wall,
                            "cpu_ms": 1000 * cpu / served,
                            "tx": tx / served,
                        }
                    )
                    log(
                        f"servers: rep {rep + 1}, {count} server(s): ok {len(ok)}/{opts.clients}, wall {res.wall:.2f} s"
                    )
            rows = []
            for count in (1, 3):
                rs = results[count]
                rows.append(
                    [
                        str(count),
                        f"{min(r['ok'] for r in rs):.0f}-{max(r['ok'] for r in rs):.0f} / {opts.clients}",
                        ", ".join(f"{k} {v}" for k, v in failures[count].most_common()) or "0",
                        fmt_num(median(r["login_p50"] for r in rs), 2, " s"),
                        fmt_num(median(r["login_p99"] for r in rs), 2, " s"),
                        fmt_num(median(r["total_p99"] for r in rs), 2, " s"),
                        fmt_num(median(r["wall"] for r in rs), 2, " s"),
                        fmt_num(median(r["cpu_ms"] for r in rs), 1, " ms"),
                        fmt_num(median(r["tx"] for r in rs), 1),
                    ]
                )
            print(
                f"\n## servers behind HAProxy ({opts.servers_backend} backend, {opts.clients} clients within 1 s, "
                f"{len(names)} accounts, {opts.reps} reps, medians)\n"
            )
            print(
                table(
                    [
                        "servers",
                        "ok (min-max)",
                        "failed (all reps)",
                        "login p50",
                        "login p99",
                        "client p99",
                        "burst wall",
                        "server CPU / client",
                        "DB transactions / client",
                    ],
                    rows,
                    markdown=True,
                )
            )
    finally:
        for h in proxies:
            h.stop()
        for s in servers:
            s.stop()
        drop_database(name)


# --- part 4: the folder backend against the object backend -------------------------------------------


class CountingRelay:
    """A TCP relay (its own thread and loop) in front of PostgreSQL that counts *round trips*: the
    times a client sent something after having received an answer (pipelined statements sent in
    one go count once, which is what a round trip is). Point a server's ``--db`` at :attr:`port`."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.round_trips = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> CountingRelay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the counting relay did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            async with server:
                await server.serve_forever()

        with contextlib.suppress(Exception):
            self._loop.run_until_complete(main())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(*self.target)
        turn = {"answered": True}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(1 << 16):
                    if upstream and turn["answered"]:
                        self.round_trips += 1
                    turn["answered"] = not upstream
                    dst.write(data)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def s3_requests(metrics_port: int) -> int:
    """Requests the S3 gateway has answered so far (its Prometheus counter)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("SeaweedFS_s3_request_total")))


def _vary(path: Path, rep: int) -> None:
    """Make ``path``'s every 4 MiB chunk unique, and new for repetition ``rep`` (16 bytes at each chunk
    start: the repetition and the offset): the object backend de-duplicates per user, so a put of bytes
    it holds (the big file repeats one random block) would store nothing."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        for off in range(0, size, CHUNK_SIZE):
            f.seek(off)
            f.write(rep.to_bytes(8, "little") + off.to_bytes(8, "little"))


def part_backends(opts: argparse.Namespace) -> None:
    """1 GiB put and get and a tree of ``opts.tree`` x 4 KiB put -r and get -r through the ferry CLI,
    plain TCP, against one ``ferry serve`` on the folder backend and one on the object backend
    (``--store`` on weed with its volumes on tmpfs, ``--db`` through a round-trip-counting relay),
    round-robin, alternating which backend goes first; per operation the server's CPU, the store's
    CPU, database round trips and S3 requests."""
    name, dsn = create_database()
    relay = CountingRelay("127.0.0.1", 5432).start()
    relay_dsn = dsn.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    assert relay_dsn != dsn, dsn
    servers: dict[str, FerryServer] = {}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    try:
        with tempfile.TemporaryDirectory(prefix="ferry-scale-backends-", dir=shm) as tmp, weed_at(
            shm, "backends", args=[f"-metricsPort={(metrics := _free_port())}"]
        ) as weed:
            base = Path(tmp)
            big = base / "big.bin"
            make_big_file(big, opts.size_mib << 20)
            tree = base / "tree"
            make_tree(tree, opts.tree, 4 * KiB)
            env = dict(os.environ, FERRY_HOME=str(base / "client-home"), FERRY_PASSWORD=PASSWORD, FERRY_USER="bench",
                       PYTHONUNBUFFERED="1", **weed.env())  # fmt: skip
            env.pop("FERRY_DB", None)
            # Each operation a fresh command for both backends: no resident connection in between.
            env["FERRY_RESIDENT"] = "0"
            (base / "folder").mkdir()
            ferry_add_user(base / "folder", "bench", PASSWORD, env)
            r = subprocess.run([*FERRY, "user", "add", "bench", "--db", dsn, "--password-stdin"], input=PASSWORD + "\n",
                               capture_output=True, text=True, env=env, timeout=120, check=False)  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(f"ferry user add --db failed: {r.stderr}")
            servers["folder"] = FerryServer(base / "folder", True, env=env).start()
            store = ["--db", relay_dsn, "--store", f"s3://{weed.bucket}/bench/"]
            servers["object"] = FerryServer(base / "object", True, env=env, args=store).start()
            cases = [c.strip() for c in opts.backend_cases.split(",") if c.strip()]
            samples: dict[tuple[str, str], list[dict[str, float]]] = {}
            for rep in range(opts.reps):
                _vary(big, rep + 1)
                for f in sorted(tree.rglob("*"))[: opts.tree]:
                    if f.is_file():
                        _vary(f, rep + 1)
                order = ["folder", "object"] if rep % 2 == 0 else ["object", "folder"]
                for case in cases:
                    for backend in order:
                        srv = servers[backend]
                        local_dst = base / f"got-{backend}"
                        _remove(local_dst)
                        # A tree of its own per repetition: a put -r into an existing folder puts the
                        # tree inside it (as cp -r does), and the get -r would then get both.
                        remote = "big.bin" if "-r" not in case else f"tree-{rep}"
                        loc = f"bench@127.0.0.1:{remote}"
                        verb, *flags = case.split()
                        src_dst = [str(big if not flags else tree), loc] if verb == "put" else [loc, str(local_dst)]
                        argv = [*FERRY, verb, *flags, "--plain", "--port", str(srv.port), *src_dst]
                        wait_quiet(10)
                        cpu0, weed0 = srv.cpu() or 0.0, cpu_seconds(weed.proc.pid) or 0.0
                        rt0, s30 = relay.round_trips, s3_requests(metrics)
                        t0 = time.perf_counter()
                        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800, check=False)
                        wall = time.perf_counter() - t0
                        if done.returncode != 0:
                            raise RuntimeError(f"{backend} {case} failed: {done.stderr.strip()}")
                        if verb == "get":
                            got = local_dst
                            nbytes = sum(p.stat().st_size for p in got.rglob("*") if p.is_file()) if got.is_dir() else got.stat().st_size
                            want = big.stat().st_size if not flags else opts.tree * 4 * KiB
                            if nbytes != want:
                                raise RuntimeError(f"{backend} {case}: got {nbytes} bytes, expected {want}")
                        ops = 1  # (a tree is one operation: its per-file figures would round to 0)
                        sample = {
                            "wall": wall,
                            "server_cpu": (srv.cpu() or 0.0) - cpu0,
                            "store_cpu": (cpu_seconds(weed.proc.pid) or 0.0) - weed0 if backend == "object" else 0.0,
                            "db_rt": (relay.round_trips - rt0) / ops if backend == "object" else 0.0,
                            "s3": (s3_requests(metrics) - s30) / ops if backend == "object" else 0.0,
                            "ops": ops,
                        }
                        samples.setdefault((case, backend), []).append(sample)
                        log(f"backends: rep {rep + 1} {case:6} {backend:6} {wall:.2f} s")
                        _remove(local_dst)
            rows = []
            for case in cases:
                walls = {b: median(x["wall"] for x in samples[(case, b)]) for b in ("folder", "object")}
                for b in ("folder", "object"):
                    xs = samples[(case, b)]
                    ops = xs[0]["ops"]
                    rows.append(
                        [
                            case if "-r" not in case else f"{case} ({opts.tree:,} files)",
                            b,
                            fmt_num(walls[b], 2, " s"),
                            fmt_num(walls["folder"] / walls[b], 2) if b == "object" else "1",
                            fmt_num(1000 * median(x["server_cpu"] for x in xs) / ops, 2, " ms"),
                            fmt_num(1000 * median(x["store_cpu"] for x in xs) / ops, 2, " ms") if b == "object" else "-",
                            fmt_num(median(x["db_rt"] for x in xs), 1) if b == "object" else "-",
                            fmt_num(median(x["s3"] for x in xs), 1) if b == "object" else "-",
                        ]
                    )
            size = f"{opts.size_mib / 1024:g} GiB" if opts.size_mib >= 1024 else f"{opts.size_mib} MiB"
            print(f"\n## folder vs object backend ({size} file, {opts.tree:,} x 4 KiB tree, plain TCP, {opts.reps} reps, medians)\n")
            print(
                table(
                    [
                        "operation",
                        "backend",
                        "wall",
                        "speed vs folder",
                        "server CPU / op",
                        "store CPU / op",
                        "DB round trips / op",
                        "S3 requests / op",
                    ],
                    rows,
                    markdown=True,
                )
            )
    finally:
        for srv in servers.values():
            srv.stop()
        relay.stop()
        drop_database(name)


def _remove(path: Path) -> None:
    """Remove what a get left at ``path`` (a file or a folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- main ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--parts", default="store,namespace,servers,backends", help="comma-separated: store, namespace, servers, backends"
    )
    ap.add_argument(
        "--servers-backend", choices=["object", "folder"], default="object", help="the servers part's storage backend"
    )
    ap.add_argument("--backend-cases", default="put,get,put -r,get -r", help="the backends part's operations")
    ap.add_argument("--size-mib", type=int, default=1024, help="MiB of the big file in the backends part")
    ap.add_argument("--tree", type=int, default=10_000, help="4 KiB files of the tree in the backends part")
    ap.add_argument("--clients", type=int, default=200, help="clients per burst in the servers part")
    ap.add_argument("--users", type=int, default=200, help="accounts in the servers part (one per client)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--big", type=int, default=32, help="4 MiB objects per store run")
    ap.add_argument("--small", type=int, default=500, help="4 KiB objects per store run")
    ap.add_argument("--inflight", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--files", type=int, default=200, help="small files per namespace run")
    ap.add_argument(
        "--disk-dir",
        default=tempfile.gettempdir(),
        help="a folder on a disk, for weed's volumes in the disk case (default: the temporary folder)",
    )
    opts = ap.parse_args()
    parts = {p.strip() for p in opts.parts.split(",") if p.strip()}
    unknown = parts - {"store", "namespace", "servers", "backends"}
    if unknown:
        raise SystemExit(f"unknown part(s): {', '.join(sorted(unknown))}")
    if "store" in parts:
        part_store(opts)
    if "namespace" in parts:
        part_namespace(opts)
    if "servers" in parts:
        part_servers(opts)
    if "backends" in parts:
        part_backends(opts)


if __name__ == "__main__":
    main()
