"""The object backend's chunks and uploads over the real SeaweedFS and PostgreSQL: round trips,
per-user de-duplication, resume through another server, quotas across servers, damaged chunks, the
sweeper (also racing a delete against an upload of the same content), and the store or the database
going away and coming back."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
from collections.abc import Callable
from typing import Any

import obstore
import pytest

from components import Weed
from ferry.errors import ChunkDamaged, DiskFull, StoreUnavailable, UploadGone
from ferry.store.api import CHUNK_SIZE, INLINE_MAX
from ferry.store.chunks import open_store
from ferry.store.objects import chunk_hash
from store_support import (
    chunks_of,
    digest_of,
    object_keys,
    open_storage,
    put_file,
    read_file,
    run,
    s3_config,
    write_from,
)

MiB = 1 << 20


def test_chunked_file_round_trip_with_digest(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 12345)

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            assert await put_file(st, "alice", ("f",), data) == 0
            f = await st.open_file("alice", ("f",))
            assert [c.hash for c in f.chunks] == [chunk_hash(c) for c in chunks_of(data)]
            assert f.node.digest == digest_of(data) and f.node.size == len(data)
            assert await read_file(st, "alice", ("f",)) == data
            up = await st.open_upload(
                "alice", ("h",), token="H", size=len(data), mode=0o644, mtime=1.0, overwrite=True, quota=None
            )
            with pytest.raises(ValueError):
                await st.write_chunk(up, 0, data[:100])  # a short chunk that is not the last
            with pytest.raises(ValueError):
                await st.write_chunk(up, 3, b"x")  # past the announced size
            await st.discard_upload(up)
            # Replacing a file reports the size it replaced and keeps usage exact.
            assert await put_file(st, "alice", ("f",), b"short") == len(data)
            assert (
                await st.store_small("alice", ("g",), b"", mode=0o600, mtime=5.0, overwrite=True, quota=None)
                == 0
            )
            assert await read_file(st, "alice", ("g",)) == b""
            usage = await st.usage("alice")
            assert (usage.used, usage.files, usage.reserved) == (5, 2, 0)
        finally:
            await st.close()

    run(main())


def test_identical_chunks_are_stored_once_per_user(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    data = os.urandom(CHUNK_SIZE + 1000)

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn, inline_max=-1)  # every chunk an object
        try:
            await put_file(st, "alice", ("one",), data)
            await put_file(st, "alice", ("two",), data)
            await st.store_small("alice", ("s1",), b"tiny", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            await st.store_small("alice", ("s2",), b"tiny", mode=0o644, mtime=1.0, overwrite=True, quota=None)
            await put_file(st, "bob", ("one",), data)
            alice, bob = await st.namespace.owner_id("alice"), await st.namespace.owner_id("bob")
            # alice: two chunks for both copies of data, one for both small files
            assert len(await object_keys(st, alice)) == 3
            # bob's identical chunks are his own objects: no cross-user de-duplication
            bob_keys = await object_keys(st, bob)
            assert len(bob_keys) == 2 and not bob_keys & await object_keys(st, alice)
            assert await read_file(st, "bob", ("one",)) == data
        finally:
            await st.close()

    run(main())


def test_upload_resumes_through_another_server_without_resending(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    data = os.urandom(3 * CHUNK_SIZE - 7)

    async def main() -> None:
        a = await open_storage(weed, s3_prefix, pg_dsn)
        up = await a.open_upload(
            "alice", ("big",), token="T1", size=len(data), mode=0o640, mtime=9.0, overwrite=True, quota=None
        )
        await write_from(a, up, data, 0, 2)  # two of three chunks, then server A is gone
        await a.close()
        b = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            assert (await b.usage("alice")).reserved == len(data)  # the partial keeps its reservation
            again = await b.open_upload(
                "alice",
                ("big",),
                token="T1",
                size=len(data),
                mode=0o640,
                mtime=9.0,
                overwrite=True,
                quota=None,
            )
            assert again.id == up.id
            assert [r.hash for r in again.held] == [chunk_hash(c) for c in chunks_of(data)[:2]]
            before = await object_keys(b)
            await write_from(b, again, data, len(again.held))
            assert len(await object_keys(b) - before) == 1  # only the missing chunk was written
            await b.commit_upload(again, digest=digest_of(data), overwrite=True, quota=None)
            assert await read_file(b, "alice", ("big",)) == data
            assert (await b.stat("alice", ("big",))).mode == 0o640
            with pytest.raises(UploadGone):
                await b.commit_upload(again, digest=digest_of(data), overwrite=True, quota=None)
        finally:
            await b.close()

    run(main())


def test_quota_holds_across_servers(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    quota = 10 * MiB
    data = os.urandom(6 * MiB)

    async def main() -> None:
        a = await open_storage(weed, s3_prefix, pg_dsn)
        b = await open_storage(weed, s3_prefix, pg_dsn)
        # Reservations only while uploads are live: lease 0 makes them count stored bytes only.
        a0 = await open_storage(weed, s3_prefix, pg_dsn, upload_lease=0)
        b0 = await open_storage(weed, s3_prefix, pg_dsn, upload_lease=0)
        try:
            for _ in range(3):
                # Two uploads through two servers at once: the second reservation does not fit.
                results = await asyncio.gather(
                    put_file(a, "alice", ("x",), data, quota=quota),
                    put_file(b, "alice", ("y",), data, quota=quota),
                    return_exceptions=True,
                )
                assert sorted(type(r).__name__ for r in results) == ["DiskFull", "int"], results
                assert (await a.usage("alice")).used == len(data)
                await a.remove("alice", ("x",) if isinstance(results[0], int) else ("y",))
            # Without reservations both uploads start and write; the commits, serialised on the
            # owner's row, still let only one through.
            ups = [
                await s.open_upload(
                    "bob",
                    (name,),
                    token=name,
                    size=len(data),
                    mode=0o644,
                    mtime=1.0,
                    overwrite=True,
                    quota=quota,
                )
                for s, name in ((a0, "p"), (b0, "q"))
            ]
            await asyncio.gather(write_from(a0, ups[0], data, 0), write_from(b0, ups[1], data, 0))
            results = await asyncio.gather(
                a0.commit_upload(ups[0], digest=digest_of(data), overwrite=True, quota=quota),
                b0.commit_upload(ups[1], digest=digest_of(data), overwrite=True, quota=quota),
                return_exceptions=True,
            )
            assert sorted(type(r).__name__ for r in results) == ["DiskFull", "int"], results
            assert [r.code for r in results if isinstance(r, DiskFull)] == ["quota"]
            assert (await a.usage("bob")).used == len(data) <= quota
        finally:
            for s in (a, b, a0, b0):
                await s.close()

    run(main())


def test_missing_or_damaged_chunk_is_detected_on_read(weed: Weed, s3_prefix: str, pg_dsn: str) -> None:
    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn, inline_max=-1)  # the chunk is an object
        try:
            await st.store_small(
                "alice", ("f",), b"precious bytes", mode=0o644, mtime=1.0, overwrite=True, quota=None
            )
            (ref,) = (await st.open_file("alice", ("f",))).chunks
            raw = open_store(s3_config(weed, s3_prefix))
            await obstore.put_async(raw, st.chunks.key(ref), b"precious bytez")  # same size, other bytes
            with pytest.raises(ChunkDamaged) as damaged:
                await st.read_chunk(ref)
            assert damaged.value.code == "corrupt" and "does not match" in str(damaged.value)
            await obstore.delete_async(raw, st.chunks.key(ref))
            with pytest.raises(ChunkDamaged, match="missing"):
                await st.read_chunk(ref)
        finally:
            await st.close()

    run(main())


def test_sweeper_gives_space_back_and_keeps_what_is_referenced(
    weed: Weed, s3_prefix: str, pg_dsn: str
) -> None:
    kept = os.urandom(CHUNK_SIZE + 10)
    gone = os.urandom(100)
    partial = os.urandom(CHUNK_SIZE + 20)

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn, inline_max=-1)  # objects (inline: test_store_small)
        try:
            await put_file(st, "alice", ("kept",), kept)
            await put_file(st, "alice", ("gone",), gone)
            up = await st.open_upload(
                "alice",
                ("partial",),
                token="P",
                size=len(partial),
                mode=0o644,
                mtime=1.0,
                overwrite=True,
                quota=None,
            )
            await write_from(st, up, partial, 0, 1)
            await st.remove("alice", ("gone",))
            all_keys = await object_keys(st)
            assert len(all_keys) == 4
            # Within the grace period nothing goes (a download of 'gone' may still be running).
            assert (await st.sweep(partial_max_age=3600, grace=3600)).chunks == 0
            report = await st.sweep(partial_max_age=3600, grace=0)
            assert (report.chunks, report.objects, report.bytes, report.uploads) == (1, 1, 100, 0)
            assert len(await object_keys(st)) == 3
            assert await read_file(st, "alice", ("kept",)) == kept
            # The partial upload's chunk survived, and the upload resumes.
            again = await st.open_upload(
                "alice",
                ("partial",),
                token="P",
                size=len(partial),
                mode=0o644,
                mtime=1.0,
                overwrite=True,
                quota=None,
            )
            assert len(again.held) == 1
            # Once stale, the partial goes, and then its chunk.
            report = await st.sweep(partial_max_age=0.000001, grace=0)
            assert (report.uploads, report.chunks) == (1, 1)
            assert len(await object_keys(st)) == 2
            # An object left behind without its row (a sweep that stopped half-way) is found too.
            raw = open_store(s3_config(weed, s3_prefix))
            orphan = f"{st.chunks.prefix}c/{up.owner}/{'ab' * 32}.999999999"
            await obstore.put_async(raw, orphan, b"orphan")
            assert (await st.sweep(partial_max_age=0, grace=0)).objects == 1
            assert orphan not in await object_keys(st)
            assert await read_file(st, "alice", ("kept",)) == kept
        finally:
            await st.close()

    run(main())


@pytest.mark.parametrize("path", ["upload", "small"])
def test_sweeper_racing_delete_and_upload_of_same_content(
    weed: Weed, s3_prefix: str, pg_dsn: str, path: str
) -> None:
    """Server A deletes a file while server B uploads the same bytes and a sweeper runs with no grace:
    whatever the interleaving, B's new file stays readable (its chunk is never swept)."""
    rounds = 12

    async def main() -> None:
        a = await open_storage(weed, s3_prefix, pg_dsn)
        b = await open_storage(weed, s3_prefix, pg_dsn)
        sweeper = await open_storage(weed, s3_prefix, pg_dsn)
        # With no grace at all, a small file's chunk could be swept between its claim and commit:
        # store_small then claims it again. Give that path the smallest realistic grace.
        grace = 0.0 if path == "upload" else 0.5
        stop = asyncio.Event()

        async def sweep_forever() -> int:
            n = 0
            while not stop.is_set() and n < 10_000:
                await sweeper.sweep(partial_max_age=0, grace=grace)
                n += 1
                await asyncio.sleep(0)
            return n

        async def store(s: Any, name: str, data: bytes) -> None:
            if path == "upload":
                await put_file(s, "alice", (name,), data)
            else:
                await s.store_small("alice", (name,), data, mode=0o644, mtime=1.0, overwrite=True, quota=None)

        sweeps = asyncio.create_task(sweep_forever())
        try:
            rng = random.Random(7)
            for i in range(rounds):
                data = secrets.token_bytes(3000)
                await store(a, f"old{i}", data)

                async def later(delay: float, fn: Callable[[], Any]) -> Any:
                    await asyncio.sleep(delay)
                    return await fn()

                await asyncio.gather(
                    later(rng.random() * 0.01, lambda i=i: a.remove("alice", (f"old{i}",))),
                    later(rng.random() * 0.01, lambda i=i, data=data: store(b, f"new{i}", data)),
                )
                assert await read_file(a, "alice", (f"new{i}",)) == data
        finally:
            stop.set()
            sweeps_done = await sweeps
            for s in (a, b, sweeper):
                await s.close()
        assert sweeps_done > rounds  # the sweeper really ran during the races

    run(main(), timeout=90)


