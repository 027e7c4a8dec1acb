"""Downloads and uploads on the object backend (ferry.server.objectsvc.transfer): what is its own.

The transfer behaviour both backends share runs over both (``pytest.mark.backends`` in the transfer
tests, the conformance matrix); here: the chunked store underneath (parameters other than the
store's, resume through another server, damaged and missing chunks, the quota the database keeps).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import obstore
import pytest

from components import Weed, run_sql
from ferry.client.aclient import AsyncClient
from ferry.client.stdio import put_stream
from ferry.client.transfer import TransferResult, partial_path, upload_token
from ferry.errors import ChunkDamaged, ConnectionBroken, DiskFull, RemoteTransferError, ServerBusy
from ferry.hashing import ChunkHasher
from ferry.paths import log_file
from ferry.server.context import Limits
from ferry.store.api import CHUNK_SIZE
from ferry.store.chunks import open_store
from ferry.wire import messages as m
from ferry_server import ServerThread
from store_support import open_storage, s3_config
from transfer_support import (
    Interrupt,
    await_until,
    connect,
    interrupt_after,
    no_sessions,
    remote_bytes,
    running_server,
)

pytestmark = [pytest.mark.cell(backend="object"), pytest.mark.timeout(90)]

MiB = 1 << 20


@pytest.mark.parametrize(
    "size",
    [0, 5, 300_000, 4 * MiB, 9 * MiB + 123],
    ids=["empty", "tiny", "small", "one-chunk", "three-chunks"],
)
def test_roundtrip_with_the_stores_and_other_parameters(client: Any, tmp_path: Path, size: int) -> None:
    """The store's parameters (BLAKE3, 4 MiB: the stored hashes are the transfer's) and others (md5,
    64 KiB: hashed while streaming) give the same bytes and the digest each side computes."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(size))
    c = client
    r = c.put(src, "f")
    g = c.get("f", tmp_path / "back")
    assert g.digest == r.digest and (tmp_path / "back").read_bytes() == src.read_bytes()
    g = c.get("f", tmp_path / "md5", hash="md5", chunk_size=1 << 16)
    assert (tmp_path / "md5").read_bytes() == src.read_bytes()
    r = c.put(src, "g", hash="md5", chunk_size=1 << 16)
    g = c.get("g", tmp_path / "g", hash="md5", chunk_size=1 << 16)
    assert g.digest == r.digest and (tmp_path / "g").read_bytes() == src.read_bytes()
    assert c.stat("g").size == c.stat("f").size == size


def put_bytes_logged(srv: ServerThread, path: str) -> list[int]:
    """The data bytes each successful put of ``path`` on ``srv`` received (its ``op=put`` log lines)."""
    text = log_file(srv.root).read_text(encoding="utf-8")
    return [int(n) for n in re.findall(rf" op=put path={re.escape(path)} bytes=(\d+) .* result=ok", text)]


def test_an_interrupted_put_resumes_through_another_server_sending_only_the_missing_chunks(
    server: ServerThread,
    tmp_path: Path,
    pg_dsn: str,
    weed: Weed,
    s3_prefix: str,
) -> None:
    """Server A loses the client mid-upload (its connection cut); the same put through server B (same
    store, same database) continues after the chunks A stored: they are not sent again."""
    size = 4 * CHUNK_SIZE + 12345
    src = tmp_path / "big.bin"
    data = os.urandom(size)
    src.write_bytes(data)

    async def cut_on_a() -> None:
        c = await connect(server, tmp_path)
        try:
            with pytest.raises((Interrupt, ConnectionBroken)):
                await c.put(src, "big.bin", progress=interrupt_after(11 * MiB, c.mux.transport.abort))
        finally:
            await c.close()
        assert await await_until(lambda: no_sessions(server))  # A stored what it had and let go

    asyncio.run(cut_on_a())
    with running_server(tmp_path / "b", users=(), db=pg_dsn, store=s3_config(weed, s3_prefix)) as b:

        async def resume_on_b() -> None:
            async with await connect(b, tmp_path) as c:
                assert await c.listdir("") == []  # nothing visible before the commit
                r = await c.put(src, "big.bin")
                assert r.resumed_from >= 2 * CHUNK_SIZE, r  # at least the chunks of the first 8 MiB
                assert r.resumed_from % CHUNK_SIZE == 0
                assert r.sent == size - r.resumed_from
                await c.get("big.bin", tmp_path / "back")
                assert (await c.df()).partial == 0  # the upload is gone with its commit
                # What B received, as its log line says (written just after its Ok).
                assert await await_until(lambda: put_bytes_logged(b, "big.bin") == [r.sent])

        asyncio.run(resume_on_b())
    assert (tmp_path / "back").read_bytes() == data


