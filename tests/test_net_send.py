"""Tests of ``ferry net send`` against tiny in-test echo servers (TCP, UDP, Unix; loopback only)."""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import FERRY
from ferry.cli import main
from ferry.errors import ConnectionBroken, ExitCode, FerryTimeout, UsageError
from ferry.net.send import send
from ferry.net.target import UnknownHost

pytestmark = pytest.mark.timeout(30)


def echo(conn: socket.socket) -> None:
    """Echo as data arrives (not after EOF), so a large piped input cannot deadlock."""
    while data := conn.recv(65536):
        conn.sendall(data)


def answer_but_never_close(release: threading.Event) -> Callable[[socket.socket], None]:
    """A handler that replies to the first data, then holds the connection open until ``release``."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(b"partial answer\n" + conn.recv(65536))
        release.wait(10)

    return handler


class StreamServer:
    """Accepts on ``listener`` in a thread and runs ``handler`` per connection in its own thread."""

    def __init__(self, listener: socket.socket, handler: Callable[[socket.socket], None]) -> None:
        self.listener = listener
        self.handler = handler
        self.stop = threading.Event()
        listener.listen()
        listener.settimeout(0.05)  # lets the accept loop notice `stop` promptly
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)  # a stuck client cannot keep a handler alive past the test
            try:
                self.handler(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def tcp_echo() -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = StreamServer(listener, echo)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    server.close()


@pytest.fixture
def unix_echo(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "echo.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    server = StreamServer(listener, echo)
    yield path
    server.close()


@pytest.fixture
def udp_echo() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.05)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            sock.sendto(data, peer)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join(5)
    sock.close()


def closed_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on: bind it, then close it."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(*args: str, capsysbinary: pytest.CaptureFixture[bytes]) -> tuple[int, bytes, str]:
    """Run ``ferry net send ARGS`` in-process; returns exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as info:
        main(["net", "send", *args])
        raise SystemExit(0)
    out, err = capsysbinary.readouterr()
    return int(info.value.code or 0), out, err.decode()


# --- message mode ------------------------------------------------------------------------------