def test_store_and_database_going_away_give_clear_errors_then_recover(
    weed: Weed, s3_prefix: str, pg_dsn: str, haproxy: Callable[..., Any], pg_database: str
) -> None:
    """Both behind a proxy that the test stops and starts again on the same port."""
    import urllib.parse

    pg = urllib.parse.urlsplit(pg_dsn)
    s3_port = int(weed.endpoint.rsplit(":", 1)[1])
    s3_proxy = haproxy([("127.0.0.1", s3_port)])
    pg_proxy = haproxy([(pg.hostname or "127.0.0.1", pg.port or 5432)])
    dsn = urllib.parse.urlunsplit(
        pg._replace(netloc=f"{pg.username or 'postgres'}@127.0.0.1:{pg_proxy.port}")
    )
    endpoint = f"http://127.0.0.1:{s3_proxy.port}"

    async def main() -> None:
        # Every chunk an object: a small file's bytes would not need the store.
        st = await open_storage(
            weed, s3_prefix, dsn, endpoint=endpoint, max_retries=1, retry_timeout=2.0, inline_max=-1
        )
        try:
            await st.store_small(
                "alice", ("before",), b"acknowledged", mode=0o644, mtime=1.0, overwrite=True, quota=None
            )
            s3_proxy.stop()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            with pytest.raises(StoreUnavailable, match="object store is unavailable") as err:
                await st.store_small(
                    "alice", ("during",), b"new bytes", mode=0o644, mtime=1.0, overwrite=True, quota=None
                )
            assert err.value.code == "unavailable" and loop.time() - t0 < 20
            with pytest.raises(StoreUnavailable):
                await st.read_chunk((await st.open_file("alice", ("before",))).chunks[0])
            pg_proxy.stop()
            with pytest.raises(StoreUnavailable, match="database is unavailable"):
                await st.stat("alice", ("before",))
            # Both come back on the same addresses: the same storage object works again.
            haproxy([("127.0.0.1", s3_port)], port=s3_proxy.port)
            haproxy([(pg.hostname or "127.0.0.1", pg.port or 5432)], port=pg_proxy.port)
            for _ in range(50):  # bounded: the pool reconnects on the next use
                try:
                    await st.stat("alice", ())
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.1)
            assert await read_file(st, "alice", ("before",)) == b"acknowledged"
            await st.store_small(
                "alice", ("after",), b"works", mode=0o644, mtime=1.0, overwrite=True, quota=None
            )
            assert await read_file(st, "alice", ("after",)) == b"works"
            with pytest.raises(Exception, match="no such file"):
                await st.stat("alice", ("during",))  # the failed write left nothing visible
        finally:
            await st.close()

    run(main(), timeout=90)


