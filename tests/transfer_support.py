"""Helpers for the transfer hard-case tests: servers, clients, raw wire sockets, fd and wait helpers.

Everything runs on loopback with port 0; every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.server.context import Limits
from ferry.server.session import Session
from ferry.store.config import S3Config
from ferry.wire import CONNECTION_ENDED, NEED_DATA, Connection, Data, Role
from ferry.wire import messages as m
from ferry_server import PASSWORD, ServerThread

MiB = 1 << 20
SMALL_CHUNK = 1 << 16  # the smallest chunk size the protocol allows: many chunks in a few MiB


@contextlib.contextmanager
def running_server(
    root: Path,
    *,
    plain: bool = False,
    limits: Limits | None = None,
    users: tuple[str, ...] = ("alice",),
    loop: str = "asyncio",
    exec_allowed: bool = False,
    db: str | None = None,
    store: S3Config | None = None,
) -> Iterator[ServerThread]:
    """A started :class:`ServerThread` with ``users`` (password :data:`PASSWORD`, commands allowed
    when ``exec_allowed``) on a ``loop`` event loop; stopped on exit. With ``db`` the accounts are in
    that PostgreSQL database, with ``store`` (and ``db``) the files are on the object backend."""
    srv = ServerThread(root, plain=plain, limits=limits, loop=loop, db=db, store=store)
    for u in users:
        srv.add_user(u, exec_allowed=exec_allowed)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def home(srv: ServerThread, user: str = "alice") -> Path:
    """The home folder of ``user`` on ``srv`` (a folder-backend server: the object backend has none,
    so a test that looks at files on disk must say which backend it runs on)."""
    if srv.config.store is not None:
        raise AssertionError("an object-backend server has no home folder: check through a client")
    return srv.root / "homes" / user


async def connect(
    srv: ServerThread,
    tmp_path: Path,
    user: str = "alice",
    password: str | None = PASSWORD,
    timeout: float = 15.0,
    **login: Any,
) -> AsyncClient:
    """An authenticated async client (TLS unless the server is plain; pins into tmp_path); other
    credentials (``key=``, ``token=``, ``agent=``, ``login=``...) as AsyncClient.connect takes them."""
    c = await AsyncClient.connect(
        "127.0.0.1",
        srv.port,
        user=user,
        password=password,
        plain=srv.config.plain,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        timeout=timeout,
        **login,
    )
    c.read_timeout = 20.0  # a hang fails fast instead of waiting a minute
    return c


def on_objects(srv: ServerThread) -> bool:
    """True when ``srv`` keeps files on the object backend (no home folder to look in)."""
    return srv.config.store is not None


async def place(srv: ServerThread, c: AsyncClient, tmp_path: Path, name: str, data: bytes) -> None:
    """Make file ``name`` hold ``data`` on the server: written into the home on the folder backend
    (as a local user of the server would), put through ``c`` on the object backend."""
    if not on_objects(srv):
        (home(srv) / name).write_bytes(data)
        return
    local = tmp_path / f"placed-{secrets.token_hex(4)}"
    local.write_bytes(data)
    try:
        await c.put(local, name)
    finally:
        local.unlink()


async def remote_bytes(srv: ServerThread, c: AsyncClient, tmp_path: Path, name: str) -> bytes:
    """The bytes of file ``name`` on the server: read from the home on the folder backend, fetched
    through ``c`` on the object backend."""
    if not on_objects(srv):
        return (home(srv) / name).read_bytes()
    local = tmp_path / f"fetched-{secrets.token_hex(4)}"
    try:
        await c.get(name, local)
        return local.read_bytes()
    finally:
        local.unlink(missing_ok=True)


async def unfinished_uploads(srv: ServerThread, c: AsyncClient) -> int:
    """What the server keeps of unfinished uploads: partial files in the home (folder backend), or
    the bytes the database sets aside for them (object backend; ``df``'s ``partial``). 0: nothing."""
    if not on_objects(srv):
        return len(partials(home(srv)))
    return (await c.df()).partial


def connect_with(srv: ServerThread, tmp_path: Path, user: str = "alice", **credentials: Any) -> Awaitable[AsyncClient]:
    """:func:`connect` with only the credentials given (no password unless passed): for login tests."""
    return connect(srv, tmp_path, user, password=credentials.pop("password", None), **credentials)


def random_bytes(size: int, seed: int) -> bytes:
    """Deterministic incompressible bytes."""
    return random.Random(seed).randbytes(size)


def write_random(path: Path, size: int, seed: int) -> bytes:
    """Create ``path`` with ``size`` deterministic random bytes and return them."""
    data = random_bytes(size, seed)
    path.write_bytes(data)
    return data


def fd_count() -> int:
    """Open file descriptors of this process (server thread and clients alike)."""
    return len(os.listdir("/proc/self/fd"))


def marker() -> str:
    """A unique ``sleep`` argument to find our processes in /proc (sleep accepts fractions)."""
    return f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"


def pids_with(arg: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains argument ``arg``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if arg.encode() in argv and state != b"Z":
            found.append(int(name))
    return found


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


async def await_until(pred: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Async :func:`wait_until` (lets the client's own event loop run while polling)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


def no_sessions(srv: ServerThread) -> bool:
    """True once every session on ``srv`` has ended (and cleaned up)."""
    return not srv.server._tasks


def on_server(srv: ServerThread, fn: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Run ``fn`` on the server's event loop thread and return its result."""
    assert srv.loop is not None

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), srv.loop).result(timeout)


def partials(folder: Path) -> list[str]:
    """Names of ferry partial uploads in ``folder``."""
    return sorted(n for n in os.listdir(folder) if ".ferry-part-" in n)


@pytest.fixture
def no_logged_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test whose server or event loops logged an error: an internal error of a handler, or a
    thread job's exception nobody retrieved (asyncio logs it and the test would not notice). The
    teardown counts too: a ``server`` fixture stops its server there (set up after this fixture,
    it is torn down before this check)."""
    yield
    bad = [
        f"{r.name}: {r.getMessage()}"
        for r in [*caplog.get_records("call"), *caplog.get_records("teardown")]
        if r.levelno >= logging.ERROR
        and r.name.split(".")[0] in ("asyncio", "ferry")
        and not _known_cpython_race(r)
    ]
    assert not bad, bad


def _known_cpython_race(record: logging.LogRecord) -> bool:
    """CPython 3.11's selector transport can run ``_call_connection_lost`` twice when a peer resets
    while the transport is closing (a ``_write_ready`` handle already queued for that loop iteration
    runs after ``_force_close``); the second call finds ``_protocol`` None. It is inside asyncio,
    harmless (the connection is gone either way), and rare (seen once across this project's full runs)."""
    exc = record.exc_info[1] if record.exc_info else None
    return (
        record.getMessage().startswith("Exception in callback _SelectorSocketTransport._call_connection_lost")
        and isinstance(exc, AttributeError)
        and "'NoneType' object has no attribute" in str(exc)
    )


class SessionRecorder:
    """Records every :class:`Session` the server creates (install with ``monkeypatch``)."""

    def __init__(self, monkeypatch: Any) -> None:
        self.sessions: list[Session] = []
        original = Session.__init__
        recorder = self

        def init(self: Session, *args: Any, **kw: Any) -> None:
            original(self, *args, **kw)
            recorder.sessions.append(self)

        monkeypatch.setattr(Session, "__init__", init)


class RawClient:
    """A blocking socket speaking the ferry wire protocol by hand (for misbehaving clients)."""

    def __init__(
        self, port: int, *, tls: bool = False, rcvbuf: int | None = None, source: str | None = None
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:  # another loopback address (127.0.0.2...): another client address
            sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.conn = Connection(Role.CLIENT)

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are."""
        self.sock.sendall(data)

    def send(self, msg: m.Message) -> None:
        """Encode and write one message (the state table is checked locally)."""
        self.sock.sendall(self.conn.send(msg))

    def next_event(self, timeout: float = 10.0) -> Any:
        """The next wire event, or CONNECTION_ENDED; raises TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no event from the server")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            self.conn.receive_data(data)

    def until_closed(self, timeout: float = 10.0) -> list[Any]:
        """Every event up to the end of the connection (raises TimeoutError if it stays open)."""
        events = []
        while True:
            ev = self.next_event(timeout)
            if ev is CONNECTION_ENDED:
                return events
            events.append(ev)

    def login(self, user: str = "alice", password: str = PASSWORD) -> None:
        """Hello + Auth; asserts success."""
        self.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION, software="raw-test"))
        assert isinstance(self.next_event(), m.Welcome)
        self.send(m.Auth(user=user, password=password))
        ok = self.next_event()
        assert isinstance(ok, m.AuthOk), ok

    def reply(self, req_id: int, timeout: float = 10.0) -> Any:
        """The next message for ``req_id`` (data frames for other ids are skipped)."""
        while True:
            ev = self.next_event(timeout)
            if ev is CONNECTION_ENDED:
                raise ConnectionError("connection ended")
            if isinstance(ev, Data):
                continue
            if getattr(ev, "id", None) == req_id:
                return ev

    def reply_pong(self, nonce: int, timeout: float = 10.0) -> bool:
        """Wait for the Pong answering ``nonce`` (other events are skipped)."""
        while True:
            ev = self.next_event(timeout)
            if ev is CONNECTION_ENDED:
                return False
            if isinstance(ev, m.Pong) and ev.nonce == nonce:
                return True

    def close(self) -> None:
        """Close the socket (unread data makes the kernel send a reset)."""
        with contextlib.suppress(OSError):
            self.sock.close()


class Interrupt(Exception):
    """Raised by a progress callback to interrupt a transfer at a chosen point."""


def interrupt_after(limit: int, action: Callable[[], None] | None = None) -> Callable[[int, int], None]:
    """A progress callback that (optionally runs ``action`` and) raises :class:`Interrupt` once
    ``limit`` bytes are done."""

    def progress(done: int, total: int) -> None:
        if done >= limit:
            if action is not None:
                action()
            raise Interrupt(f"interrupted at {done} of {total}")

    return progress
