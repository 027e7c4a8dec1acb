"""Downloads that take large data frames straight off the transport (ferry.client.receive).

The transport (plain or TLS) writes a frame's payload into a few recycled buffers. These tests
drive that path with a scripted server that splits its frames into irregular reads, vanishes or
stalls in the middle of a frame, and with the real server while checking that a buffer is never
written while its write or hash job runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import ferry.client.receive as receive
from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.client.receive import DownloadWriter, RawPayload
from ferry.client.stream import ClientStream
from ferry.client.transfer import partial_path
from ferry.errors import ConnectionBroken, FerryTimeout
from ferry.hashing import ChunkHasher
from ferry.server.tls import ensure_certificate, server_ssl_context
from ferry.wire import NEED_DATA, Connection, Role
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    SMALL_CHUNK,
    MiB,
    connect,
    fd_count,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    random_bytes,
    wait_until,
    write_random,
)

pytestmark = [pytest.mark.usefixtures("no_logged_errors"), pytest.mark.transports]



class ScriptedServer:
    """A one-connection fake server: logs the client in and answers one GetFile for ``data`` with
    data frames of ``frame`` bytes, written in irregular pieces with short pauses (so the client
    sees many reads, and frame headers arrive together with part of their payload).

    ``stop_at``: stop after that many bytes of the reply (``how`` = "close": close the socket,
    "stall": keep it open, silent, until :meth:`close`). ``how`` = "eof" with the whole reply:
    end TCP at once after the last byte, with no TLS close_notify.
    """

    def __init__(
        self,
        tmp_path: Path,
        data: bytes,
        *,
        tls: bool,
        frame: int = 3 * MiB,
        stop_at: int | None = None,
        how: str = "close",
        seed: int = 0,
    ) -> None:
        self.data, self.tls, self.frame = data, tls, frame
        self.stop_at, self.how = stop_at, how
        self.rng = random.Random(seed)
        self.ctx: ssl.SSLContext | None = None
        if tls:
            cert, key = ensure_certificate(tmp_path / "fake-server")
            self.ctx = server_ssl_context(cert, key)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port: int = self.listener.getsockname()[1]
        self.release = threading.Event()
        self.finished = threading.Event()  # "eof": set once the whole reply is sent and TCP ended
        self.sent = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def reply_bytes(self, wire: Connection, req: m.GetFile) -> bytes:
        h = ChunkHasher(req.hash, req.chunk_size)
        h.update(self.data)
        hashes, digest = h.finish()
        out = [wire.send(m.FileInfo(id=req.id, size=len(self.data), mtime=1e9, mode=0o644))]
        for pos in range(0, len(self.data), self.frame):
            piece = self.data[pos : pos + self.frame]
            out += [wire.data_header(req.id, m.STDOUT, len(piece)), piece]
        out.append(wire.send(m.FileEnd(id=req.id, size=len(self.data), chunk_hashes=hashes, digest=digest)))
        return b"".join(out)

    def _serve(self) -> None:
        try:
            self._run()
        except (OSError, ssl.SSLError) as exc:  # the client may go away first; tests look at it
            self.error = exc

    def _run(self) -> None:
        sock, _ = self.listener.accept()
        with contextlib.ExitStack() as stack:
            if self.ctx is not None:
                sock = self.ctx.wrap_socket(sock, server_side=True)
            stack.callback(sock.close)
            sock.settimeout(20)
            wire = Connection(Role.SERVER)

            def next_message() -> Any:
                ev = wire.next_event()
                while ev is NEED_DATA:
                    wire.receive_data(sock.recv(1 << 16))
                    ev = wire.next_event()
                return ev

            next_message()  # Hello
            sock.sendall(wire.send(m.Welcome(version=m.PROTOCOL_VERSION)))
            next_message()  # Auth
            sock.sendall(wire.send(m.AuthOk(user="alice")))
            req = next_message()
            assert isinstance(req, m.GetFile)
            blob = self.reply_bytes(wire, req)
            end = len(blob) if self.stop_at is None else self.stop_at
            view = memoryview(blob)
            # First piece: FileInfo, the first header and a little payload in one write.
            pos = min(end, len(wire.send(m.FileInfo(id=req.id, size=1, mtime=1, mode=1))) + 10 + 777)
            sock.sendall(view[:pos])
            while pos < end:
                n = min(end - pos, self.rng.choice([1, 10, 4096, 65536, 300_000, 1 << 20]))
                sock.sendall(view[pos : pos + n])
                pos += n
                self.sent = pos
                if self.rng.random() < 0.3:
                    time.sleep(0.001)  # let the client drain what it has: the next bytes are a new read
            if self.how == "stall":
                self.release.wait(30)
            elif self.how == "eof":
                # FIN right after the last byte; SSLSocket.shutdown() sends no close_notify.
                sock.shutdown(socket.SHUT_WR)
                self.finished.set()
            elif self.stop_at is None:
                # Like the real server: keep the connection until the client closes it.
                with contextlib.suppress(OSError, ssl.SSLError):
                    while sock.recv(1 << 16):
                        pass

    def close(self) -> None:
        self.release.set()
        self.thread.join(30)
        self.listener.close()


async def fake_connect(srv: ScriptedServer, tmp_path: Path) -> AsyncClient:
    c = await AsyncClient.connect(
        "127.0.0.1",
        srv.port,
        user="alice",
        password="pw",
        plain=not srv.tls,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        timeout=10,
    )
    c.read_timeout = 20.0
    return c


def fetch_all(srv: ScriptedServer, tmp_path: Path, dest: Path, run: Any = asyncio.run) -> None:
    """Download the scripted server's whole file into ``dest`` on the loop ``run`` starts, then
    stop the server."""

    async def main() -> None:
        async with await fake_connect(srv, tmp_path) as c:
            r = await c.get("f.bin", dest, chunk_size=SMALL_CHUNK)
            assert r.size == len(srv.data)

    try:
        run(main())
    finally:
        srv.close()


class Spy:
    """Records the order of normal pieces and raw hand-overs of downloads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        spy = self
        add, take_raw = DownloadWriter.add, DownloadWriter.take_raw

        async def spy_add(self: DownloadWriter, data: bytes) -> None:
            spy.calls.append("add")
            await add(self, data)

        async def spy_take_raw(self: DownloadWriter, ev: RawPayload, *a: Any, **kw: Any) -> int:
            spy.calls.append("raw")
            return await take_raw(self, ev, *a, **kw)

        monkeypatch.setattr(DownloadWriter, "add", spy_add)
        monkeypatch.setattr(DownloadWriter, "take_raw", spy_take_raw)


