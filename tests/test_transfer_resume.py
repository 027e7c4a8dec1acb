"""Resumed transfers at the API level: interrupted downloads and uploads continue where verified data
ends, corrupted partial data is re-sent from the bad chunk on, and changed sources restart from zero.

Interruptions are a progress callback that raises (optionally after aborting the client's transport).
Tests marked ``backends`` also run on the object backend (tests/conformance.py); its uploads resume
by stored 4 MiB chunk, so they use that chunk size there (:func:`put_chunking`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from ferry.client.aclient import AsyncClient
from ferry.client.transfer import partial_path, upload_token
from ferry.errors import ConnectionBroken
from ferry.hashing import DEFAULT_CHUNK, ChunkHasher
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    SMALL_CHUNK,
    Interrupt,
    MiB,
    await_until,
    connect,
    home,
    interrupt_after,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    no_sessions,
    on_objects,
    partials,
    place,
    random_bytes,
    remote_bytes,
    unfinished_uploads,
    wait_until,
    write_random,
)

pytestmark = [pytest.mark.usefixtures("no_logged_errors"), pytest.mark.transports]

SIZE = 8 * MiB + 12345  # not a multiple of the chunk size: the last chunk is short


def put_chunking(server: ServerThread) -> tuple[int, int]:
    """(chunk size, bytes after which to interrupt) for an upload that must resume: the object
    backend resumes uploads only in its own 4 MiB chunks, so it is interrupted after more than one."""
    return (DEFAULT_CHUNK, 6 * MiB) if on_objects(server) else (SMALL_CHUNK, 4 * MiB)


def flip(path: Path, offset: int) -> None:
    """Invert one byte of ``path`` in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# --- downloads -----------------------------------------------------------------------------------


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_get_resumes_on_the_same_connection(server: ServerThread, tmp_path: Path) -> None:
    data = random_bytes(SIZE, 1)
    dest = tmp_path / "big.bin"

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            await place(server, c, tmp_path, "big.bin", data)
            with pytest.raises(Interrupt):
                await c.get("big.bin", dest, chunk_size=SMALL_CHUNK, progress=interrupt_after(3 * MiB))
            assert not dest.exists()
            held = partial_path(dest).stat().st_size
            assert 0 < held < SIZE
            r = await c.get("big.bin", dest, chunk_size=SMALL_CHUNK)
            assert 0 < r.resumed_from <= held
            assert r.resumed_from % SMALL_CHUNK == 0
            assert r.sent == SIZE - r.resumed_from < SIZE
            assert r.size == SIZE
            # The connection still serves requests in order after the abandoned download.
            assert [e.name for e in await c.listdir("")] == ["big.bin"]

    asyncio.run(main())
    assert dest.read_bytes() == data
    assert not partial_path(dest).exists()


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_get_resumes_after_the_connection_is_cut(server: ServerThread, tmp_path: Path) -> None:
    data = random_bytes(SIZE, 2)
    dest = tmp_path / "big.bin"

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            await place(server, c, tmp_path, "big.bin", data)
            with pytest.raises((Interrupt, ConnectionBroken)):
                await c.get(
                    "big.bin",
                    dest,
                    chunk_size=SMALL_CHUNK,
                    progress=interrupt_after(4 * MiB, c.mux.transport.abort),
                )
        finally:
            await c.close()
        assert not dest.exists()
        async with await connect(server, tmp_path) as c2:
            r = await c2.get("big.bin", dest, chunk_size=SMALL_CHUNK)
        assert r.resumed_from > 0
        assert r.sent == SIZE - r.resumed_from

    asyncio.run(main())
    assert dest.read_bytes() == data
    assert wait_until(lambda: no_sessions(server))


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_get_resends_from_a_corrupted_chunk_of_the_local_partial(
    server: ServerThread, tmp_path: Path
) -> None:
    chunk = 1 << 18
    data = random_bytes(SIZE, 3)
    dest = tmp_path / "big.bin"

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            await place(server, c, tmp_path, "big.bin", data)
            with pytest.raises(Interrupt):
                await c.get("big.bin", dest, chunk_size=chunk, progress=interrupt_after(6 * MiB))
            part = partial_path(dest)
            assert part.stat().st_size >= 5 * chunk  # at least chunks 0-4 are held
            flip(part, 3 * chunk + 777)  # corrupt chunk 3
            r = await c.get("big.bin", dest, chunk_size=chunk)
            assert r.resumed_from == 3 * chunk
            assert r.sent == SIZE - 3 * chunk

    asyncio.run(main())
    assert dest.read_bytes() == data


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_get_restarts_when_the_remote_file_changed(server: ServerThread, tmp_path: Path) -> None:
    dest = tmp_path / "big.bin"

    async def main() -> bytes:
        async with await connect(server, tmp_path) as c:
            await place(server, c, tmp_path, "big.bin", random_bytes(SIZE, 4))
            with pytest.raises(Interrupt):
                await c.get("big.bin", dest, chunk_size=SMALL_CHUNK, progress=interrupt_after(3 * MiB))
            assert partial_path(dest).stat().st_size > SMALL_CHUNK
            new = random_bytes(SIZE - 1000, 40)
            await place(server, c, tmp_path, "big.bin", new)  # replaced by a different file
            r = await c.get("big.bin", dest, chunk_size=SMALL_CHUNK)
            assert r.resumed_from == 0
            assert r.sent == r.size == SIZE - 1000
            return new

    new = asyncio.run(main())
    assert dest.read_bytes() == new


