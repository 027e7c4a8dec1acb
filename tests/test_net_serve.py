"""``ferry net serve`` in-process: every KIND over tcp, udp and unix, on the in-process models.

fork and prefork are exercised as subprocesses in test_net_serve_cli.py (forking the test
runner, which has threads, is unsafe).
"""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest

from ferry.errors import FerryError, UsageError
from ferry.net.serve import ServeConfig, Server
from test_net_serve_support import (
    InProcServer,
    connect,
    echo_roundtrip,
    in_process,
    is_closed,
    parse_address,
    recv_all,
    recv_line,
    reset,
)

pytestmark = pytest.mark.timeout(60)

IN_PROCESS_MODELS = ["asyncio", "select", "thread", "iterative"]
STREAM_PROTOS = ["tcp", "unix"]


def options(proto: str, model: str, tmp_path: Path, **extra: object) -> dict[str, object]:
    if proto == "unix":
        return {"path": str(tmp_path / "s.sock"), "model": model, **extra}
    return {"proto": proto, "model": model, "port": 0, **extra}


# -- every kind over stream sockets -----------------------------------------------------------


@pytest.mark.parametrize("proto", STREAM_PROTOS)
@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_hello_stream(proto: str, model: str, tmp_path: Path) -> None:
    with in_process("hello", **options(proto, model, tmp_path)) as srv:
        for _ in range(3):
            with connect(srv.address, proto) as c:
                assert recv_all(c) == b"Hello world\n"


@pytest.mark.parametrize("proto", STREAM_PROTOS)
@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_greet_stream(proto: str, model: str, tmp_path: Path) -> None:
    with in_process("greet", **options(proto, model, tmp_path)) as srv, connect(srv.address, proto) as c:
        buf = bytearray()
        assert recv_line(c, buf) == b"Welcome!\n"
        c.sendall(b"Ann\nBo")
        assert recv_line(c, buf) == b"Hello, Ann!\n"
        c.sendall(b"b\r\n" + "Zoë\n".encode())
        assert recv_line(c, buf) == b"Hello, Bob!\n"
        assert recv_line(c, buf) == "Hello, Zoë!\n".encode()
        c.sendall(b"exit\n")
        assert recv_all(c) == b""  # exit closes this client without another word


@pytest.mark.parametrize("proto", STREAM_PROTOS)
@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_upper_stream(proto: str, model: str, tmp_path: Path) -> None:
    with in_process("upper", **options(proto, model, tmp_path)) as srv, connect(srv.address, proto) as c:
        buf = bytearray()
        c.sendall(b"abc \xff\x00xyz\n")
        assert recv_line(c, buf) == b"ABC \xff\x00XYZ\n"
        c.sendall(b"second line\nno newline")
        assert recv_line(c, buf) == b"SECOND LINE\n"
        c.shutdown(socket.SHUT_WR)  # the partial last line is answered at EOF
        assert bytes(buf) + recv_all(c) == b"NO NEWLINE"


@pytest.mark.parametrize("proto", STREAM_PROTOS)
@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_echo_stream_binary(proto: str, model: str, tmp_path: Path) -> None:
    rnd = random.Random(f"{proto}{model}")
    with in_process("echo", **options(proto, model, tmp_path)) as srv:
        for size in (0, 1, 4096, 65537, 1 << 20):
            payload = rnd.randbytes(size)
            assert echo_roundtrip(srv.address, payload, proto) == payload


# -- every kind over udp ----------------------------------------------------------------------

UDP_MODELS = ["asyncio", "select", "iterative"]


@pytest.mark.parametrize("model", UDP_MODELS)
def test_udp_kinds(model: str) -> None:
    rnd = random.Random(model)
    for kind, cases in {
        "hello": [(b"anything", b"Hello world\n"), (b"", b"Hello world\n")],
        "greet": [
            (b"Ann", b"Hello, Ann!\n"),
            (b"Bob\n", b"Hello, Bob!\n"),
            (b"\xff", b"error: line is not valid UTF-8; closing\n"),
        ],
        "upper": [(b"ab\xffc d\n", b"AB\xffC D\n")],
        "echo": [(p, p) for p in (b"", rnd.randbytes(1000), rnd.randbytes(60000))],
    }.items():
        with in_process(kind, proto="udp", model=model, port=0) as srv, connect(srv.address, "udp") as c:
            for request, reply in cases:
                c.send(request)
                assert c.recv(65535) == reply, (kind, request[:20])


@pytest.mark.parametrize("model", UDP_MODELS)
def test_udp_greet_answers_every_datagram(model: str) -> None:
    with in_process("greet", proto="udp", model=model, port=0) as srv, connect(srv.address, "udp") as c:
        # One reply per datagram, in order, even for "exit" (UDP has no session to close).
        for name in ("exit", "Bob", "Zoë"):
            c.send(name.encode())
        assert [c.recv(65535) for _ in range(3)] == [
            b"Hello, exit!\n",
            b"Hello, Bob!\n",
            "Hello, Zoë!\n".encode(),
        ]