def test_a_cancelled_put_keeps_its_chunks_and_a_tokenless_one_does_not(
    server: ServerThread, tmp_path: Path
) -> None:
    size = 2 * CHUNK_SIZE + 7
    src = tmp_path / "f"
    data = os.urandom(size)
    src.write_bytes(data)
    st = src.stat()

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            with pytest.raises(Interrupt):
                await c.put(src, "f", progress=interrupt_after(6 * MiB))
            assert (await c.df()).partial == size  # kept (set aside) for a resume
            r = await c.put(src, "f")
            assert r.resumed_from == CHUNK_SIZE and r.sent == size - CHUNK_SIZE
            assert (await c.df()).partial == 0
            # The server's own token (none given): nobody could resume it, so nothing stays.
            req_id, route = c.mux.open(64)
            await c.send(m.PutFile(id=req_id, path="g", size=size, mtime=st.st_mtime))
            ready = await c.mux.expect(route, m.PutReady)
            assert ready.chunk_hashes == []
            await c.send(m.PutFrom(id=req_id, offset=0))
            await c.mux.send_data(req_id, m.STDIN, data[: CHUNK_SIZE + 1])
            await c.mux.cancel(req_id)
            c.mux.close_route(req_id)
            assert await await_until_async(lambda: c.df(), lambda d: d.partial == 0)
            assert [e.name for e in await c.listdir("")] == ["f"]

    asyncio.run(main())