_WRITER = """
import asyncio, sys
sys.path[:0] = sys.argv[1:2]
from components import Weed
from store_support import open_storage, write_from

async def main(weed, prefix, dsn, data):
    st = await open_storage(weed, prefix, dsn)
    up = await st.open_upload("alice", ("killed",), token="K", size=len(data), mode=0o644, mtime=1.0,
                              overwrite=True, quota=None)
    await write_from(st, up, data, 0, 2)
    print("stored 2", flush=True)
    await asyncio.sleep(60)  # killed here, with its pool and S3 client open

weed = Weed(sys.argv[2], "ferry", sys.argv[3], sys.argv[4], None, None, None)
asyncio.run(main(weed, sys.argv[5], sys.argv[6], open(sys.argv[7], "rb").read()))
"""


def test_upload_of_a_process_killed_with_sigkill_resumes_elsewhere(
    weed: Weed, s3_prefix: str, pg_dsn: str, tmp_path: Any
) -> None:
    """A "server" process stores two chunks and is killed with SIGKILL; another resumes the upload
    and sends only the third chunk."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    data = os.urandom(2 * CHUNK_SIZE + INLINE_MAX + 99)  # the last chunk an object too
    src = tmp_path / "data"
    src.write_bytes(data)
    tests = str(Path(__file__).parent)
    args = [weed.endpoint, weed.access_key, weed.secret_key, s3_prefix, pg_dsn, str(src)]
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, tests, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "stored 2"  # bounded by the test timeout
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    async def main() -> None:
        st = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            up = await st.open_upload(
                "alice",
                ("killed",),
                token="K",
                size=len(data),
                mode=0o644,
                mtime=1.0,
                overwrite=True,
                quota=None,
            )
            assert len(up.held) == 2
            before = await object_keys(st)
            await write_from(st, up, data, len(up.held))
            assert len(await object_keys(st) - before) == 1
            await st.commit_upload(up, digest=digest_of(data), overwrite=True, quota=None)
            assert await read_file(st, "alice", ("killed",)) == data
        finally:
            await st.close()

    run(main())
