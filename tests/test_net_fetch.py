"""Tests of ``ferry net fetch``: a real http.server on loopback, plain and TLS, IPv4 and IPv6."""

from __future__ import annotations

import hashlib
import io
import os
import re
import socket
import ssl
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from conftest import FERRY
from ferry.cli import main
from ferry.errors import ConnectionBroken, ExitCode, FerryTimeout, UsageError
from ferry.net.fetch import (
    CHUNK,
    ProtocolError,
    TLSError,
    TooManyRedirects,
    fetch,
    fetch_to_file,
    parse_url,
    resolve_reference,
)

pytestmark = pytest.mark.timeout(30)

HELLO = b"hello, world\n"
BIG_BLOCK = 1024 * 1024
BIG_BLOCKS = 32  # 32 MiB: far more than the memory bound asserted below
_BASE_BLOCK = os.urandom(BIG_BLOCK)  # allocated at import, so tracemalloc never counts it
CHUNKS = [b"first chunk\n", b"x" * 100_000, b"\x00\xff binary \r\n in a chunk\n", b"last\n"]


def big_pieces() -> Iterator[bytes | memoryview]:
    """The big body: block i is ``i`` as 8 bytes, then the shared random block minus 8 bytes.

    Produced in pieces so the server never builds a 1 MiB copy per block, and every block differs
    (a client that repeats or drops a block fails the hash check).
    """
    tail = memoryview(_BASE_BLOCK)[8:]
    for i in range(BIG_BLOCKS):
        yield i.to_bytes(8, "big")
        yield tail


def big_sha256() -> str:
    h = hashlib.sha256()
    for piece in big_pieces():
        h.update(piece)
    return h.hexdigest()


class Handler(BaseHTTPRequestHandler):
    """Routes for every body framing and failure the client must handle."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self.route(send_body=True)

    def do_HEAD(self) -> None:
        self.route(send_body=False)

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None, send_body: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def redirect(self, status: int, location: str) -> None:
        self.reply(status, b"redirect body that must not be written\n", {"Location": location})

    def route(self, send_body: bool) -> None:
        path = self.path
        if path == "/hello":
            self.reply(200, HELLO, {"Content-Type": "text/plain"}, send_body)
        elif path == "/headers":
            # Echo the request head, so tests can check what the client sent.
            self.reply(200, str(self.headers).encode(), send_body=send_body)
        elif path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in CHUNKS:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/close":
            # HTTP/1.0 style: no Content-Length, no chunking; the body ends when the server closes.
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + HELLO * 1000)
            self.close_connection = True
        elif path.startswith("/redirect/"):
            n = int(path.rsplit("/", 1)[1])
            host = self.headers["Host"]
            # One kind of Location per hop: absolute URL, absolute path, relative path, dot-dot.
            if n == 3:
                self.redirect(301, f"http://{host}/redirect/2")
            elif n == 2:
                self.redirect(302, "/redirect/1")
            elif n == 1:
                self.redirect(307, "0")
            else:
                self.redirect(308, "../hello")
        elif path == "/see-other":
            self.redirect(303, "/hello")
        elif path == "/loop":
            self.redirect(302, "/loop")
        elif path == "/big":
            self.send_response(200)
            self.send_header("Content-Length", str(BIG_BLOCK * BIG_BLOCKS))
            self.end_headers()
            for piece in big_pieces():
                self.wfile.write(piece)
        elif path == "/missing":
            self.reply(404, b"no such thing\n", send_body=send_body)
        elif path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only ten b")
            self.close_connection = True
        else:
            self.reply(500, b"unknown test route\n", send_body=send_body)


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _serve(server: ThreadingHTTPServer) -> Iterator[str]:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        host, port = str(server.server_address[0]), int(server.server_address[1])
        yield f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def http_server() -> Iterator[str]:
    """``host:port`` of a plain HTTP server on 127.0.0.1."""
    yield from _serve(ThreadingHTTPServer(("127.0.0.1", 0), Handler))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def https_server(ca: trustme.CA) -> Iterator[tuple[int, list[str | None]]]:
    """Port of an HTTPS server with a certificate for ``localhost``, and the SNI names it saw."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    seen_sni: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen_sni.append(name)

    context.sni_callback = record_sni
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # Handshakes happen in accept(); a client that rejects our certificate makes accept() raise an
    # OSError, which socketserver ignores: exactly what a test of a failing client needs.
    server.socket = context.wrap_socket(server.socket, server_side=True)
    for hostport in _serve(server):
        yield int(hostport.rsplit(":", 1)[1]), seen_sni