async def await_until_async(get: Any, ok: Any, timeout: float = 10.0) -> bool:
    """Poll the coroutine function ``get`` until ``ok(result)`` or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if ok(await get()):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def test_a_damaged_or_missing_chunk_ends_the_download_and_the_client_keeps_no_bad_copy(
    server: ServerThread, tmp_path: Path, pg_dsn: str, weed: Weed, s3_prefix: str
) -> None:
    """A chunk object changed in the store, or a small file's bytes changed in the database (its
    chunk is inline), is found before any of its bytes is sent: ``corrupt``, the destination never
    appears, and what the client kept (the hidden partial of a resumable download) holds only bytes
    verified before the bad chunk."""
    size = 3 * CHUNK_SIZE + 99
    data = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(data)
    small = tmp_path / "small"
    small.write_bytes(os.urandom(1000))

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            await c.put(src, "big")
            await c.put(small, "small")
        storage = await open_storage(weed, s3_prefix, pg_dsn)
        try:
            big = await storage.open_file("alice", ("big",))
            tiny = await storage.open_file("alice", ("small",))
            keys = [storage.chunks.key(ref) for ref in big.chunks]
            store = open_store(s3_config(weed, s3_prefix))
            damaged = bytearray(await storage.read_chunk(big.chunks[1]))
            damaged[12345] ^= 1
            await obstore.put_async(store, keys[1], bytes(damaged))  # chunk 1: bytes changed
            # A small file's bytes are in its chunk row (inline): changed there, same size.
            assert tiny.chunks[0].data is not None
            await asyncio.to_thread(
                run_sql,
                f"UPDATE chunks SET data = decode('{os.urandom(1000).hex()}', 'hex') WHERE id = {tiny.chunks[0].id}",
                pg_dsn,
            )
        finally:
            await storage.close()
        async with await connect(server, tmp_path) as c:
            for name, params in (("big", {}), ("big", {"hash": "md5", "chunk_size": 1 << 16}), ("small", {})):
                dest = tmp_path / f"got-{name}"
                with pytest.raises(ChunkDamaged, match="object store" if name == "big" else "database"):
                    await c.get(name, dest, **params)
                assert not dest.exists()
                part = partial_path(dest)
                kept = part.read_bytes() if part.exists() else b""
                if name == "big":  # at most chunk 0, verified: what a resume may keep
                    assert len(kept) <= CHUNK_SIZE and kept == data[: len(kept)]
                else:  # refused before its info: no partial at all
                    assert not part.exists()
                part.unlink(missing_ok=True)
            assert await c.ping() < 5  # the session goes on

    asyncio.run(main())


def test_the_quota_is_checked_before_the_data_and_counts_uploads_on_every_server(
    server: ServerThread, tmp_path: Path, pg_dsn: str, weed: Weed, s3_prefix: str
) -> None:
    """An upload running on server A sets its size aside in the database: server B refuses what the
    quota cannot take as well, before a byte of data is sent; replacing a file counts what it frees."""
    server.add_user("bob", quota=10 * MiB)
    six = tmp_path / "six"
    data = os.urandom(6 * MiB)
    six.write_bytes(data)
    st = six.stat()
    hasher = ChunkHasher("blake3", CHUNK_SIZE)
    hasher.update(data)
    hashes, digest = hasher.finish()

    async def main() -> None:
        with running_server(tmp_path / "b", users=(), db=pg_dsn, store=s3_config(weed, s3_prefix)) as b:
            async with await connect(server, tmp_path, "bob") as a, await connect(b, tmp_path, "bob") as c:
                req_id, route = a.mux.open(64)
                token = upload_token("first", st)
                await a.send(
                    m.PutFile(id=req_id, path="first", size=len(data), mtime=st.st_mtime, token=token)
                )
                await a.mux.expect(route, m.PutReady)  # A's upload has its 6 MiB set aside ...
                with pytest.raises(DiskFull, match="quota"):  # ... so B refuses 6 more, before any data
                    await c.put(six, "second")
                assert (await c.df()).partial == len(data)
                await a.send(m.PutFrom(id=req_id, offset=0))
                await a.mux.send_data(req_id, m.STDIN, data)
                await a.send(m.FileEnd(id=req_id, size=len(data), chunk_hashes=hashes, digest=digest))
                await a.mux.expect(route, m.Ok)
                a.mux.close_route(req_id)
                with pytest.raises(DiskFull, match="quota"):
                    await c.put(six, "second")
                r = await c.put(six, "first")  # a replacement needs only the difference
                assert r.size == len(data)
                df = await c.df()
                assert (df.used, df.partial, df.quota) == (len(data), 0, 10 * MiB)
                assert [e.name for e in await c.listdir("")] == ["first"]

    asyncio.run(main())


def test_an_idle_upload_is_closed_and_the_same_put_resumes_after_what_it_stored(
    tmp_path: Path, pg_dsn: str, weed: Weed, s3_prefix: str
) -> None:
    """``--upload-idle-timeout`` on the object backend: an upload that receives nothing is closed (its
    place among the user's uploads given back, the client told why), its stored chunks kept."""
    timeout = 1.0
    limits = Limits(upload_idle_timeout=timeout, max_uploads_per_user=1)
    src = tmp_path / "src"
    data = os.urandom(3 * CHUNK_SIZE)
    src.write_bytes(data)
    st = src.stat()
    store = s3_config(weed, s3_prefix)
    with running_server(tmp_path / "root", limits=limits, db=pg_dsn, store=store) as srv:

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                req_id, route = c.mux.open()
                token = upload_token("f", st)
                await c.send(m.PutFile(id=req_id, path="f", size=len(data), mtime=st.st_mtime, token=token))
                await c.mux.expect(route, m.PutReady)
                await c.send(m.PutFrom(id=req_id, offset=0))
                for i in range(2):  # two whole chunks, then silence (a client that hangs)
                    await c.mux.send_data(req_id, m.STDIN, data[i * CHUNK_SIZE : (i + 1) * CHUNK_SIZE])
                with pytest.raises(ServerBusy):  # the idle upload holds the user's only place
                    await c.put(src, "other")
                with pytest.raises(RemoteTransferError) as info:
                    await c.mux.expect(route, m.Ok)
                c.mux.close_route(req_id)
                assert info.value.code == "cancelled"
                assert f"no data for {timeout:g} s" in str(info.value) and "kept" in str(info.value)
                r = await c.put(src, "f")  # the place is free again; the stored chunks are not resent
                assert r.resumed_from == 2 * CHUNK_SIZE, r
                g = await c.get("f", tmp_path / "back")
                assert g.digest == r.digest

        asyncio.run(main())
    assert (tmp_path / "back").read_bytes() == data


def pipe_of(data: bytes) -> tuple[int, threading.Thread]:
    """The read end of a pipe a thread writes ``data`` into (then closes); a reader that stops early
    closes its end, and the writer ends on the broken pipe."""
    r, w = os.pipe()

    def write() -> None:
        with contextlib.suppress(BrokenPipeError), open(w, "wb") as f:
            f.write(data)

    t = threading.Thread(target=write, daemon=True)
    t.start()
    return r, t


def test_a_streamed_upload_grows_within_the_quota(server: ServerThread, tmp_path: Path) -> None:
    """An upload of unknown size (``ferry put -``) is stored chunk by chunk as it comes; the quota
    stops it while the data comes and nothing of it is kept."""
    server.add_user("bob", quota=10 * MiB)
    first = os.urandom(2 * CHUNK_SIZE + 777)

    async def streamed(c: AsyncClient, data: bytes, name: str) -> TransferResult:
        r, t = pipe_of(data)
        try:
            return await put_stream(c.mux, r, name)
        finally:
            os.close(r)
            t.join(10)

    async def main() -> None:
        async with await connect(server, tmp_path, "bob") as c:
            res = await streamed(c, first, "piped")
            assert res.size == len(first)
            assert await remote_bytes(server, c, tmp_path, "piped") == first
            assert (await streamed(c, b"", "empty")).size == 0
            assert (await c.stat("empty")).size == 0
            with pytest.raises(DiskFull, match="quota"):
                await streamed(c, os.urandom(3 * CHUNK_SIZE), "more")
            assert sorted(e.name for e in await c.listdir("")) == ["empty", "piped"]
            df = await c.df()
            assert (df.used, df.partial) == (len(first), 0)

    asyncio.run(main())
