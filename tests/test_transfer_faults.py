"""Faults around transfers: jail escapes and symlink swaps mid-upload, clients that vanish, malformed
bytes, a full disk, and the hello/idle timeouts. In every case the server keeps serving others,
leaves no file under a final name that was not verified, and leaks no file descriptors."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.errors import ConnectionBroken, ConnectionClosed, DiskFull, PathRefused
from ferry.server.context import Limits
from ferry.wire import Data
from ferry.wire import messages as m
from ferry.wire.frames import HEADER, FrameKind
from ferry_server import ServerThread
from transfer_support import (
    SMALL_CHUNK,
    Interrupt,
    MiB,
    RawClient,
    SessionRecorder,
    await_until,
    connect,
    fd_count,
    home,
    interrupt_after,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    no_sessions,
    on_objects,
    on_server,
    partials,
    place,
    random_bytes,
    remote_bytes,
    running_server,
    unfinished_uploads,
    wait_until,
    write_random,
)

pytestmark = [pytest.mark.usefixtures("no_logged_errors"), pytest.mark.transports]

FD_SLACK = 4  # descriptors that may legitimately come and go (executor threads, logging, caches)


def tree_snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root`` (not following links) with file contents or link targets."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = p.read_bytes()
            else:
                out[rel] = "dir"
    return out


# --- the jail, over the wire ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_every_escape_is_refused_and_the_session_keeps_serving(server: ServerThread, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret").write_text("top secret")
    h = home(server)
    os.symlink(outside, h / "link")
    os.symlink(outside / "secret", h / "filelink")
    (h / "mine").write_text("mine")
    before = tree_snapshot(outside)
    small = tmp_path / "small"
    small.write_bytes(b"payload")
    big = tmp_path / "big"
    write_random(big, 2 * MiB, 1)

    escapes = ["../x", "/etc/passwd", "a/../../x", "link/secret", "link/sub/x", "..", "/"]

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            refused = 0
            for bad in escapes:
                attempts = [
                    c.get(bad, tmp_path / "got"),
                    c.put(small, bad),
                    c.put(big, bad),
                    c.stat(bad),
                    c.listdir(bad),
                    c.mkdir(bad, parents=True),
                    c.remove(bad, recursive=True),
                    c.rename(bad, "stolen"),
                    c.rename("mine", bad),
                ]
                for coro in attempts:
                    with pytest.raises(PathRefused):
                        await coro
                    refused += 1
                assert await c.ping() < 5
            for coro in [c.get("filelink", tmp_path / "got"), c.get("link", tmp_path / "got")]:
                with pytest.raises(PathRefused):
                    await coro
            assert refused == len(escapes) * 9
            assert not (tmp_path / "got").exists()
            names = {e.name: e.kind for e in await c.listdir("")}
            assert names == {"link": "link", "filelink": "link", "mine": "file"}

    asyncio.run(main())
    assert tree_snapshot(outside) == before
    assert wait_until(lambda: no_sessions(server))


@pytest.mark.timeout(60)
def test_symlink_swapped_in_for_a_folder_during_an_upload(server: ServerThread, tmp_path: Path) -> None:
    """Between PutFile and FileEnd the folder of the target becomes a symlink to outside the home:
    the commit is refused, nothing is written outside, and the partial's descriptor is released."""
    outside = tmp_path / "outside"
    outside.mkdir()
    h = home(server)
    (h / "d").mkdir()
    src = tmp_path / "big"
    write_random(src, 6 * MiB, 2)
    baseline = fd_count()

    def swap() -> None:
        os.rename(h / "d", h / "d_moved")
        os.symlink(outside, h / "d")

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            swapped = False

            def progress(done: int, total: int) -> None:
                nonlocal swapped
                if done >= 2 * MiB and not swapped:
                    swapped = True
                    swap()

            with pytest.raises(PathRefused) as info:
                await c.put(src, "d/big", chunk_size=SMALL_CHUNK, progress=progress)
            assert info.value.code == "symlink"
            assert swapped
            assert await c.ping() < 5
            # The same upload to a real folder still works on this session.
            await c.put(src, "d_moved/big", chunk_size=SMALL_CHUNK)

    asyncio.run(main())
    assert os.listdir(outside) == []
    assert (h / "d_moved" / "big").read_bytes() == src.read_bytes()
    assert wait_until(lambda: no_sessions(server))
    assert wait_until(lambda: fd_count() <= baseline + FD_SLACK), (fd_count(), baseline)