def test_tcp_messages_cli(tcp_echo: str) -> None:
    proc = subprocess.run([*FERRY, "net", "send", tcp_echo, "hello", "wörld"], capture_output=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello\nwörld\n".encode()
    assert proc.stderr == b""


def test_unix_messages(unix_echo: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, out, err = run_cli("--proto", "unix", unix_echo, "over", "unix", capsysbinary=capsysbinary)
    assert (code, out, err) == (0, b"over\nunix\n", "")


def test_udp_messages(udp_echo: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, out, err = run_cli("--proto", "udp", udp_echo, "one", "two", "three", capsysbinary=capsysbinary)
    assert (code, out, err) == (0, b"one\ntwo\nthree\n", "")


def test_udp_missing_replies_are_reported(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:  # bound, so no ICMP; never replies
        mute.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{mute.getsockname()[1]}"
        code, out, err = run_cli("--proto", "udp", "--timeout", "0.2", target, "a", "b", capsysbinary=capsysbinary)
        assert mute.recv(100) == b"a\n" and mute.recv(100) == b"b\n"  # both were still sent
    assert code == ExitCode.CONNECTION
    assert out == b""
    assert "no reply" in err and "2 of 2 datagrams" in err


def test_udp_refused(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    port = closed_port(socket.SOCK_DGRAM)
    code, _, err = run_cli("--proto", "udp", "--timeout", "2", f"127.0.0.1:{port}", "x", capsysbinary=capsysbinary)
    assert code == ExitCode.CONNECTION
    assert "connection refused" in err


def test_tcp_peer_that_never_closes_times_out_after_printing() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    release = threading.Event()
    server = StreamServer(listener, answer_but_never_close(release))
    try:
        out = io.BytesIO()
        with pytest.raises(FerryTimeout, match="timed out waiting for"):
            send(f"127.0.0.1:{listener.getsockname()[1]}", [b"ping"], timeout=0.3, out=out)
        assert out.getvalue() == b"partial answer\nping\n"  # what arrived was written before the error
    finally:
        release.set()
        server.close()


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_target() -> None:
    listener = socket.socket(socket.AF_INET6)
    listener.bind(("::1", 0))
    server = StreamServer(listener, echo)
    try:
        out = io.BytesIO()
        send(f"[::1]:{listener.getsockname()[1]}", [b"six"], out=out, timeout=5)
        assert out.getvalue() == b"six\n"
    finally:
        server.close()


# --- pipe mode ---------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "unix"])
def test_stdin_pipe_binary(proto: str, request: pytest.FixtureRequest) -> None:
    target = request.getfixturevalue("tcp_echo" if proto == "tcp" else "unix_echo")
    # Every byte value, NULs and newlines included, and more than any socket buffer holds, so
    # both directions must stream at once for the echo to complete.
    data = bytes(range(256)) * 64 + os.urandom(4 * 1024 * 1024)
    proc = subprocess.run(
        [*FERRY, "net", "send", "--proto", proto, target], input=data, capture_output=True, timeout=25
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == len(data)
    assert proc.stdout == data


def test_pipe_library_half_closes_on_input_eof(tcp_echo: str) -> None:
    # The echo server only ends when it sees EOF: returning at all proves the half-close.
    out = io.BytesIO()
    send(tcp_echo, [], inp=io.BytesIO(b"abc\x00\xff\n"), out=out, timeout=5)
    assert out.getvalue() == b"abc\x00\xff\n"


def test_udp_pipe(udp_echo: str) -> None:
    out = io.BytesIO()
    send(udp_echo, [], proto="udp", inp=io.BytesIO(b"dgram\x00\xff"), out=out, timeout=0.3)
    assert out.getvalue() == b"dgram\x00\xff"


# --- errors ------------------------------------------------------------------------------------


def test_connection_refused_cli() -> None:
    proc = subprocess.run(
        [*FERRY, "net", "send", f"127.0.0.1:{closed_port()}", "hi"], capture_output=True, timeout=20
    )
    assert proc.returncode == ExitCode.CONNECTION
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("ferry: connection refused by 127.0.0.1:")


def test_missing_unix_socket(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    path = tmp_path / "nobody-home.sock"
    code, _, err = run_cli("--proto", "unix", str(path), "hi", capsysbinary=capsysbinary)
    assert code == ExitCode.CONNECTION
    assert err.strip() == f"ferry: no such socket: {path} (is the server running?)"


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("127.0.0.1:70000", "out of range"),
        ("127.0.0.1:0", "out of range"),
        ("127.0.0.1:http", "invalid port"),
        ("127.0.0.1", "expected HOST:PORT"),
        ("::1:80", "in brackets"),
        (":80", "empty host"),
    ],
)
def test_bad_targets_exit_2(target: str, fragment: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, out, err = run_cli(target, "hi", capsysbinary=capsysbinary)
    assert code == ExitCode.USAGE
    assert out == b""
    assert err.startswith("ferry: ") and fragment in err


def test_unknown_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulated resolver failure: tests never query real DNS.
    def no_such_host(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(UnknownHost, match=re.escape("unknown host 'no.such.host.invalid'")) as info:
        send("no.such.host.invalid:80", [b"x"], out=io.BytesIO())
    assert isinstance(info.value, ConnectionBroken)
    assert info.value.exit_code == ExitCode.CONNECTION


def test_nothing_to_send_is_usage_error(tcp_echo: str) -> None:
    with pytest.raises(UsageError):
        send(tcp_echo, [], out=io.BytesIO())


def test_interactive_terminal_session(tcp_echo: str) -> None:
    # On a terminal each line must go out (and its echo come back) while stdin is still open:
    # proves the two directions really run concurrently, not "read all stdin, then the socket".
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(FERRY[0], [*FERRY[1:], "net", "send", tcp_echo], timeout=10)
    try:
        child.sendline("first line")
        child.expect("first line\r\n.*first line\r\n")  # the tty's own echo, then the server's
        child.sendline("second")
        child.expect("second\r\n.*second\r\n")
        child.sendeof()  # Ctrl-D: half-close, the echo server closes, ferry exits
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
