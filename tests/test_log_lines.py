"""Text a client controls cannot forge or split lines of the server's log (issue 10, break 6).

Every field that reaches ``logs/ferry.log`` from the other side is tried with a newline, a carriage
return and the Unicode line separator, over real connections to a real server: the user name of a
failed login (before anyone logged in), paths, a rename, a folder name of a tree upload and
download, a command (run and refused), the software string of the Hello, and an error message
that quotes what the client sent. Afterwards every line of the log must be a record of its own
(timestamp, level) or an indented continuation of one, and each attempt must be visible, escaped.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from pathlib import Path

import msgspec
import pytest

from ferry import paths
from ferry.client.aclient import AsyncClient
from ferry.errors import AuthError, FerryError
from ferry.server.log import CONTINUATION, LineFormatter
from ferry.wire import CONNECTION_ENDED, NEED_DATA, Connection, Role
from ferry.wire import messages as m
from ferry.wire.frames import HEADER, FrameKind
from ferry_server import PASSWORD, ServerThread
from transfer_support import connect, wait_until

#: What a forged record would look like: a fake login of root on a line of its own.
FORGED = "2026-12-02 10:00:00,000 INFO session 99 login user=root peer=10.0.0.1:1 plain=False"
FORGED_TAIL = "INFO session 99 login user=root"
#: Line breaks a log reader may honour: newline, CR (overwrites on a terminal), U+2028, NEL.
BREAKS = ["\n", "\r", "\u2028", "\x85"]
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")


def check_log(log: str, attempts: int) -> None:
    """Every line is a record or a continuation; the forged text shows up escaped ``attempts`` times."""
    assert log.splitlines() == log.split("\n")[:-1], "a line break other than \\n reached the log"
    for line in log.splitlines():
        assert RECORD.match(line) or line.startswith(CONTINUATION), repr(line)
    assert not any("login user=root" in ln[:60] for ln in log.splitlines())
    assert log.count(FORGED_TAIL) == attempts, log


def tls_raw(port: int) -> ssl.SSLSocket:
    """A TLS socket to the server that does not check the certificate (the tests speak the wire
    protocol by hand on it)."""
    import socket

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def next_event(sock: ssl.SSLSocket, conn: Connection) -> object:
    """The next event from the server (bounded by the socket timeout)."""
    while (ev := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(65536))
    return ev


def read_until_closed(sock: ssl.SSLSocket, conn: Connection) -> list[object]:
    """Every event the server sends until it closes (bounded by the socket timeout)."""
    events: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is CONNECTION_ENDED:
            return events
        if ev is NEED_DATA:
            try:
                data = sock.recv(65536)
            except (ssl.SSLError, OSError):
                data = b""
            conn.receive_data(data)
            if not data:
                return events
            continue
        events.append(ev)


@pytest.mark.timeout(120)
def test_remote_text_cannot_forge_log_lines(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    srv.add_user("carol", exec_allow=["echo"], exec_allowed=True)
    local = tmp_path / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "sub" / "f").write_bytes(b"x")
    attempts = 0

    async def login(user: str, password: str = PASSWORD) -> AsyncClient:
        return await connect(srv, tmp_path, user, password)

    async def main() -> None:
        nonlocal attempts
        for brk in BREAKS:
            # The user name of a failed login: logged before anyone is authenticated.
            with pytest.raises(AuthError):
                await login(f"mallory{brk}{FORGED}", "wrong")
            attempts += 1
            async with await login("alice") as c:
                name = f"d{brk}{FORGED}"
                await c.mkdir(name)  # a path
                await c.rename(name, f"e{brk}{FORGED}")  # both paths of a rename
                attempts += 3
                await c.put_tree(local, f"t{brk}{FORGED}")  # a folder name of a tree upload
                await c.get_tree(f"t{brk}{FORGED}", tmp_path / f"back{len(brk)}{ord(brk)}")
                attempts += 2
                proc = await c.run(f"echo 'x{brk}{FORGED}'")  # a command (quoted: one argument)
                assert proc.exit_code == 0
                attempts += 1
            async with await login("carol") as c:
                with pytest.raises(FerryError):  # a refused command is logged with its reason
                    await c.run(f"rm{brk}{FORGED}")
                attempts += 1

    asyncio.run(main())
    for brk in BREAKS:
        # The software string of the Hello (logged with the login).
        sock = tls_raw(srv.port)
        conn = Connection(Role.CLIENT)
        hello = m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION, software=f"x{brk}{FORGED}")
        sock.sendall(conn.send(hello))
        assert isinstance(next_event(sock, conn), m.Welcome)
        sock.sendall(conn.send(m.Auth(user="alice", password=PASSWORD)))
        assert isinstance(next_event(sock, conn), m.AuthOk)
        sock.sendall(conn.send(m.Goodbye(reason="bye")))
        read_until_closed(sock, conn)
        sock.close()
        attempts += 1
        # An error message that quotes what the client sent: a message type the server does
        # not know, named with the forged text.
        sock = tls_raw(srv.port)
        payload = msgspec.msgpack.encode({"t": f"h{brk}{FORGED}", "min_version": 1, "max_version": 1})
        sock.sendall(HEADER.pack(FrameKind.MESSAGE, 0, 0, len(payload)) + payload)
        events = read_until_closed(sock, Connection(Role.CLIENT))
        assert any(isinstance(e, m.Error) and e.code == "protocol" for e in events), events
        sock.close()
        attempts += 1
    # The server logs a session's end once the connection is closed: wait for the last one.
    logfile = paths.log_file(srv.root)
    assert wait_until(lambda: logfile.read_text(encoding="utf-8").count(FORGED_TAIL) >= attempts, 10)
    check_log(logfile.read_text(encoding="utf-8"), attempts)


def test_tracebacks_stay_under_their_record(tmp_path: Path) -> None:
    """A logged exception keeps its lines, each escaped and indented under the record."""
    stream = tmp_path / "log"
    handler = logging.FileHandler(stream, encoding="utf-8")
    handler.setFormatter(LineFormatter())
    log = logging.getLogger(f"test-tracebacks-{id(stream)}")
    log.propagate = False
    log.addHandler(handler)
    try:
        raise ValueError(f"bad name 'a\n{FORGED}\u2028{FORGED}'")
    except ValueError:
        log.exception("internal error in %s", f"Stat\r{FORGED}")
    handler.close()
    text = stream.read_text(encoding="utf-8")
    check_log(text, 3)
    assert text.splitlines()[0].endswith(f"internal error in Stat\\x0d{FORGED}")