@pytest.mark.timeout(60)
def test_symlink_planted_at_the_target_name_during_an_upload(server: ServerThread, tmp_path: Path) -> None:
    """A symlink to a file outside appears under the target name mid-upload: the commit replaces the
    link itself; the outside file is never written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"untouched")
    h = home(server)
    src = tmp_path / "big"
    data = write_random(src, 4 * MiB, 12)

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            planted = False

            def progress(done: int, total: int) -> None:
                nonlocal planted
                if done >= MiB and not planted:
                    planted = True
                    os.symlink(outside / "victim", h / "target")

            await c.put(src, "target", chunk_size=SMALL_CHUNK, progress=progress)
            assert planted

    asyncio.run(main())
    assert (outside / "victim").read_bytes() == b"untouched"
    assert not (h / "target").is_symlink()
    assert (h / "target").read_bytes() == data


# --- clients that vanish -------------------------------------------------------------------------


def reset_close(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), like a killed process with unread data."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


@pytest.mark.timeout(90)
def test_clients_vanishing_mid_upload_and_mid_download(server: ServerThread, tmp_path: Path) -> None:
    h = home(server)
    size = 8 * MiB
    write_random(h / "down.bin", size, 3)
    src = tmp_path / "up.bin"
    data = write_random(src, size, 4)
    baseline = fd_count()
    tls = not server.config.plain

    for i in range(4):
        # Mid-upload: PutFile, PutFrom, a few MiB of data, then the socket is reset.
        raw = RawClient(server.port, tls=tls)
        raw.login()
        raw.send(m.PutFile(id=1, path="up.bin", size=size, mtime=0.0, chunk_size=SMALL_CHUNK, token="tok"))
        ready = raw.reply(1)
        assert isinstance(ready, m.PutReady)
        offset = len(ready.chunk_hashes) * SMALL_CHUNK
        raw.send(m.PutFrom(id=1, offset=offset))
        end = min(offset + 2 * MiB, size - 1)
        for pos in range(offset, end, 1 << 18):
            raw.send_raw(raw.conn.send_data(1, m.STDIN, data[pos : min(pos + (1 << 18), end)]))
        raw.send(m.Ping(nonce=i))
        assert raw.reply_pong(i)  # every data frame before it reached the upload
        reset_close(raw.sock)

        # Mid-download: ask for the file, read a little, reset.
        raw = RawClient(server.port, tls=tls)
        raw.login()
        raw.send(m.GetFile(id=7, path="down.bin"))
        assert isinstance(raw.reply(7), m.FileInfo)
        got = 0
        while got < (i + 1) * 256 * 1024:
            ev = raw.next_event()
            assert isinstance(ev, Data)
            got += len(ev.data)
        reset_close(raw.sock)

    assert wait_until(lambda: no_sessions(server), 15)
    assert not (h / "up.bin").exists()
    [part] = partials(h)
    held = (h / part).stat().st_size
    assert held >= end  # everything received is kept for a resume

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            assert sorted(e.name for e in await c.listdir("")) == ["down.bin"]  # partial hidden
            # The kept partial is resumable by the real client (its token differs, so resume by
            # talking to the same partial: same token through the low-level API).
            req_id, route = c.mux.open(64)
            await c.send(
                m.PutFile(id=req_id, path="up.bin", size=size, mtime=0.0, chunk_size=SMALL_CHUNK, token="tok")
            )
            ready = await c.mux.recv(route)
            assert isinstance(ready, m.PutReady)
            assert len(ready.chunk_hashes) == held // SMALL_CHUNK
            c.mux.close_route(req_id)
            await c.send(m.Cancel(id=req_id))
            assert await c.ping() < 5

    asyncio.run(main())
    assert wait_until(lambda: no_sessions(server), 15)
    assert wait_until(lambda: fd_count() <= baseline + FD_SLACK), (fd_count(), baseline)


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_abandoned_transfers_on_a_live_connection_release_everything(
    server: ServerThread, tmp_path: Path
) -> None:
    """A client that gives up on transfers (an exception in its progress callback) but keeps its
    connection: repeated many times, the server holds no descriptors (nor, on the object backend,
    uploads) for them and stays responsive."""
    src = tmp_path / "up.bin"
    data = write_random(src, 4 * MiB, 6)
    baseline = fd_count()

    async def main() -> None:
        nonlocal baseline
        async with await connect(server, tmp_path) as c:
            await place(server, c, tmp_path, "down.bin", random_bytes(4 * MiB, 5))
            if on_objects(server):
                # The server's database and store connections are pooled, opened on first use.
                await c.get("down.bin", tmp_path / "warm.bin")
                baseline = fd_count()
            for _ in range(10):
                with pytest.raises(Interrupt):
                    await c.get(
                        "down.bin", tmp_path / "down.bin", progress=interrupt_after(MiB), resume=False
                    )
                with pytest.raises(Interrupt):
                    await c.put(src, "up.bin", progress=interrupt_after(MiB), resume=False)
            assert await c.ping() < 5
            assert fd_count() <= baseline + FD_SLACK + 2, (fd_count(), baseline)
            # resume=False: the server picked the partials' tokens, so nobody could resume them.
            assert await unfinished_uploads(server, c) == 0
            r = await c.put(src, "up.bin")
            assert r.size == len(data)
            assert await remote_bytes(server, c, tmp_path, "up.bin") == data

    asyncio.run(main())
    assert wait_until(lambda: no_sessions(server))
    assert wait_until(lambda: fd_count() <= baseline + FD_SLACK), (fd_count(), baseline)


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_reused_upload_id_is_a_protocol_error_and_leaks_nothing(server: ServerThread) -> None:
    baseline = fd_count()
    for _ in range(5):
        raw = RawClient(server.port)
        raw.login()
        for n in range(3):
            raw.send(m.PutFile(id=5, path=f"f{n}", size=10 * MiB, mtime=0.0, token=f"t{n}"))
        events = raw.until_closed()
        raw.close()
        assert any(isinstance(e, m.Error) and e.code == "protocol" for e in events), events
    assert wait_until(lambda: no_sessions(server))
    assert wait_until(lambda: fd_count() <= baseline + FD_SLACK), (fd_count(), baseline)


# --- malformed input -----------------------------------------------------------------------------


def client_hello_bytes() -> bytes:
    """A real TLS ClientHello, as a TLS client would send it to a plain server."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


