"""Integrity: bytes corrupted on the wire (either direction) or changed at the source are detected;
nothing appears under the final name and no unverified partial is left behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from ferry.client.mux import Mux
from ferry.client.transfer import partial_path
from ferry.errors import IntegrityError, TransferError
from ferry.server.session import Session
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    SMALL_CHUNK,
    MiB,
    connect,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    on_objects,
    place,
    random_bytes,
    remote_bytes,
    unfinished_uploads,
    write_random,
)

pytestmark = [pytest.mark.usefixtures("no_logged_errors"), pytest.mark.transports]

SIZE = 6 * MiB + 321


class Flipper:
    """Flips one bit in the ``nth`` data payload of at least ``min_len`` bytes that passes through."""

    def __init__(self, nth: int = 1, min_len: int = 4096) -> None:
        self.nth = nth
        self.min_len = min_len
        self.seen = 0
        self.flipped = 0

    def __call__(self, data: bytes | memoryview) -> bytes | memoryview:
        if len(data) < self.min_len:
            return data
        self.seen += 1
        if self.seen != self.nth:
            return data
        self.flipped += 1
        out = bytearray(data)
        out[len(out) // 2] ^= 0x10
        return bytes(out)


def corrupt_server_sends(monkeypatch: pytest.MonkeyPatch, flipper: Flipper) -> None:
    """Route every server data frame (TLS blocks and plain sendfile blocks) through ``flipper``."""
    original = Session.send_data

    async def send_data(self: Session, channel: int, stream: int, data: bytes | memoryview) -> None:
        await original(self, channel, stream, flipper(data))

    monkeypatch.setattr(Session, "send_data", send_data)
    monkeypatch.setattr(Session, "sendfile", sendfile_in_frames)


async def sendfile_in_frames(self: Session, channel: int, fileobj: Any, offset: int, count: int) -> int:
    """Stand-in for the kernel's sendfile: 1 MiB data frames through ``Session.send_data``."""
    sent = 0
    while sent < count:
        n = min(MiB, count - sent)
        data = os.pread(fileobj.fileno(), n, offset + sent)
        await self.send_data(channel, m.STDOUT, data + bytes(n - len(data)))
        sent += n
    return sent


