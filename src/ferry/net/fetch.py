"""A raw HTTP/1.1 GET/HEAD client: our own socket (and ``ssl``), h11 for the protocol grammar.

Why not ``urllib.request`` or ``http.client``: this is the toolkit's "see every byte" client, so
it opens the connection itself (IPv6, TLS with SNI and verification, connect and read timeouts)
and lets h11 do only the parsing, which covers Content-Length, chunked and close-delimited
bodies, HEAD and 1xx/204/304 correctly. URL parsing and relative-reference resolution are done
here too (RFC 3986), so no part of the standard HTTP stack is involved.

Memory stays bounded: the body is handed to the output in chunks of at most :data:`CHUNK` bytes
as they arrive. :func:`fetch_to_file` writes to a temporary name next to the target and renames it
only after the whole body arrived, so a failed fetch never leaves a partial file behind.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import socket
import ssl
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import BinaryIO

import h11

from ferry import __version__
from ferry.errors import ConnectionBroken, FerryError, FerryTimeout, TransferError, UsageError
from ferry.errtext import os_reason
from ferry.net.target import connect_stream, format_hostport, parse_port

__all__ = [
    "CHUNK",
    "DEFAULT_MAX_REDIRECTS",
    "URL",
    "HTTPStatusError",
    "ProtocolError",
    "Response",
    "TLSError",
    "TooManyRedirects",
    "fetch",
    "fetch_to_file",
    "parse_url",
    "resolve_reference",
]

#: Bytes asked of the socket per read; also the largest piece of body held in memory at once.
CHUNK = 64 * 1024
#: How many redirects are followed before giving up (the CLI's default for --max-redirects).
DEFAULT_MAX_REDIRECTS = 5
#: Statuses whose Location we follow. The request is repeated with the same method: we only ever
#: send GET or HEAD, which are safe to repeat, so the 303 "switch to GET" rule changes nothing.
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
#: Largest status line + headers accepted (h11 raises beyond it): enough for real servers, and a
#: bound on what a hostile one can make us buffer.
MAX_HEAD_SIZE = 64 * 1024

_DEFAULT_PORTS = {"http": 80, "https": 443}


class HTTPStatusError(FerryError):
    """The server answered with a status >= 400 (exit status 1, like any other remote failure)."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status} {response.reason} from {response.url}".rstrip())
        self.response = response


class TooManyRedirects(FerryError):
    """More redirects than allowed (``max_redirects``); probably a redirect loop."""


class TLSError(ConnectionBroken):
    """The TLS handshake failed: certificate not trusted, wrong host name, protocol mismatch."""


class ProtocolError(ConnectionBroken):
    """The server sent something that is not valid HTTP/1.x, or ended the body too early."""


@dataclass(frozen=True)
class URL:
    """An absolute http(s) URL, split and normalised for making a request.

    ``host`` is ASCII (IDNA-encoded if needed) and has no brackets; ``target`` is the request
    target sent on the request line: path plus ``?query``, never empty, fragment removed.
    """

    scheme: str
    host: str
    port: int
    target: str

    @property
    def authority(self) -> str:
        """``host[:port]`` as it appears in the URL and the Host header (default port omitted)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


@dataclass(frozen=True)
class Response:
    """The final response of a fetch: status, headers in arrival order, and the URL it came from."""

    status: int
    reason: str
    http_version: str
    headers: list[tuple[str, str]]
    url: str

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        lname = name.lower()
        return next((v for k, v in self.headers if k.lower() == lname), None)

    def head_lines(self) -> list[str]:
        """The status line and header lines, as they would be printed for a person."""
        return [f"HTTP/{self.http_version} {self.status} {self.reason}".rstrip()] + [
            f"{k}: {v}" for k, v in self.headers
        ]


# --- URLs (RFC 3986) ---------------------------------------------------------------------------

# RFC 3986 appendix B: splits any URI reference into scheme, authority, path, query, fragment;
# the groups that did not take part are None, which is how "absent" differs from "empty".
_URI_RE = re.compile(r"^(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?$", re.DOTALL)
# Characters that may appear literally in a request target; everything else is percent-encoded
# (spaces, controls, non-ASCII, and the few printable ones RFC 3986 excludes). '%' stays, so
# existing escapes are kept as they are.
_TARGET_SAFE = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&'()*+,;=%"
)


@dataclass(frozen=True)
class _Parts:
    scheme: str | None
    authority: str | None
    path: str
    query: str | None
    fragment: str | None

    def unsplit(self) -> str:
        text = f"{self.scheme}:" if self.scheme is not None else ""
        if self.authority is not None:
            text += f"//{self.authority}"
        text += self.path
        if self.query is not None:
            text += f"?{self.query}"
        if self.fragment is not None:
            text += f"#{self.fragment}"
        return text


def _split(text: str) -> _Parts:
    m = _URI_RE.match(text)
    assert m is not None  # every group is optional: the pattern matches any string
    return _Parts(m.group(1), m.group(2), m.group(3), m.group(4), m.group(5))


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4: resolve ``.`` and ``..`` segments."""
    out: list[str] = []
    while path:
        if path.startswith("../"):
            path = path[3:]
        elif path.startswith(("./", "/./")):
            path = path[2:]
        elif path == "/.":
            path = "/"
        elif path.startswith("/../"):
            path = path[3:]
            if out:
                out.pop()
        elif path == "/..":
            path = "/"
            if out:
                out.pop()
        elif path in (".", ".."):
            path = ""
        else:
            # Move the first segment (with its leading '/', if any) to the output.
            start = 1 if path.startswith("/") else 0
            end = path.find("/", start)
            end = len(path) if end < 0 else end
            out.append(path[:end])
            path = path[end:]
    return "".join(out)


