"""Address parsing and connecting, shared by the client tools ``send``, ``fetch`` and ``probe``.

One place turns user text (``host:port``, ``[::1]:port``, a Unix socket path) into something a
socket can use, and one place turns the ``OSError`` zoo of ``connect`` into ferry's errors with a
message a person can act on. Everything here raises :class:`~ferry.errors.UsageError` for input
that can never work, and :class:`~ferry.errors.ConnectionBroken` (or a subclass) for failures that
depend on the network or on the peer.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from ferry.errors import ConnectionBroken, FerryTimeout, UsageError
from ferry.errtext import os_reason

__all__ = [
    "HostPort",
    "UnknownHost",
    "connect_error",
    "connect_stream",
    "connect_unix",
    "format_hostport",
    "parse_hostport",
    "parse_port",
    "resolve",
]

#: The largest valid TCP/UDP port. Port 0 means "any" to bind() and is never a valid *target*.
MAX_PORT = 65535


class UnknownHost(ConnectionBroken):
    """The host name could not be resolved to an address.

    A subclass of :class:`ConnectionBroken` (exit status 6), not a usage error: a name that does
    not resolve now may resolve later (DNS outage, VPN down), so scripts should treat it like any
    other network failure.
    """


@dataclass(frozen=True)
class HostPort:
    """A parsed ``host:port``: the host without brackets, and a port in 1..65535."""

    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def parse_port(text: str) -> int:
    """Parse a decimal port number in 1..65535; anything else is a :class:`UsageError`."""
    # isdigit() alone accepts non-ASCII digits ("٨٠") that int() would happily convert.
    if not text or not text.isascii() or not text.isdigit():
        raise UsageError(f"invalid port {text!r}: expected a number between 1 and {MAX_PORT}")
    port = int(text)
    if not 1 <= port <= MAX_PORT:
        raise UsageError(f"port {port} out of range: expected a number between 1 and {MAX_PORT}")
    return port


def parse_hostport(text: str) -> HostPort:
    """Parse ``HOST:PORT`` or ``[IPV6]:PORT`` into a :class:`HostPort`.

    A bare IPv6 address with a port (``::1:80``) is rejected rather than guessed at: the last
    group could be part of the address or the port, and guessing wrong connects somewhere else.
    """
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise UsageError(f"invalid address {text!r}: missing ']' after IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if not rest.startswith(":"):
            raise UsageError(f"invalid address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
        if not host:
            raise UsageError(f"invalid address {text!r}: empty host")
        return HostPort(host, parse_port(port_text))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise UsageError(f"invalid address {text!r}: expected HOST:PORT")
    if not host:
        raise UsageError(f"invalid address {text!r}: empty host")
    if ":" in host:
        raise UsageError(f"invalid address {text!r}: write IPv6 addresses in brackets, e.g. [::1]:{port_text}")
    return HostPort(host, parse_port(port_text))


def format_hostport(host: str, port: int) -> str:
    """Format a host and port for humans and URLs: IPv6 literals get brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str, port: int, socktype: int) -> list[tuple[int, int, int, tuple[object, ...]]]:
    """Resolve ``host`` to a list of ``(family, type, proto, sockaddr)``, in resolver order.

    Raises :class:`UnknownHost` if the name does not resolve.
    """
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socktype)
    except socket.gaierror as exc:
        raise UnknownHost(f"unknown host {host!r}: {exc.strerror}") from exc
    except UnicodeError as exc:
        # getaddrinfo IDNA-encodes the name itself and fails with UnicodeError on labels
        # that are empty or longer than 63 characters.
        raise UsageError(f"invalid host name {host!r}") from exc
    return [(family, stype, proto, tuple(sockaddr)) for family, stype, proto, _canon, sockaddr in infos]


def connect_error(exc: OSError, what: str, timeout: float | None) -> ConnectionBroken:
    """Translate an ``OSError`` from ``connect`` into a one-line ferry error about ``what``."""
    if isinstance(exc, TimeoutError | socket.timeout):
        # With no timeout of ours this is the kernel giving up (ETIMEDOUT), so no number to quote.
        after = f" (after {timeout:g} s)" if timeout is not None else ""
        return FerryTimeout(f"timed out connecting to {what}{after}")
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionBroken(f"connection refused by {what} (nothing listening there?)")
    if isinstance(exc, FileNotFoundError):
        return ConnectionBroken(f"no such socket: {what} (is the server running?)")
    name = errno.errorcode.get(exc.errno or 0, "error")
    return ConnectionBroken(f"cannot connect to {what}: {os_reason(exc)} ({name})")


def connect_stream(host: str, port: int, timeout: float | None, *, socktype: int = socket.SOCK_STREAM) -> socket.socket:
    """Connect to ``host:port``, trying each resolved address in turn, like ``socket.create_connection``.

    ``timeout`` applies to each connection attempt and stays set on the returned socket, so later
    reads and writes time out too. For ``SOCK_DGRAM`` the socket is merely *connected* (no packet is
    sent), which makes the kernel filter replies to the target and report ICMP errors as exceptions.
    """
    what = format_hostport(host, port)
    last: OSError | None = None
    for family, stype, proto, sockaddr in resolve(host, port, socktype):
        sock = socket.socket(family, stype, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    if last is None:  # getaddrinfo never returns an empty list, but do not crash if it does
        raise UnknownHost(f"unknown host {host!r}: no addresses")
    raise connect_error(last, what, timeout) from last


def connect_unix(path: str, timeout: float | None) -> socket.socket:
    """Connect a stream socket to the Unix socket at ``path``."""
    if not hasattr(socket, "AF_UNIX"):
        raise UsageError("Unix sockets are not supported on this platform")
    if not path:
        raise UsageError("empty Unix socket path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
            # sun_path holds ~107 bytes; a longer path can never work, so it is bad input.
            raise UsageError(f"Unix socket path too long: {path}") from exc
        raise connect_error(exc, path, timeout) from exc
    return sock