@pytest.mark.timeout(60)
def test_get_after_an_in_place_rewrite_that_kept_size_and_mtime(server: ServerThread, tmp_path: Path) -> None:
    """Tools such as ``rsync -t`` or ``touch -r`` restore the mtime after changing a file: the server
    must not serve the new bytes with the chunk hashes it cached for the old ones."""
    src = home(server) / "big.bin"
    write_random(src, SIZE, 5)
    st = src.stat()

    async def main() -> bytes:
        async with await connect(server, tmp_path) as c:
            await c.get("big.bin", tmp_path / "first.bin")  # caches the chunk hashes
            new = random_bytes(SIZE, 50)
            with open(src, "r+b") as f:  # same inode, same size
                f.write(new)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert src.stat().st_mtime_ns == st.st_mtime_ns
            await c.get("big.bin", tmp_path / "second.bin")
            return new

    new = asyncio.run(main())
    assert (tmp_path / "second.bin").read_bytes() == new


# --- uploads -------------------------------------------------------------------------------------


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_put_resumes_on_the_same_connection(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = write_random(src, SIZE, 6)
    chunk, cut = put_chunking(server)

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            with pytest.raises(Interrupt):
                await c.put(src, "big.bin", chunk_size=chunk, progress=interrupt_after(cut))
            assert await c.listdir("") == []  # the partial is hidden
            r = await c.put(src, "big.bin", chunk_size=chunk)
            assert r.resumed_from > 0
            assert r.sent == SIZE - r.resumed_from < SIZE

    async def check() -> None:
        # After the session ended (and cleaned up everything it held), the file is still the source.
        async with await connect(server, tmp_path) as c:
            assert await remote_bytes(server, c, tmp_path, "big.bin") == data
            assert (await c.stat("big.bin")).mtime == pytest.approx(src.stat().st_mtime, abs=1e-6)
            assert await unfinished_uploads(server, c) == 0

    asyncio.run(main())
    assert wait_until(lambda: no_sessions(server))
    asyncio.run(check())


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_put_resumes_after_the_connection_is_cut(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    data = write_random(src, SIZE, 7)
    chunk, cut = put_chunking(server)

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            with pytest.raises((Interrupt, ConnectionBroken)):
                await c.put(
                    src,
                    "big.bin",
                    chunk_size=chunk,
                    progress=interrupt_after(cut + MiB, c.mux.transport.abort),
                )
        finally:
            await c.close()
        assert await await_until(lambda: no_sessions(server))
        async with await connect(server, tmp_path) as c2:
            assert await unfinished_uploads(server, c2) > 0  # kept for the resume
            assert await c2.listdir("") == []
            r = await c2.put(src, "big.bin", chunk_size=chunk)
            assert r.resumed_from > 0
            assert r.sent == SIZE - r.resumed_from
            assert await remote_bytes(server, c2, tmp_path, "big.bin") == data
            assert await unfinished_uploads(server, c2) == 0

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_put_resends_from_a_corrupted_chunk_of_the_server_partial(
    server: ServerThread, tmp_path: Path
) -> None:
    chunk = 1 << 18
    src = tmp_path / "big.bin"
    data = write_random(src, SIZE, 8)
    h = home(server)

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            with pytest.raises((Interrupt, ConnectionBroken)):
                await c.put(
                    src,
                    "big.bin",
                    chunk_size=chunk,
                    progress=interrupt_after(6 * MiB, c.mux.transport.abort),
                )
        finally:
            await c.close()
        assert await await_until(lambda: no_sessions(server))
        [name] = partials(h)
        assert (h / name).stat().st_size >= 5 * chunk
        flip(h / name, 2 * chunk + 5)  # corrupt chunk 2 on the server's disk
        async with await connect(server, tmp_path) as c2:
            r = await c2.put(src, "big.bin", chunk_size=chunk)
        assert r.resumed_from == 2 * chunk
        assert r.sent == SIZE - 2 * chunk

    asyncio.run(main())
    assert (h / "big.bin").read_bytes() == data


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_put_restarts_when_the_local_file_changed(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    write_random(src, SIZE, 9)
    chunk, cut = put_chunking(server)

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            with pytest.raises(Interrupt):
                await c.put(src, "big.bin", chunk_size=chunk, progress=interrupt_after(cut))
            new = write_random(src, SIZE, 90)
            r = await c.put(src, "big.bin", chunk_size=chunk)
            assert r.resumed_from == 0
            assert r.sent == SIZE
            assert await remote_bytes(server, c, tmp_path, "big.bin") == new

    asyncio.run(main())


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_two_uploads_of_the_same_source_never_commit_a_torn_file(server: ServerThread, tmp_path: Path) -> None:
    """A second upload with the same token (e.g. a retry from a new connection while the server still
    serves the first one) shares the partial file. Whatever the interleaving, an Ok must mean the
    committed file is exactly the source, and at least one of the two uploads must succeed."""
    src = tmp_path / "big.bin"
    data = write_random(src, SIZE, 10)
    st = src.stat()
    token = upload_token("big.bin", st)
    hasher = ChunkHasher("blake3", SMALL_CHUNK)
    hasher.update(data)
    hashes, digest = hasher.finish()
    half = 4 * MiB
    piece = 1 << 18

    async def start(c: AsyncClient) -> tuple[int, Any]:
        req_id, route = c.mux.open(64)
        await c.send(
            m.PutFile(
                id=req_id, path="big.bin", size=SIZE, mtime=st.st_mtime, chunk_size=SMALL_CHUNK, token=token
            )
        )
        ready = await c.mux.recv(route)
        assert isinstance(ready, m.PutReady), ready
        await c.send(m.PutFrom(id=req_id, offset=0))  # offset 0 is always allowed
        return req_id, route

    async def send_range(c: AsyncClient, req_id: int, lo: int, hi: int) -> None:
        for pos in range(lo, hi, piece):
            await c.mux.send_data(req_id, m.STDIN, data[pos : min(pos + piece, hi)])
        assert await c.ping() < 5  # everything before the ping reached the server's handlers

    async def finish(c: AsyncClient, req_id: int, route: Any) -> bool:
        try:
            await c.send(m.FileEnd(id=req_id, size=SIZE, chunk_hashes=hashes, digest=digest))
            reply = await c.mux.recv(route)
        except ConnectionBroken:
            return False
        return isinstance(reply, m.Ok)

    srv = server
    h = home(srv)

    async def main() -> None:
        async with await connect(srv, tmp_path) as a, await connect(srv, tmp_path) as b:
            a_id, a_route = await start(a)
            await send_range(a, a_id, 0, half)
            b_id, b_route = await start(b)  # B takes the same partial while A is half-way
            await send_range(b, b_id, 0, piece)
            await send_range(a, a_id, half, SIZE)
            a_ok = await finish(a, a_id, a_route)
            if a_ok:
                assert (h / "big.bin").read_bytes() == data, "A got Ok for a torn file"
            with contextlib.suppress(ConnectionBroken):
                await send_range(b, b_id, piece, SIZE)
            b_ok = await finish(b, b_id, b_route)
            if b_ok:
                assert (h / "big.bin").read_bytes() == data, "B got Ok for a torn file"
            assert a_ok or b_ok

    asyncio.run(main())
    assert wait_until(lambda: no_sessions(srv))
    assert (h / "big.bin").read_bytes() == data
    assert partials(h) == []