MALFORMED = {
    "garbage": os.urandom(64),
    "zeros": bytes(64),
    "oversized-message": HEADER.pack(FrameKind.MESSAGE, 0, 0, 1 << 31) + b"x" * 16,
    "oversized-data": HEADER.pack(FrameKind.DATA, 1, 1, (1 << 32) - 1) + b"x" * 16,
    "bad-msgpack": HEADER.pack(FrameKind.MESSAGE, 0, 0, 4) + b"\xc1\xc1\xc1\xc1",
    "unknown-type": HEADER.pack(FrameKind.MESSAGE, 0, 0, 8) + b"\x81\xa1t\xa4nope",
    "http": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "tls-client-hello": client_hello_bytes(),
}
#: Valid after login (data for a channel that is not open is dropped), not before.
BEFORE_LOGIN_ONLY = {"data-before-hello": HEADER.pack(FrameKind.DATA, 0, 1, 4) + b"abcd"}


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("after_login", [False, True], ids=["before-login", "after-login"])
def test_malformed_input_drops_only_that_connection(
    server: ServerThread, tmp_path: Path, after_login: bool
) -> None:
    baseline = fd_count()

    async def main() -> None:
        async with await connect(server, tmp_path) as good:
            cases = MALFORMED if after_login else MALFORMED | BEFORE_LOGIN_ONLY
            for name, payload in cases.items():
                raw = RawClient(server.port)
                try:
                    if after_login:
                        raw.login()
                    raw.send_raw(payload)
                    events = await asyncio.to_thread(raw.until_closed, 10)
                finally:
                    raw.close()
                errors = [e for e in events if isinstance(e, m.Error)]
                assert errors and errors[-1].code == "protocol", (name, events)
                assert await good.ping() < 5, name
            assert [e.name for e in await good.listdir("")] == []

    asyncio.run(main())
    assert wait_until(lambda: no_sessions(server))
    assert wait_until(lambda: fd_count() <= baseline + FD_SLACK), (fd_count(), baseline)