def test_udp_many_clients_at_once() -> None:
    with in_process("upper", proto="udp", port=0) as srv:
        clients = [connect(srv.address, "udp") for _ in range(20)]
        try:
            for i, c in enumerate(clients):
                c.send(f"client {i}".encode())
            for i, c in enumerate(clients):
                assert c.recv(100) == f"CLIENT {i}".encode()
        finally:
            for c in clients:
                c.close()


# -- robustness -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_greet_non_utf8_drops_only_that_client(model: str) -> None:
    with in_process("greet", model=model, port=0) as srv:
        if model == "iterative":
            others = []  # one client at a time: a second one could not be served concurrently
        else:
            others = [connect(srv.address)]
            assert recv_line(others[0], bytearray()) == b"Welcome!\n"
        with connect(srv.address) as bad:
            buf = bytearray()
            assert recv_line(bad, buf) == b"Welcome!\n"
            bad.sendall(b"caf\xe9\n")
            assert recv_line(bad, buf) == b"error: line is not valid UTF-8; closing\n"
            assert recv_all(bad) == b""
        for c in others:
            c.sendall(b"still here\n")
            assert recv_line(c, bytearray()) == b"Hello, still here!\n"
            c.close()
        with connect(srv.address) as after:
            buf = bytearray()
            assert recv_line(after, buf) == b"Welcome!\n"
            after.sendall(b"x\n")
            assert recv_line(after, buf) == b"Hello, x!\n"


@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_resets_and_vanishing_clients_do_not_kill_the_server(model: str) -> None:
    with in_process("echo", model=model, port=0) as srv:
        reset(connect(srv.address))  # reset before sending anything
        c = connect(srv.address)
        c.sendall(b"partial")
        reset(c)  # reset with our echo possibly in flight
        c = connect(srv.address)
        # Send far more than the socket buffers hold without reading, then reset: the server is
        # mid-write when the RST arrives (EPIPE / ECONNRESET on its side).
        c.settimeout(0.5)
        try:
            c.sendall(b"\x00" * (8 << 20))
        except TimeoutError:
            pass
        reset(c)
        payload = b"after the resets"
        assert echo_roundtrip(srv.address, payload) == payload


@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_idle_client_is_closed(model: str) -> None:
    with in_process("greet", model=model, port=0, idle_timeout=0.5) as srv, connect(srv.address) as c:
        assert recv_line(c, bytearray()) == b"Welcome!\n"
        start = time.monotonic()
        assert is_closed(c, timeout=10), "idle client was not closed"
        assert time.monotonic() - start >= 0.3  # closed by the timeout, not at once


@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_client_that_stops_reading_times_out(model: str) -> None:
    # Idle also covers "we cannot send": a client that never reads must not pin the server.
    with in_process("echo", model=model, port=0, idle_timeout=0.5) as srv, connect(srv.address) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.settimeout(0.2)
        sent = 0
        deadline = time.monotonic() + 10
        closed = False
        while time.monotonic() < deadline:
            try:
                sent += c.send(b"\x00" * 65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed, f"server kept a non-reading client open ({sent} bytes sent)"
        assert echo_roundtrip(srv.address, b"ok") == b"ok"


@pytest.mark.parametrize("model", IN_PROCESS_MODELS)
def test_stop_closes_connected_clients(model: str) -> None:
    srv = InProcServer(ServeConfig.from_options("greet", model=model, port=0))
    try:
        c = connect(srv.address)
        assert recv_line(c, bytearray()) == b"Welcome!\n"
    finally:
        srv.stop()  # returns only after serve_forever did
    assert is_closed(c, timeout=5)
    c.close()


# -- binding ----------------------------------------------------------------------------------


def test_restart_on_same_port_reuses_address() -> None:
    # hello closes first, so the *server* side holds TIME_WAIT; without SO_REUSEADDR the next
    # bind to that port would fail with "address in use".
    with in_process("hello", port=0) as srv:
        _host, port = parse_address(srv.address)
        for _ in range(5):
            with connect(srv.address) as c:
                assert recv_all(c) == b"Hello world\n"
    with in_process("hello", port=port) as srv, connect(srv.address) as c:
        assert recv_all(c) == b"Hello world\n"


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with (
            Server(ServeConfig.from_options("echo", port=port)) as server,
            pytest.raises(FerryError, match="address already in use"),
        ):
            server.bind()


def test_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1")
    with in_process("upper", host="::1", port=0) as srv:
        assert srv.address.startswith("[::1]:")
        with connect(srv.address) as c:
            c.sendall(b"v6\n")
            assert recv_line(c, bytearray()) == b"V6\n"


def test_unix_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a dead server's leftover: the file exists, nobody listens
    assert path.exists()
    with in_process("hello", path=str(path)) as srv, connect(srv.address, "unix") as c:
        assert recv_all(c) == b"Hello world\n"
    assert not path.exists()  # removed on exit


def test_unix_socket_in_use_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with in_process("hello", path=str(path)):
        with (
            Server(ServeConfig.from_options("echo", path=str(path))) as second,
            pytest.raises(FerryError, match="in use by a running server"),
        ):
            second.bind()
        assert path.exists()  # the refused server must not remove the live one's socket


def test_unix_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with (
        Server(ServeConfig.from_options("echo", path=str(path))) as server,
        pytest.raises(UsageError, match="not a socket"),
    ):
        server.bind()
    assert path.read_text() == "keep me"