def resolve_reference(base: str, reference: str) -> str:
    """Resolve ``reference`` (e.g. a Location header) against the absolute URL ``base`` (RFC 3986 5.2.2)."""
    b, r = _split(base), _split(reference.strip())
    if r.scheme is not None:
        t = _Parts(r.scheme, r.authority, _remove_dot_segments(r.path), r.query, r.fragment)
    elif r.authority is not None:
        t = _Parts(b.scheme, r.authority, _remove_dot_segments(r.path), r.query, r.fragment)
    elif r.path == "":
        t = _Parts(b.scheme, b.authority, b.path, r.query if r.query is not None else b.query, r.fragment)
    elif r.path.startswith("/"):
        t = _Parts(b.scheme, b.authority, _remove_dot_segments(r.path), r.query, r.fragment)
    else:
        # Merge (5.2.3): the base path up to its last '/', or '/' if the base has only an authority.
        if b.authority is not None and b.path == "":
            merged = "/" + r.path
        else:
            merged = b.path[: b.path.rfind("/") + 1] + r.path
        t = _Parts(b.scheme, b.authority, _remove_dot_segments(merged), r.query, r.fragment)
    return t.unsplit()


def _quote_target(text: str) -> str:
    return "".join(chr(b) if b in _TARGET_SAFE else f"%{b:02X}" for b in text.encode("utf-8"))


def _parse_host(text: str, url: str) -> str:
    if text.startswith("["):
        if not text.endswith("]"):
            raise UsageError(f"invalid URL {url!r}: missing ']' after IPv6 address")
        literal = text[1:-1].replace("%25", "%")  # RFC 6874 zone ids are written %25 in URLs
        try:
            ipaddress.IPv6Address(literal)
        except ValueError as exc:
            raise UsageError(f"invalid URL {url!r}: {literal!r} is not an IPv6 address") from exc
        return literal
    if not text:
        raise UsageError(f"invalid URL {url!r}: no host")
    if any(c in text for c in " \t\r\n%\\<>\"{}|^`[]"):
        raise UsageError(f"invalid URL {url!r}: bad character in host {text!r}")
    try:
        # Host names are case-insensitive; IDNA turns a Unicode name into the ASCII DNS form.
        return text.lower() if text.isascii() else text.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise UsageError(f"invalid URL {url!r}: bad host name {text!r}") from exc


def parse_url(text: str) -> URL:
    """Parse an absolute ``http://`` or ``https://`` URL; anything else is a :class:`UsageError`."""
    parts = _split(text.strip())
    if parts.scheme is None:
        raise UsageError(f"invalid URL {text!r}: no scheme (write http://... or https://...)")
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise UsageError(f"unsupported URL scheme {scheme!r} in {text!r}: use http or https")
    if not parts.authority:
        raise UsageError(f"invalid URL {text!r}: no host")
    _userinfo, at, hostport = parts.authority.rpartition("@")
    if at:
        # Sending credentials is out of scope; silently dropping them would be a surprise.
        raise UsageError(f"credentials in URLs are not supported: {text!r}")
    if hostport.startswith("["):
        close = hostport.find("]")
        host_text, port_text = (hostport[: close + 1], hostport[close + 1 :]) if close >= 0 else (hostport, "")
        if port_text and not port_text.startswith(":"):
            raise UsageError(f"invalid URL {text!r}: junk after IPv6 address")
        port_text = port_text[1:]
    elif hostport.count(":") > 1:
        raise UsageError(f"invalid URL {text!r}: write IPv6 addresses in brackets, e.g. http://[::1]:8080/")
    else:
        host_text, _, port_text = hostport.partition(":")
    host = _parse_host(host_text, text)
    port = parse_port(port_text) if port_text else _DEFAULT_PORTS[scheme]
    target = _quote_target(parts.path or "/")
    if parts.query is not None:
        target += "?" + _quote_target(parts.query)
    return URL(scheme, host, port, target)