@pytest.fixture(scope="module")
def cafile(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def run_cli(*args: str, capsysbinary: pytest.CaptureFixture[bytes]) -> tuple[int, bytes, str]:
    """Run ``ferry net fetch ARGS`` in-process (fast); returns exit status, stdout, stderr."""
    with pytest.raises(SystemExit) as info:
        main(["net", "fetch", *args])
        raise SystemExit(0)
    out, err = capsysbinary.readouterr()
    return int(info.value.code or 0), out, err.decode()


# --- URL handling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        # RFC 3986 section 5.4.1 (normal) and 5.4.2 (abnormal) examples, base http://a/b/c/d;p?q
        ("g:h", "g:h"),
        ("g", "http://a/b/c/g"),
        ("./g", "http://a/b/c/g"),
        ("g/", "http://a/b/c/g/"),
        ("/g", "http://a/g"),
        ("//g", "http://g"),
        ("?y", "http://a/b/c/d;p?y"),
        ("g?y", "http://a/b/c/g?y"),
        ("#s", "http://a/b/c/d;p?q#s"),
        ("g#s", "http://a/b/c/g#s"),
        ("g?y#s", "http://a/b/c/g?y#s"),
        (";x", "http://a/b/c/;x"),
        ("g;x?y#s", "http://a/b/c/g;x?y#s"),
        ("", "http://a/b/c/d;p?q"),
        (".", "http://a/b/c/"),
        ("./", "http://a/b/c/"),
        ("..", "http://a/b/"),
        ("../", "http://a/b/"),
        ("../g", "http://a/b/g"),
        ("../..", "http://a/"),
        ("../../g", "http://a/g"),
        ("../../../g", "http://a/g"),
        ("/./g", "http://a/g"),
        ("/../g", "http://a/g"),
        ("g.", "http://a/b/c/g."),
        ("..g", "http://a/b/c/..g"),
        ("./../g", "http://a/b/g"),
        ("g/./h", "http://a/b/c/g/h"),
        ("g/../h", "http://a/b/c/h"),
        ("g;x=1/../y", "http://a/b/c/y"),
    ],
)
def test_resolve_reference_rfc3986_examples(reference: str, expected: str) -> None:
    assert resolve_reference("http://a/b/c/d;p?q", reference) == expected


def test_parse_url_forms() -> None:
    u = parse_url("HTTP://Example.COM")
    assert (u.scheme, u.host, u.port, u.target, u.authority) == ("http", "example.com", 80, "/", "example.com")
    u = parse_url("https://[::1]:8443/a b/ü?q=1 2#frag")
    assert (u.host, u.port, u.target, u.authority) == ("::1", 8443, "/a%20b/%C3%BC?q=1%202", "[::1]:8443")
    assert str(parse_url("https://h:443/x")) == "https://h/x"


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://example.com/file", "unsupported URL scheme 'ftp'"),
        ("http:///path", "no host"),
        ("http://", "no host"),
        ("http://host:99999/", "out of range"),
        ("http://host:0/", "out of range"),
        ("http://host:http/", "invalid port"),
        ("example.com/path", "no scheme"),
        ("http://user:pw@host/", "credentials"),
        ("http://[::1/", "missing ']'"),
        ("http://[nope]/", "not an IPv6 address"),
        ("http://::1:80/", "in brackets"),
    ],
)
def test_bad_urls_are_usage_errors(url: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=re.escape(fragment)):
        fetch(url, io.BytesIO())


# --- body framings -----------------------------------------------------------------------------


def test_content_length_body(http_server: str) -> None:
    out = io.BytesIO()
    response = fetch(f"http://{http_server}/hello", out)
    assert out.getvalue() == HELLO
    assert (response.status, response.reason, response.http_version) == (200, "OK", "1.1")
    assert response.header("content-type") == "text/plain"
    assert response.url == f"http://{http_server}/hello"


def test_request_head_sent(http_server: str) -> None:
    out = io.BytesIO()
    fetch(f"http://{http_server}/headers", out)
    sent = out.getvalue().decode()
    assert f"Host: {http_server}" in sent
    assert "Connection: close" in sent
    assert "Accept-Encoding: identity" in sent


def test_chunked_body(http_server: str) -> None:
    out = io.BytesIO()
    response = fetch(f"http://{http_server}/chunked", out)
    assert response.header("Transfer-Encoding") == "chunked"
    assert out.getvalue() == b"".join(CHUNKS)


def test_close_delimited_body(http_server: str) -> None:
    out = io.BytesIO()
    response = fetch(f"http://{http_server}/close", out)
    assert response.http_version == "1.0"
    assert response.header("content-length") is None
    assert out.getvalue() == HELLO * 1000