@pytest.fixture(params=[True, False], ids=["plain", "tls"])
def plain(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", [1, 2])
def test_frames_split_across_many_reads_arrive_intact(
    plain: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    data = random_bytes(7 * MiB + 4321, seed)
    spy = Spy(monkeypatch)
    srv = ScriptedServer(tmp_path, data, tls=not plain, seed=seed)
    dest = tmp_path / "f.bin"
    fetch_all(srv, tmp_path, dest)
    assert dest.read_bytes() == data
    # The bytes read together with the first header went the normal way, before any hand-over.
    assert spy.calls[0] == "add" and "raw" in spy.calls, spy.calls


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["close", "stall"])
def test_a_server_that_vanishes_or_stalls_mid_frame(
    plain: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """In the middle of a raw payload the server closes (ConnectionBroken) or goes silent
    (FerryTimeout after read_timeout); nothing hangs, the bytes received are kept for a resume."""
    data = random_bytes(8 * MiB, 3)
    spy = Spy(monkeypatch)
    srv = ScriptedServer(tmp_path, data, tls=not plain, frame=8 * MiB, stop_at=5 * MiB, how=how, seed=3)
    dest = tmp_path / "f.bin"
    baseline = fd_count()

    async def main() -> None:
        c = await fake_connect(srv, tmp_path)
        c.read_timeout = 0.5
        t0 = time.monotonic()
        with pytest.raises(FerryTimeout if how == "stall" else ConnectionBroken):
            await c.get("f.bin", dest, chunk_size=SMALL_CHUNK)
        assert time.monotonic() - t0 < 10
        t0 = time.monotonic()
        await c.close()
        assert time.monotonic() - t0 < 5

    try:
        asyncio.run(main())
    finally:
        srv.close()
    assert "raw" in spy.calls
    held = partial_path(dest).read_bytes()
    assert 0 < len(held) <= 5 * MiB and data.startswith(held)
    assert wait_until(lambda: fd_count() <= baseline + 2), (fd_count(), baseline)


@pytest.mark.timeout(60)
def test_cancelling_a_download_during_a_raw_payload(
    plain: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download task cancelled while the server is silent mid-frame ends at once (not after
    read_timeout), the bytes received are kept, and the connection can still be closed promptly."""
    data = random_bytes(8 * MiB, 4)
    spy = Spy(monkeypatch)
    srv = ScriptedServer(tmp_path, data, tls=not plain, frame=8 * MiB, stop_at=3 * MiB, how="stall", seed=4)
    dest = tmp_path / "f.bin"

    async def main() -> None:
        c = await fake_connect(srv, tmp_path)
        c.read_timeout = 30.0  # far longer than the test: only the cancel may end the wait
        task = asyncio.create_task(c.get("f.bin", dest, chunk_size=SMALL_CHUNK))
        assert await _await_until(lambda: srv.sent >= 3 * MiB and "raw" in spy.calls)
        await asyncio.sleep(0.2)  # the client has taken what there is and waits for more
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await c.close()
        assert time.monotonic() - t0 < 5

    try:
        asyncio.run(main())
    finally:
        srv.close()
    held = partial_path(dest).read_bytes()
    assert 0 < len(held) <= 3 * MiB and data.startswith(held)


async def _await_until(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


@pytest.mark.timeout(60)
def test_a_buffer_is_never_written_while_its_job_runs(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small buffers cycle many times; every write and hash job is slow and checks that its buffer
    did not change while it ran (the transport writing into a buffer still in use would)."""
    monkeypatch.setattr(receive, "BUFFER_SIZE", 64 * 1024)
    data = write_random(home(server) / "f.bin", 6 * MiB + 99, 5)
    write, hash_ = DownloadWriter._write, DownloadWriter._hash
    jobs: list[bool] = []

    def checked(job: Any, buf: bytearray, n: int, *args: Any) -> None:
        before = bytes(buf[:n])
        time.sleep(0.002)  # the loop keeps receiving meanwhile
        job(buf, n, *args)
        time.sleep(0.002)
        jobs.append(bytes(buf[:n]) == before)

    monkeypatch.setattr(DownloadWriter, "_write", lambda self, *a: checked(functools.partial(write, self), *a))
    monkeypatch.setattr(DownloadWriter, "_hash", lambda self, *a: checked(functools.partial(hash_, self), *a))
    dest = tmp_path / "f.bin"

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            await c.get("f.bin", dest, chunk_size=SMALL_CHUNK)

    asyncio.run(main())
    assert len(jobs) > 100 and all(jobs), (len(jobs), jobs.count(False))
    assert dest.read_bytes() == data


class FakeTransport:
    """Just enough of a transport for ClientStream's raw-mode bookkeeping."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def deliver(s: ClientStream, data: bytes) -> None:
    """What a transport does: fill get_buffer()'s view (as far as it goes), then buffer_updated."""
    while data:
        buf = s.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        s.buffer_updated(n)
        data = data[n:]


def test_raw_mode_keeps_bytes_in_order_and_never_reads_past_the_frame() -> None:
    async def main() -> None:
        s = ClientStream()
        t = FakeTransport()
        s.connection_made(t)  # type: ignore[arg-type]
        s.start_raw(100)
        assert t.paused  # no buffer offered yet
        # A transport that delivers once more after pause_reading(): kept (spilled), in order.
        deliver(s, b"a" * 30)
        buf = bytearray(50)
        reading = asyncio.create_task(s.readinto(memoryview(buf)))
        await asyncio.sleep(0)
        assert not t.paused  # a target is offered: reading resumed
        assert len(s.get_buffer(1 << 20)) == 50 - 30
        deliver(s, b"b" * 20)
        assert await reading == 50 and bytes(buf) == b"a" * 30 + b"b" * 20
        assert t.paused and s.raw_left == 50
        reading = asyncio.create_task(s.readinto(memoryview(bytearray(1000))))
        await asyncio.sleep(0)
        assert len(s.get_buffer(1 << 20)) == 50  # cut at the frame's end
        deliver(s, b"c" * 50)
        assert await reading == 50
        assert s.end_raw() == 100
        # Back to normal: the next read is a frame header only, then reading holds.
        assert len(s.get_buffer(1 << 20)) == 10
        deliver(s, b"h" * 10)
        assert t.paused
        assert await s.read() == b"h" * 10
        assert not s.has_chunks

    asyncio.run(main())


def test_raw_bytes_not_taken_go_back_to_the_normal_queue() -> None:
    async def main() -> None:
        s = ClientStream()
        s.connection_made(FakeTransport())  # type: ignore[arg-type]
        s.start_raw(100)
        deliver(s, b"x" * 40)  # spilled: no target
        assert s.end_raw() == 0  # nothing was taken by the consumer
        assert await s.read() == b"x" * 40

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_second_cancel_does_not_orphan_a_running_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download cancelled twice (e.g. a tree download whose other files are cancelled after one
    failed, then the whole command is interrupted) must still wait for its write-and-hash jobs:
    the fd is closed when get_file ends, so a job still running or queued would pwrite into a
    closed, possibly reused, file descriptor."""
    data = random_bytes(8 * MiB, 6)
    srv = ScriptedServer(tmp_path, data, tls=False, frame=8 * MiB, stop_at=6 * MiB, how="stall", seed=6)
    entered, go = threading.Event(), threading.Event()
    write = DownloadWriter._write

    def blocking_write(self: DownloadWriter, buf: bytearray, n: int, pos: int) -> None:
        entered.set()
        go.wait(30)
        write(self, buf, n, pos)

    monkeypatch.setattr(DownloadWriter, "_write", blocking_write)
    dest = tmp_path / "f.bin"
    seen: dict[str, bool] = {}

    async def main() -> None:
        c = await fake_connect(srv, tmp_path)
        task = asyncio.create_task(c.get("f.bin", dest, chunk_size=SMALL_CHUNK))
        assert await _await_until(entered.is_set)
        task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        for _ in range(50):
            await asyncio.sleep(0)
        seen["done while a job ran"] = task.done()
        go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await c.close()

    try:
        asyncio.run(main())
    finally:
        go.set()
        srv.close()
    assert seen == {"done while a job ran": False}
    held = partial_path(dest).read_bytes()
    assert 0 < len(held) <= 6 * MiB and data.startswith(held)



@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_tls_eof_without_close_notify_after_the_whole_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loop: str, seed: int
) -> None:
    """The server sends the whole reply, then ends TCP with no TLS close_notify while the client
    is still behind (its write jobs held, so reading is paused between raw buffers). Both TLS
    implementations used to drop what they still held then; every byte sent must arrive."""
    run: Any = asyncio.run
    if loop == "uvloop":
        run = pytest.importorskip("uvloop").run
    data = random_bytes(18 * MiB + 555, seed)
    srv = ScriptedServer(tmp_path, data, tls=True, frame=1 * MiB, how="eof", seed=seed)
    write, drain = DownloadWriter._write, ClientStream._drain_tls
    drained: list[int] = []

    def held_write(self: DownloadWriter, buf: bytearray, n: int, pos: int) -> None:
        srv.finished.wait(20)  # 16 MiB in the buffers, the rest in the socket and TLS buffers
        write(self, buf, n, pos)

    def spy_drain(self: ClientStream) -> int:
        drained.append(drain(self))
        return drained[-1]

    monkeypatch.setattr(DownloadWriter, "_write", held_write)
    monkeypatch.setattr(ClientStream, "_drain_tls", spy_drain)
    dest = tmp_path / "f.bin"
    fetch_all(srv, tmp_path, dest, run)
    assert srv.finished.is_set() and srv.error is None
    assert dest.read_bytes() == data
    # The TLS layer did hold bytes when TCP ended: no more than its own bounded read buffer.
    assert sum(drained) > 0 and max(drained) < 2 * MiB, drained


def _tls_pair(tmp_path: Path) -> tuple[ssl.SSLObject, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A handshaken in-memory TLS pair: (server, client, server's outgoing, client's incoming)."""
    cert, key = ensure_certificate(tmp_path / "mem")
    cctx = ssl.create_default_context()
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ssl_context(cert, key).wrap_bio(s_in, s_out, server_side=True)
    client = cctx.wrap_bio(c_in, c_out)
    for _ in range(10):
        for obj in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    client.do_handshake()
    return server, client, s_out, c_in


class TlsFakeTransport(FakeTransport):
    def __init__(self, ssl_object: ssl.SSLObject) -> None:
        super().__init__()
        self.ssl_object = ssl_object

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.ssl_object if name == "ssl_object" else default


def test_bytes_left_in_tls_at_eof_arrive_in_order(tmp_path: Path) -> None:
    """What the TLS layer still holds at EOF fills the offered buffer, then the rest of the raw
    payload, then (past the frame's end) the normal queue: in order, nothing lost."""
    server, client, s_out, c_in = _tls_pair(tmp_path)

    async def main() -> None:
        s = ClientStream()
        s.connection_made(TlsFakeTransport(client))  # type: ignore[arg-type]
        s.start_raw(100)
        buf = bytearray(40)
        reading = asyncio.create_task(s.readinto(memoryview(buf)))
        await asyncio.sleep(0)
        server.write(b"a" * 40 + b"b" * 60 + b"c" * 50)
        c_in.write(s_out.read())  # received by the transport, never delivered by it
        s.eof_received()
        assert await reading == 40 and bytes(buf) == b"a" * 40
        rest = bytearray(100)
        assert await s.readinto(memoryview(rest)) == 60 and rest[:60] == b"b" * 60
        assert s.end_raw() == 100
        assert await s.read() == b"c" * 50
        assert await s.read() == b""
        s.connection_lost(None)  # nothing more to take; no error

    asyncio.run(main())
