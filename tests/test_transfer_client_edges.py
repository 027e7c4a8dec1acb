"""Client-side edge cases found in review: what a refused download leaves behind, what a put of several
files to an existing remote file does, and how a server that never answers the handshake or a ping is reported.
"""

from __future__ import annotations

import asyncio
import asyncio.base_events
import errno
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from ferry.cli.files import do_put
from ferry.cli.output import Output
from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.client.location import Location, parse_location, parse_target
from ferry.errors import ConnectionBroken, FerryError, FerryTimeout, IsADirectory, NotFound, UsageError
from ferry.paths import DEFAULT_PORT
from ferry.wire import NEED_DATA, Connection, Role
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import connect, home

pytestmark = pytest.mark.cell(transport="plain")


def test_refused_download_leaves_no_partial(server: ServerThread, tmp_path: Path) -> None:
    (home(server) / "folder").mkdir()
    out = tmp_path / "out"
    out.mkdir()

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            with pytest.raises(NotFound):
                await c.get("no-such-file", out / "x")
            with pytest.raises(IsADirectory):
                await c.get("folder", out / "folder")
        finally:
            await c.close()

    asyncio.run(main())
    assert os.listdir(out) == []


def test_put_of_several_files_to_an_existing_remote_file_is_refused(
    server: ServerThread, tmp_path: Path
) -> None:
    (home(server) / "target").write_bytes(b"keep me")
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"aaa")
    b.write_bytes(b"bbb")

    async def main() -> None:
        c = await connect(server, tmp_path)
        try:
            with pytest.raises(FerryError) as info:
                await do_put(
                    c,
                    Output(quiet=True, json_mode=False),
                    [str(a), str(b)],
                    "target",
                    recursive=False,
                    hash_name="blake3",
                    resume=True,
                    into_dir=True,
                    shown=lambda p: p,
                )
            assert info.value.exit_code == 2 and "not a folder" in str(info.value)
        finally:
            await c.close()

    asyncio.run(main())
    assert (home(server) / "target").read_bytes() == b"keep me"


def test_a_server_silent_during_the_handshake_is_a_timeout(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        async def main() -> None:
            with pytest.raises(FerryTimeout):
                await AsyncClient.connect(
                    "127.0.0.1",
                    port,
                    user="alice",
                    password="pw",
                    plain=True,
                    known_hosts=KnownHosts(tmp_path / "known_hosts"),
                    timeout=0.5,
                )

        asyncio.run(main())


class SilentAfterLogin:
    """A fake server that logs any client in, then reads nothing more (a stopped or wedged peer)."""

    def __init__(self, *, accept_a_put: bool = False) -> None:
        self.accept_a_put = accept_a_put  # answer one PutFile with PutReady before going silent
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port: int = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sock, _ = self.listener.accept()
        self.conn = sock
        wire = Connection(Role.SERVER)
        sock.settimeout(10)
        for reply in (m.Welcome(version=m.PROTOCOL_VERSION), m.AuthOk(user="alice")):
            ev = wire.next_event()
            while ev is NEED_DATA:
                wire.receive_data(sock.recv(1 << 16))
                ev = wire.next_event()
            sock.sendall(wire.send(reply))
        if self.accept_a_put:
            ev = wire.next_event()
            while ev is NEED_DATA:
                wire.receive_data(sock.recv(1 << 16))
                ev = wire.next_event()
            assert isinstance(ev, m.PutFile)
            sock.sendall(wire.send(m.PutReady(id=ev.id)))

    def close(self) -> None:
        self.thread.join(10)
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


def test_ping_without_an_answer_is_a_ferry_timeout(tmp_path: Path) -> None:
    fake = SilentAfterLogin()

    async def main() -> None:
        c = await AsyncClient.connect("127.0.0.1", fake.port, user="alice", password="pw", plain=True)
        c.read_timeout = 0.3
        try:
            with pytest.raises(FerryTimeout):
                await c.ping()
        finally:
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        fake.close()


@pytest.mark.parametrize(
    "spec", ["ferry://ann@h/notes#1.txt", "ferry://ann@h/a?b", "ferry://ann@h/x#", "ferry://ann@h/a\nb"]
)
def test_url_path_characters_that_urlsplit_would_cut_or_drop_are_refused(spec: str) -> None:
    with pytest.raises(UsageError, match="percent-encode"):
        parse_location(spec)
    assert parse_location("ferry://ann@h/notes%231.txt").path == "notes#1.txt"


def test_url_port_zero_is_refused_not_the_default() -> None:
    with pytest.raises(UsageError, match="port out of range"):
        parse_location("ferry://ann@h:0/x")
    assert parse_location("ferry://ann@[::1]:2222/x") == Location("::1", 2222, "ann", "x")
    assert parse_location("ferry://ann@h/x").port == DEFAULT_PORT


def test_an_upload_to_a_server_that_stopped_reading_times_out(tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(1 << 20) * 64)  # far more than the socket buffers on both sides hold
    fake = SilentAfterLogin(accept_a_put=True)

    async def main() -> None:
        c = await AsyncClient.connect("127.0.0.1", fake.port, user="alice", password="pw", plain=True)
        c.read_timeout = 0.5
        try:
            with pytest.raises(FerryTimeout):
                await c.put(src, "big")
        finally:
            await c.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 15))
    finally:
        fake.close()


@pytest.mark.parametrize("spec", ["ann@h:²", "[::1]junk", "ann@[::1]:٣"])
def test_bad_host_targets_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_target(spec)
    assert parse_target("ann@[::1]:2222") == Location("::1", 2222, "ann", "")
    assert parse_target("[::1]") == Location("::1", DEFAULT_PORT, None, "")


@pytest.mark.timeout(60)
def test_a_failed_sendfile_ends_the_connection_at_once(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frame header promised the whole block: when the kernel's sendfile fails after it, the
    server must end the connection, not leave the client waiting for bytes that never come (found
    by the conformance matrix: uvloop has no sendfile, and the client hung until its read timeout)."""
    (home(server) / "f.bin").write_bytes(os.urandom(2 << 20))

    async def broken(*args: object, **kw: object) -> int:
        raise OSError(errno.EIO, "sendfile failed")

    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "sendfile", broken)

    async def main() -> float:
        async with await connect(server, tmp_path) as c:
            c.read_timeout = 60.0
            t0 = time.monotonic()
            with pytest.raises(ConnectionBroken):
                await c.get("f.bin", tmp_path / "f.bin")
            return time.monotonic() - t0

    assert asyncio.run(main()) < 10