def test_head_has_no_body(http_server: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, out, err = run_cli("--head", f"http://{http_server}/hello", capsysbinary=capsysbinary)
    assert code == 0
    assert out == b""
    assert "HTTP/1.1 200 OK" in err
    assert f"Content-Length: {len(HELLO)}" in err


class CountingWriter(io.RawIOBase):
    """A sink that hashes what it gets and remembers how it was fed."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.writes = 0
        self.largest = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha.update(data)
        self.writes += 1
        self.largest = max(self.largest, len(data))
        return len(data)


def test_large_body_is_streamed_with_bounded_memory(http_server: str, tmp_path: Path) -> None:
    url = f"http://{http_server}/big"
    # Streamed: many small writes, none larger than one socket read.
    sink = CountingWriter()
    fetch(url, sink)  # type: ignore[arg-type]
    assert sink.sha.hexdigest() == big_sha256()
    assert sink.largest <= CHUNK
    assert sink.writes >= BIG_BLOCK * BIG_BLOCKS // CHUNK

    # Bounded memory, measured on the path the CLI uses (-o FILE). tracemalloc sees the server
    # thread too, which never holds more than a few small pieces.
    target = tmp_path / "big.bin"
    tracemalloc.start()
    try:
        fetch_to_file(url, target)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes: the body was buffered"
    assert target.stat().st_size == BIG_BLOCK * BIG_BLOCKS
    h = hashlib.sha256()
    with target.open("rb") as f:
        while block := f.read(BIG_BLOCK):
            h.update(block)
    assert h.hexdigest() == big_sha256()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]  # no temporary left behind


# --- redirects ---------------------------------------------------------------------------------


def test_redirect_chain_absolute_and_relative(http_server: str) -> None:
    seen: list[int] = []
    out = io.BytesIO()
    response = fetch(f"http://{http_server}/redirect/3", out, on_response=lambda r: seen.append(r.status))
    assert seen == [301, 302, 307, 308, 200]
    assert out.getvalue() == HELLO  # and none of the redirect bodies
    assert response.url == f"http://{http_server}/hello"


def test_redirect_303(http_server: str) -> None:
    out = io.BytesIO()
    assert fetch(f"http://{http_server}/see-other", out).status == 200
    assert out.getvalue() == HELLO


def test_too_many_redirects(http_server: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with pytest.raises(TooManyRedirects, match="more than 5"):
        fetch(f"http://{http_server}/loop", io.BytesIO())
    # Four hops are needed here: three are too few.
    with pytest.raises(TooManyRedirects):
        fetch(f"http://{http_server}/redirect/3", io.BytesIO(), max_redirects=3)
    code, out, err = run_cli("--max-redirects", "0", f"http://{http_server}/loop", capsysbinary=capsysbinary)
    assert code == ExitCode.ERROR
    assert "ferry: too many redirects" in err
    assert out == b""


# --- HTTP errors and broken responses ----------------------------------------------------------


def test_404_exit_status(http_server: str, capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path) -> None:
    code, out, err = run_cli(f"http://{http_server}/missing", capsysbinary=capsysbinary)
    assert code == ExitCode.ERROR == 1
    assert out == b"no such thing\n"  # the error body is still shown on stdout
    assert "HTTP/1.1 404 Not Found" in err
    assert err.strip().splitlines()[-1] == f"ferry: HTTP 404 Not Found from http://{http_server}/missing"
    # With -o, an error response is not saved.
    code, _, _ = run_cli("-o", str(tmp_path / "x"), f"http://{http_server}/missing", capsysbinary=capsysbinary)
    assert code == 1
    assert list(tmp_path.iterdir()) == []


def test_truncated_body_leaves_no_file(http_server: str, tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(ProtocolError, match=r"cut short.*received 10 bytes, expected 1000"):
        fetch_to_file(f"http://{http_server}/truncated", target)
    assert list(tmp_path.iterdir()) == []

    # The same through the real command line.
    proc = subprocess.run(
        [*FERRY, "net", "fetch", "-q", "-o", str(target), f"http://{http_server}/truncated"],
        capture_output=True,
        timeout=20,
    )
    assert proc.returncode == ExitCode.CONNECTION
    err = proc.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and err.startswith("ferry: response body from")
    assert list(tmp_path.iterdir()) == []


def test_output_file_via_cli(http_server: str, tmp_path: Path) -> None:
    target = tmp_path / "chunked.bin"
    proc = subprocess.run(
        [*FERRY, "net", "fetch", "-o", str(target), f"http://{http_server}/chunked"],
        capture_output=True,
        timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b""
    assert b"Transfer-Encoding: chunked" in proc.stderr
    assert target.read_bytes() == b"".join(CHUNKS)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("ftp://127.0.0.1/x", "unsupported URL scheme"),
        ("http:///x", "no host"),
        ("http://127.0.0.1:70000/", "out of range"),
    ],
)
def test_cli_bad_input_exit_2(url: str, fragment: str, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    code, out, err = run_cli(url, capsysbinary=capsysbinary)
    assert code == ExitCode.USAGE
    assert out == b""
    assert err.startswith("ferry: ") and fragment in err and len(err.strip().splitlines()) == 1


def test_connection_refused(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with socket.socket() as s:  # bind, then close: nothing listens on this port afterwards
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run_cli(f"http://127.0.0.1:{port}/", capsysbinary=capsysbinary)
    assert code == ExitCode.CONNECTION
    assert "connection refused" in err


def test_read_timeout() -> None:
    # A listener that never accepts: the kernel completes the handshake, nobody ever answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(FerryTimeout, match="timed out waiting for the response"):
            fetch(f"http://127.0.0.1:{port}/", io.BytesIO(), timeout=0.3)
        assert time.monotonic() - start < 3

        proc = subprocess.run(
            [*FERRY, "net", "fetch", "--timeout", "0.3", f"http://127.0.0.1:{port}/"],
            capture_output=True,
            timeout=20,
        )
    assert proc.returncode == ExitCode.CONNECTION
    assert b"timed out" in proc.stderr


# --- TLS ---------------------------------------------------------------------------------------


def test_https_verified_with_cafile(https_server: tuple[int, list[str | None]], cafile: Path) -> None:
    port, seen_sni = https_server
    out = io.BytesIO()
    seen_sni.clear()
    response = fetch(f"https://localhost:{port}/hello", out, cafile=cafile)
    assert response.status == 200 and out.getvalue() == HELLO
    assert seen_sni == ["localhost"]  # SNI was sent
    # An IP literal is checked against the certificate's IP SAN.
    out = io.BytesIO()
    fetch(f"https://127.0.0.1:{port}/hello", out, cafile=cafile)
    assert out.getvalue() == HELLO


def test_https_untrusted_fails_and_insecure_works(https_server: tuple[int, list[str | None]]) -> None:
    port, _ = https_server
    with pytest.raises(TLSError, match="not trusted"):
        fetch(f"https://localhost:{port}/hello", io.BytesIO())
    out = io.BytesIO()
    assert fetch(f"https://localhost:{port}/hello", out, insecure=True).status == 200
    assert out.getvalue() == HELLO


def test_https_cli(https_server: tuple[int, list[str | None]], cafile: Path) -> None:
    port, _ = https_server
    url = f"https://localhost:{port}/redirect/1"  # redirects stay on https
    ok = subprocess.run([*FERRY, "net", "fetch", "-q", "--cafile", str(cafile), url], capture_output=True, timeout=20)
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, HELLO, b"")
    bad = subprocess.run([*FERRY, "net", "fetch", url], capture_output=True, timeout=20)
    assert bad.returncode == ExitCode.CONNECTION
    assert b"not trusted" in bad.stderr and b"--cafile" in bad.stderr
    insecure = subprocess.run([*FERRY, "net", "fetch", "-q", "--insecure", url], capture_output=True, timeout=20)
    assert (insecure.returncode, insecure.stdout) == (0, HELLO)


# --- IPv6 --------------------------------------------------------------------------------------


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_available(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_literal() -> None:
    for hostport in _serve(V6Server(("::1", 0), Handler)):
        out = io.BytesIO()
        response = fetch(f"http://{hostport}/headers", out)
        assert response.status == 200
        assert f"Host: {hostport}" in out.getvalue().decode()  # brackets kept in the Host header


def test_broken_response_is_protocol_error() -> None:
    # A server that answers with garbage: a clear error, not a crash.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        with pytest.raises(ConnectionBroken, match="bad HTTP"):
            fetch(f"http://127.0.0.1:{port}/", io.BytesIO(), timeout=5)
        t.join(5)


def test_connect_timeout() -> None:
    # A listener whose accept queue is full and that never accepts: Linux drops further SYNs, so
    # connecting hangs until our timeout. Skipped where the kernel answers differently.
    fillers: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        try:
            for _ in range(16):  # bounded: the queue holds one or two on Linux
                c = socket.socket()
                fillers.append(c)
                c.settimeout(0.2)
                if c.connect_ex(("127.0.0.1", port)) != 0:
                    break
            else:
                pytest.skip("could not fill the accept queue on this kernel")
            start = time.monotonic()
            try:
                fetch(f"http://127.0.0.1:{port}/", io.BytesIO(), timeout=0.3)
            except FerryTimeout as exc:
                assert "timed out connecting to 127.0.0.1:" in str(exc)
            except ConnectionBroken as exc:
                pytest.skip(f"this kernel does not drop SYNs on a full queue: {exc}")
            else:
                pytest.fail("fetch returned although nobody could answer")
            assert time.monotonic() - start < 3
        finally:
            for c in fillers:
                c.close()