# --- HTTP --------------------------------------------------------------------------------------


def _tls_context(insecure: bool, cafile: str | os.PathLike[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if cafile is not None:
        # Added to the system CAs: create_default_context(cafile=...) would *replace* them.
        try:
            context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load CA file {os.fspath(cafile)}: {os_reason(exc)}") from exc
    if insecure:
        context.check_hostname = False  # must be switched off before verify_mode
        context.verify_mode = ssl.CERT_NONE
    return context


class _Exchange:
    """One request/response on one connection; the connection is closed by :meth:`close`."""

    def __init__(self, url: URL, sock: socket.socket, timeout: float) -> None:
        self.url = url
        self.sock = sock
        self.timeout = timeout
        self.conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        self.what = format_hostport(url.host, url.port)
        self.eof = False  # the peer closed its side; h11 errors after this are truncations
        self.head_seen = False  # the final response head arrived; what follows is the body

    def close(self) -> None:
        self.sock.close()

    def _recv(self, doing: str) -> bytes:
        try:
            return self.sock.recv(CHUNK)
        except TimeoutError as exc:
            raise FerryTimeout(f"timed out {doing} from {self.what} (no data for {self.timeout:g} s)") from exc
        except ssl.SSLError as exc:
            raise TLSError(f"TLS error {doing} from {self.what}: {exc.reason or exc}") from exc
        except OSError as exc:
            raise ConnectionBroken(f"connection to {self.what} broken {doing}: {os_reason(exc)}") from exc

    def _next_event(self, doing: str) -> object:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if not self.eof:
                    raise ProtocolError(f"bad HTTP from {self.what} {doing}: {exc}") from exc
                if self.head_seen:
                    raise ProtocolError(f"response body from {self.what} cut short: {exc}") from exc
                raise ProtocolError(f"{self.what} closed the connection {doing}") from exc
            if event is not h11.NEED_DATA:
                return event
            data = self._recv(doing)
            self.eof = not data
            # b"" tells h11 about EOF: it ends a close-delimited body, and makes the next
            # next_event() raise if the message was incomplete.
            self.conn.receive_data(data)

    def send_request(self, method: str) -> None:
        """Send the request head; GET and HEAD have no body."""
        request = h11.Request(
            method=method,
            target=self.url.target,
            headers=[
                ("Host", self.url.authority),
                ("User-Agent", f"ferry/{__version__}"),
                ("Accept", "*/*"),
                # The body is written out as raw bytes, so ask for it uncompressed.
                ("Accept-Encoding", "identity"),
                # One request per connection keeps the state machine trivial and tells
                # HTTP/1.1 servers to close after the body instead of holding the socket.
                ("Connection", "close"),
            ],
        )
        data = self.conn.send(request) + (self.conn.send(h11.EndOfMessage()) or b"")
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise FerryTimeout(f"timed out sending the request to {self.what}") from exc
        except OSError as exc:
            raise ConnectionBroken(f"connection to {self.what} broken sending the request: {os_reason(exc)}") from exc

    def read_head(self) -> Response:
        """Read up to and including the final (non-1xx) response head."""
        while True:
            event = self._next_event("waiting for the response")
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends carry nothing for us
            if isinstance(event, h11.Response):
                self.head_seen = True
                return Response(
                    status=event.status_code,
                    reason=event.reason.decode("latin-1"),
                    http_version=event.http_version.decode("ascii"),
                    headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()],
                    url=str(self.url),
                )
            # h11 reports EOF before a response as an error, so this is only a safety net.
            raise ProtocolError(f"unexpected {type(event).__name__} from {self.what} instead of a response")

    def copy_body(self, out: BinaryIO) -> int:
        """Write the body to ``out`` as it arrives; returns its length."""
        total = 0
        while True:
            event = self._next_event("reading the body")
            if isinstance(event, h11.Data):
                out.write(event.data)
                total += len(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return total


def _open(url: URL, timeout: float, context: Callable[[], ssl.SSLContext]) -> socket.socket:
    sock = connect_stream(url.host, url.port, timeout)
    if url.scheme != "https":
        return sock
    try:
        # server_hostname drives both SNI and the certificate's name check; for an IP literal
        # ssl sends no SNI (not allowed by RFC 6066) and checks the certificate's IP SAN instead.
        return context().wrap_socket(sock, server_hostname=url.host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise TLSError(
            f"TLS certificate of {url.authority} not trusted: {exc.verify_message} "
            "(use --cafile to trust its CA, or --insecure to skip verification)"
        ) from exc
    except TimeoutError as exc:
        sock.close()
        raise FerryTimeout(f"timed out in the TLS handshake with {url.authority}") from exc
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise TLSError(f"TLS handshake with {url.authority} failed: {os_reason(exc)}") from exc


def fetch(
    url: str,
    out: BinaryIO,
    *,
    method: str = "GET",
    timeout: float = 10.0,
    insecure: bool = False,
    cafile: str | os.PathLike[str] | None = None,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    on_response: Callable[[Response], None] | None = None,
) -> Response:
    """Fetch ``url`` with GET (or HEAD), write the final response's body to ``out``, return the response.

    Redirects (301/302/303/307/308 with a Location) are followed up to ``max_redirects`` times;
    one more raises :class:`TooManyRedirects`. ``on_response`` sees every response head, the
    redirects included, before any body is written. The status is *not* checked: a 404's body is
    written like any other (see :func:`fetch_to_file` and :class:`HTTPStatusError`).

    ``timeout`` bounds connecting, the TLS handshake, and every wait for data (not the total).
    Raises :class:`UsageError` for a bad URL, :class:`ConnectionBroken` (and its subclasses
    :class:`FerryTimeout`, :class:`TLSError`, :class:`ProtocolError`) for network and protocol
    failures, including a body shorter than its Content-Length.
    """
    method = method.upper()
    if method not in ("GET", "HEAD"):
        raise UsageError(f"unsupported method {method!r}: use GET or HEAD")
    if timeout <= 0:
        raise UsageError(f"timeout must be positive, not {timeout:g}")
    if max_redirects < 0:
        raise UsageError("max_redirects must not be negative")
    current = parse_url(url)
    cached: list[ssl.SSLContext] = []

    def context() -> ssl.SSLContext:
        # Built on first https use only, and once per fetch: loading the CA store costs ~10 ms.
        if not cached:
            cached.append(_tls_context(insecure, cafile))
        return cached[0]

    redirects = 0
    while True:
        exchange = _Exchange(current, _open(current, timeout, context), timeout)
        try:
            exchange.send_request(method)
            response = exchange.read_head()
            if on_response is not None:
                on_response(response)
            location = response.header("location")
            if response.status in REDIRECT_STATUSES and location:
                # The redirect's own body is never read: closing the connection discards it.
                if redirects >= max_redirects:
                    raise TooManyRedirects(f"too many redirects (more than {max_redirects}), last to {location}")
                try:
                    current = parse_url(resolve_reference(str(current), location))
                except UsageError as exc:
                    raise ProtocolError(f"{current.authority} redirected to an unusable URL: {exc}") from exc
                redirects += 1
                continue
            exchange.copy_body(out)
            return response
        finally:
            exchange.close()


def fetch_to_file(
    url: str,
    path: str | os.PathLike[str],
    *,
    method: str = "GET",
    timeout: float = 10.0,
    insecure: bool = False,
    cafile: str | os.PathLike[str] | None = None,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
    on_response: Callable[[Response], None] | None = None,
) -> Response:
    """Fetch ``url`` into the file ``path``, all or nothing; the other arguments are those of :func:`fetch`.

    The body goes to a temporary file in the same directory (so the final rename is atomic), which
    is fsynced and renamed to ``path`` only once the body is complete and the status is below 400.
    Otherwise the temporary file is removed and the error raised (:class:`HTTPStatusError` for a
    status >= 400): ``path`` is either the whole body or untouched.
    """
    final = os.fspath(path)
    directory, name = os.path.split(final)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.part")
    try:
        # O_EXCL: never clobber a file we did not create; mode 0o666 lets the umask decide, so the
        # result gets the permissions any other newly written file would get.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as exc:
        raise UsageError(f"cannot write {final}: {os_reason(exc)}") from exc
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                response = fetch(
                    url,
                    f,
                    method=method,
                    timeout=timeout,
                    insecure=insecure,
                    cafile=cafile,
                    max_redirects=max_redirects,
                    on_response=on_response,
                )
                if response.status >= 400:
                    raise HTTPStatusError(response)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except FerryError:
            raise
        except OSError as exc:
            # Socket errors were already translated by fetch(): an OSError here is the local disk
            # (full, read-only) or the destination (e.g. a directory of that name).
            raise TransferError(f"cannot write {final}: {os_reason(exc)}") from exc
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    return response