@pytest.mark.timeout(60)
def test_plain_bytes_to_a_tls_server_are_dropped(tmp_path: Path) -> None:
    with running_server(tmp_path / "root") as srv:
        for payload in (MALFORMED["http"], MALFORMED["garbage"]):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
                s.sendall(payload)
                # The TLS layer refuses; the server closes without hanging on to the socket.
                with contextlib.suppress(ConnectionResetError):
                    while s.recv(4096):
                        pass

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                assert await c.ping() < 5

        asyncio.run(main())


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_keepalives_are_answered_in_every_state(server: ServerThread) -> None:
    """Ping, Pong and Goodbye are allowed in every state by the protocol table: before Hello and
    during authentication they are answered (or ignored), never a crash of the session."""
    raw = RawClient(server.port)
    try:
        raw.send(m.Ping(nonce=1))
        assert raw.next_event() == m.Pong(nonce=1)
        raw.send(m.Pong(nonce=2))  # unsolicited: ignored
        raw.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION))
        assert isinstance(raw.next_event(), m.Welcome)
        for nonce in range(3, 8):  # more pings than auth attempts: they are not attempts
            raw.send(m.Ping(nonce=nonce))
            assert raw.next_event() == m.Pong(nonce=nonce)
        raw.send(m.Pong(nonce=9))
        raw.send(m.Auth(user="alice", password="correct horse battery staple"))
        assert isinstance(raw.next_event(), m.AuthOk)
        raw.send(m.Stat(id=1, path=""))
        assert isinstance(raw.reply(1), m.StatReply)
    finally:
        raw.close()
    for first in (m.Goodbye(reason="bye"), m.Hello(min_version=1, max_version=1)):
        raw = RawClient(server.port)
        try:
            raw.send(first)
            if isinstance(first, m.Hello):
                assert isinstance(raw.next_event(), m.Welcome)
                raw.send(m.Goodbye(reason="changed my mind"))
            assert raw.until_closed(10) == []  # closed cleanly, no error
        finally:
            raw.close()
    assert wait_until(lambda: no_sessions(server))