@pytest.mark.backends
@pytest.mark.timeout(60)
@pytest.mark.parametrize("nth", [1, 3])
def test_download_corrupted_on_the_wire_is_detected(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    data = random_bytes(SIZE, 1)
    flipper = Flipper(nth)
    dest = tmp_path / "f.bin"

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            await place(server, c, tmp_path, "f.bin", data)
            corrupt_server_sends(monkeypatch, flipper)
            with pytest.raises(IntegrityError):
                await c.get("f.bin", dest, chunk_size=SMALL_CHUNK)
            assert flipper.flipped == 1
            assert not dest.exists()
            assert not partial_path(dest).exists()
            # The session survives and a clean retry (no more flips) succeeds from scratch.
            r = await c.get("f.bin", dest, chunk_size=SMALL_CHUNK)
            assert r.resumed_from == 0

    asyncio.run(main())
    assert dest.read_bytes() == data


@pytest.mark.backends
@pytest.mark.timeout(60)
@pytest.mark.parametrize("nth", [1, 4])
def test_upload_corrupted_on_the_wire_is_refused(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nth: int
) -> None:
    src = tmp_path / "f.bin"
    data = write_random(src, SIZE, 2)
    flipper = Flipper(nth)
    original = Mux.send_data

    async def send_data(self: Mux, channel: int, stream: int, payload: bytes | memoryview) -> None:
        await original(self, channel, stream, flipper(payload))

    monkeypatch.setattr(Mux, "send_data", send_data)

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            with pytest.raises(IntegrityError):
                await c.put(src, "f.bin", chunk_size=SMALL_CHUNK)
            assert flipper.flipped == 1
            assert await c.listdir("") == []
            # The corrupt partial was removed, not kept for resume.
            assert await unfinished_uploads(server, c) == 0
            r = await c.put(src, "f.bin", chunk_size=SMALL_CHUNK)
            assert r.resumed_from == 0
            assert await remote_bytes(server, c, tmp_path, "f.bin") == data
            assert await unfinished_uploads(server, c) == 0

    asyncio.run(main())


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_inline_upload_with_a_wrong_digest_is_refused(server: ServerThread, tmp_path: Path) -> None:
    """Small files travel inside PutFile with their digest: a mismatch stores nothing."""

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            data = b"x" * 1000
            with pytest.raises(IntegrityError):
                await c.mux.call(
                    lambda i: m.PutFile(
                        id=i, path="small", size=len(data), mtime=0.0, data=data, digest=b"\x00" * 32
                    ),
                    m.Ok,
                )
            with pytest.raises(IntegrityError):  # size that does not match the data
                await c.mux.call(lambda i: m.PutFile(id=i, path="small", size=999, mtime=0.0, data=data), m.Ok)
            assert await c.listdir("") == []
            assert await unfinished_uploads(server, c) == 0

    asyncio.run(main())
    if not on_objects(server):
        assert os.listdir(home(server)) == []


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_upload_with_wrong_final_hashes_is_refused(server: ServerThread, tmp_path: Path) -> None:
    """The server checks the FileEnd hashes against what it received, not against itself."""
    data = os.urandom(2 * MiB)

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            req_id, route = c.mux.open(64)
            await c.send(m.PutFile(id=req_id, path="f", size=len(data), mtime=0.0, chunk_size=SMALL_CHUNK))
            assert isinstance(await c.mux.recv(route), m.PutReady)
            await c.send(m.PutFrom(id=req_id, offset=0))
            await c.mux.send_data(req_id, m.STDIN, data)
            n = len(data) // SMALL_CHUNK
            await c.send(
                m.FileEnd(id=req_id, size=len(data), chunk_hashes=[b"\x01" * 32] * n, digest=b"\x02" * 32)
            )
            reply = await c.mux.recv(route)
            assert isinstance(reply, m.Error)
            assert "integrity" in reply.code
            c.mux.close_route(req_id)
            # Fewer bytes than announced is refused too.
            req_id, route = c.mux.open(64)
            await c.send(m.PutFile(id=req_id, path="g", size=len(data), mtime=0.0, chunk_size=SMALL_CHUNK))
            assert isinstance(await c.mux.recv(route), m.PutReady)
            await c.send(m.PutFrom(id=req_id, offset=0))
            await c.mux.send_data(req_id, m.STDIN, data[:-1])
            await c.send(m.FileEnd(id=req_id, size=len(data), chunk_hashes=[], digest=b""))
            reply = await c.mux.recv(route)
            assert isinstance(reply, m.Error)
            assert "integrity" in reply.code
            assert await c.listdir("") == []
            assert await unfinished_uploads(server, c) == 0

    asyncio.run(main())
    if not on_objects(server):
        assert os.listdir(home(server)) == []


@pytest.mark.timeout(60)
def test_source_changed_while_being_sent(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's file is rewritten after the first block went out: the client gets a transfer
    error (never a file mixing old and new bytes), and the retry gets the new content."""
    src = home(server) / "f.bin"
    write_random(src, SIZE, 3)
    new = os.urandom(SIZE)
    state = {"blocks": 0}
    original = Session.send_data

    async def send_data(self: Session, channel: int, stream: int, data: bytes | memoryview) -> None:
        await original(self, channel, stream, data)
        state["blocks"] += 1
        if state["blocks"] == 1:
            with open(src, "r+b") as f:  # in place: same inode, same size, bytes changed
                f.write(new)

    monkeypatch.setattr(Session, "send_data", send_data)
    monkeypatch.setattr(Session, "sendfile", sendfile_in_frames)  # the change lands mid-transfer
    dest = tmp_path / "f.bin"

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            with pytest.raises(TransferError):
                await c.get("f.bin", dest, chunk_size=SMALL_CHUNK)
            assert not dest.exists()
            await c.get("f.bin", dest, chunk_size=SMALL_CHUNK)

    asyncio.run(main())
    assert dest.read_bytes() == new