# --- a full disk ---------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "8m") -> Iterator[Path]:
    """Mount a small tmpfs at ``path`` (root only; skips otherwise) and always unmount it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plain", [False, True], ids=["tls", "plain"])
def test_disk_full_during_an_upload(tmp_path: Path, plain: bool) -> None:
    with small_tmpfs(tmp_path / "disk") as disk, running_server(disk / "root", plain=plain) as srv:
        h = home(srv)
        src = tmp_path / "big"
        write_random(src, 12 * MiB, 7)
        small = tmp_path / "small"
        small.write_bytes(b"still works")

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                free_before = (await c.df()).free
                with pytest.raises(DiskFull) as info:
                    await c.put(src, "big", chunk_size=SMALL_CHUNK)
                assert info.value.code == "disk-full"
                assert not (h / "big").exists()
                assert partials(h) == []
                # The space is given back and the server keeps serving.
                assert (await c.df()).free >= free_before - 64 * 1024
                await c.put(small, "small")
                assert [e.name for e in await c.listdir("")] == ["small"]

        asyncio.run(main())


# --- timeouts ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_silent_and_half_handshaken_connections_are_dropped(tmp_path: Path) -> None:
    with running_server(tmp_path / "root", plain=True, limits=Limits(login_timeout=0.5)) as srv:
        silent = RawClient(srv.port)
        half = RawClient(srv.port)
        try:
            half.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION))
            assert isinstance(half.next_event(), m.Welcome)
            for raw in (silent, half):  # both closed by the server well within a few seconds
                events = raw.until_closed(5)
                assert all(isinstance(e, m.Goodbye) for e in events), events
        finally:
            silent.close()
            half.close()
        assert wait_until(lambda: no_sessions(srv), 5)

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:  # the limit covers only the handshake
                await asyncio.sleep(0.8)
                assert await c.ping() < 5

        asyncio.run(main())


@pytest.mark.timeout(60)
def test_idle_sessions_are_closed_and_active_ones_are_not(tmp_path: Path) -> None:
    with running_server(tmp_path / "root", limits=Limits(idle_timeout=1.0)) as srv:

        async def main() -> None:
            idle = await connect(srv, tmp_path)
            busy = await connect(srv, tmp_path)
            try:
                # busy pings every 0.25 s for 2.5 s while idle sits there.
                for _ in range(10):
                    assert await busy.ping() < 5
                    await asyncio.sleep(0.25)
                assert await await_until(lambda: idle.mux.error is not None, 5)
                with pytest.raises(ConnectionBroken, match="idle"):
                    await idle.stat("")
                with pytest.raises(ConnectionBroken):
                    await idle.ping()
                assert (await busy.stat("")).kind == "dir"
            finally:
                await idle.close()
                await busy.close()

        asyncio.run(main())
        assert wait_until(lambda: no_sessions(srv))


@pytest.mark.timeout(60)
def test_a_request_abandoned_with_a_full_queue_does_not_wedge_the_client(
    server: ServerThread, tmp_path: Path
) -> None:
    """The client's reader pushes back when a transfer's queue is full; if the caller gives up on
    that transfer right then, the reader must not stay blocked on a queue nobody reads any more."""
    write_random(home(server) / "big.bin", 32 * MiB, 8)

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            req_id, route = c.mux.open(4)
            await c.send(m.GetFile(id=req_id, path="big.bin"))
            assert await await_until(route.queue.full, 10)
            c.mux.close_route(req_id)  # what every transfer does when it gives up
            await c.send(m.Cancel(id=req_id))
            async with asyncio.timeout(10):
                assert (await c.stat("big.bin")).size == 32 * MiB
                assert await c.ping() < 5

    asyncio.run(main())


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_closing_the_client_under_a_full_transfer_queue_fails_fast(
    server: ServerThread, tmp_path: Path
) -> None:
    write_random(home(server) / "big.bin", 32 * MiB, 9)

    async def main() -> None:
        c = await connect(server, tmp_path)
        req_id, route = c.mux.open(4)
        await c.send(m.GetFile(id=req_id, path="big.bin"))
        assert await await_until(route.queue.full, 10)
        await c.close()
        c.read_timeout = 30
        async with asyncio.timeout(5):  # not the 30 s read timeout
            with pytest.raises(ConnectionClosed):
                for _ in range(10):
                    await c.mux.recv(route)

    asyncio.run(main())


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_flood_of_uploads_on_one_connection_is_capped(server: ServerThread) -> None:
    """Every started upload holds an open partial file: one connection must not be able to exhaust
    the server's descriptors by starting uploads it never finishes."""
    flood = 300
    baseline = fd_count()
    raw = RawClient(server.port)
    try:
        raw.login()
        for i in range(1, flood + 1):
            raw.send(m.PutFile(id=i, path=f"f{i}", size=10 * MiB, mtime=0.0))
        replies = [raw.reply(i) for i in range(1, flood + 1)]
        ready = [r for r in replies if isinstance(r, m.PutReady)]
        busy = [r for r in replies if isinstance(r, m.Error) and r.code == "busy"]
        assert len(ready) + len(busy) == flood, replies[:3]
        assert 16 <= len(ready) <= 200
        assert fd_count() <= baseline + len(ready) + FD_SLACK
        raw.send(m.Stat(id=flood + 1, path=""))
        assert isinstance(raw.reply(flood + 1), m.StatReply)  # still serving
    finally:
        raw.close()
    assert wait_until(lambda: no_sessions(server))
    assert wait_until(lambda: fd_count() <= baseline + FD_SLACK), (fd_count(), baseline)
    # The server picked those partials' tokens, so they were removed with the connection.
    assert partials(home(server)) == []


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_cancels_for_unknown_requests_are_not_remembered(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Cancel for an id that is no running transfer is answered and forgotten: a client cannot
    grow the server's memory without bound by sending them."""
    recorder = SessionRecorder(monkeypatch)
    write_random(home(server) / "f.bin", 300_000, 11)
    raw = RawClient(server.port)
    try:
        raw.login()
        [session] = recorder.sessions
        n = 20_000
        raw.send_raw(b"".join(raw.conn.send(m.Cancel(id=i)) for i in range(1, n + 1)))
        raw.send(m.GetFile(id=n + 1, path="f.bin"))
        raw.send(m.Cancel(id=n + 2))
        assert isinstance(raw.reply(n + 1), m.FileInfo)
        raw.send(m.Stat(id=n + 3, path=""))
        assert isinstance(raw.reply(n + 3), m.StatReply)
        assert on_server(server, lambda: len(session.requests.cancelled) + len(session.requests.gets)) == 0
    finally:
        raw.close()


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_upload_messages_out_of_order_are_protocol_errors(server: ServerThread) -> None:
    h = home(server)
    size = 2 * MiB
    put = m.PutFile(id=1, path="f", size=size, mtime=0.0, chunk_size=SMALL_CHUNK)
    end = m.FileEnd(id=1, size=size, chunk_hashes=[], digest=b"")
    data = m.STDIN, b"x" * 1000
    sequences: dict[str, list[object]] = {
        "data before put_from": [put, data],
        "file_end before put_from": [put, end],
        "unaligned offset": [put, m.PutFrom(id=1, offset=12345)],
        "offset beyond what is held": [put, m.PutFrom(id=1, offset=SMALL_CHUNK)],
        "put_from for no upload": [m.PutFrom(id=9, offset=0)],
        "file_end for no upload": [m.FileEnd(id=9, size=1, chunk_hashes=[], digest=b"")],
        "more data than announced": [put, m.PutFrom(id=1, offset=0), (m.STDIN, b"y" * (size + 1))],
        "put_from twice": [put, m.PutFrom(id=1, offset=0), data, m.PutFrom(id=1, offset=0)],
    }
    baseline = fd_count()
    for name, steps in sequences.items():
        raw = RawClient(server.port)
        try:
            raw.login()
            for step in steps:
                if isinstance(step, tuple):
                    raw.send_raw(raw.conn.send_data(1, *step))
                else:
                    assert isinstance(step, m.Message)
                    raw.send(step)
            events = raw.until_closed(10)
        finally:
            raw.close()
        errors = [e for e in events if isinstance(e, m.Error)]
        assert errors and errors[-1].code == "protocol", (name, events)
    assert wait_until(lambda: no_sessions(server))
    assert os.listdir(h) == []
    assert wait_until(lambda: fd_count() <= baseline + FD_SLACK), (fd_count(), baseline)


@pytest.mark.timeout(30)
def test_connections_over_the_session_limit_get_a_clear_refusal(tmp_path: Path) -> None:
    with running_server(tmp_path / "root", limits=Limits(max_sessions=2)) as srv:

        async def main() -> None:
            a = await connect(srv, tmp_path)
            b = await connect(srv, tmp_path)
            try:
                with pytest.raises(ConnectionBroken, match="session limit"):
                    await connect(srv, tmp_path)
                assert await a.ping() < 5  # the admitted sessions are unaffected
            finally:
                await a.close()
                await b.close()

        asyncio.run(main())
