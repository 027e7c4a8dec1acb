"""A netcat-like client: send messages (or pipe a stream) to a TCP, UDP or Unix-socket server.

Two modes:

* **messages** (:func:`send_messages`): each message is sent followed by ``\\n``. For stream
  sockets (tcp, unix) the write side is then half-closed (``shutdown(SHUT_WR)``) so the server
  sees EOF, and everything it sends back is written out until it closes its side. For udp each
  message is one datagram and one reply datagram is awaited per message.
* **pipe** (:func:`pipe_stream`, :func:`pipe_datagrams`): input is forwarded to the socket and the
  socket to the output, both directions at once, byte for byte, in bounded chunks. For streams a
  second thread pumps the input (a blocking read of a file or terminal cannot be multiplexed
  portably: epoll refuses regular files), while the calling thread pumps the socket.

``timeout`` bounds connecting and each wait for the peer in message mode; in stream pipe mode it
bounds only connecting, because an interactive session may rightly stay silent for a long time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, Literal

from ferry.errors import ConnectionBroken, FerryError, FerryTimeout, UsageError
from ferry.errtext import os_reason
from ferry.net.target import connect_stream, connect_unix, format_hostport, parse_hostport

__all__ = [
    "CHUNK",
    "MAX_DATAGRAM",
    "Proto",
    "open_socket",
    "pipe_datagrams",
    "pipe_stream",
    "send",
    "send_messages",
]

Proto = Literal["tcp", "udp", "unix"]

#: Read size for both directions: large enough for throughput, small enough to bound memory.
CHUNK = 64 * 1024
#: The largest UDP payload over IPv4 (65535 - 8 byte UDP header - 20 byte IP header).
MAX_DATAGRAM = 65507


def open_socket(target: str, proto: Proto, timeout: float | None) -> tuple[socket.socket, str]:
    """Connect to ``target`` (``HOST:PORT``, or a path for unix); returns the socket and a display name."""
    if proto == "unix":
        return connect_unix(target, timeout), target
    hp = parse_hostport(target)
    socktype = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    return connect_stream(hp.host, hp.port, timeout, socktype=socktype), format_hostport(hp.host, hp.port)


def _io_error(exc: OSError, what: str, timeout: float | None, doing: str) -> FerryError:
    """Translate an OSError from reading or writing the socket into a one-line ferry error."""
    if isinstance(exc, TimeoutError):
        # timeout is None in pipe mode: then the kernel gave up (ETIMEDOUT), not our clock.
        idle = f" (no data for {timeout:g} s)" if timeout is not None else ""
        return FerryTimeout(f"timed out {doing} {what}{idle}")
    if isinstance(exc, ConnectionRefusedError):
        # On a connected UDP socket the kernel reports the ICMP "port unreachable" this way.
        return ConnectionBroken(f"connection refused by {what} (nothing listening there?)")
    if isinstance(exc, ConnectionResetError):
        return ConnectionBroken(f"connection reset by {what}")
    if isinstance(exc, BrokenPipeError):
        return ConnectionBroken(f"connection closed by {what} while sending")
    return ConnectionBroken(f"error {doing} {what}: {os_reason(exc)}")


def _recv(sock: socket.socket, size: int, what: str, timeout: float | None, doing: str) -> bytes:
    # Only the socket call sits in the try: an OSError from writing the output (a closed stdout)
    # must surface as itself, not be blamed on the peer.
    try:
        return sock.recv(size)
    except OSError as exc:
        raise _io_error(exc, what, timeout, doing) from exc


def _write(out: BinaryIO, data: bytes) -> None:
    # Flush per chunk: this is an interactive tool and the peer's answer should show up at once.
    out.write(data)
    out.flush()


def send_messages(
    sock: socket.socket,
    proto: Proto,
    messages: Sequence[bytes],
    out: BinaryIO,
    *,
    timeout: float | None,
    what: str = "peer",
) -> None:
    """Send each message plus ``\\n`` and write the replies to ``out`` (see the module docstring).

    Stream sockets: raises :class:`FerryTimeout` if the peer does not close its side within
    ``timeout`` of its last data (what arrived before is already written). Datagram sockets: every
    message is sent even if some replies are missing; then :class:`FerryTimeout` says how many.
    """
    sock.settimeout(timeout)
    if proto == "udp":
        missing = 0
        for message in messages:
            payload = message + b"\n"
            if len(payload) > MAX_DATAGRAM:
                raise UsageError(f"message of {len(payload)} bytes does not fit in one UDP datagram")
            try:
                sock.send(payload)
                reply = sock.recv(MAX_DATAGRAM + 1)
            except TimeoutError:
                missing += 1
                continue
            except OSError as exc:
                raise _io_error(exc, what, timeout, "talking to") from exc
            _write(out, reply)  # outside the try: a closed stdout is not the peer's fault
        if missing:
            # Only reachable with a timeout: without one, recv() waits for every reply.
            raise FerryTimeout(f"no reply from {what} within {timeout} s to {missing} of {len(messages)} datagrams")
        return
    try:
        for message in messages:
            sock.sendall(message + b"\n")
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        raise _io_error(exc, what, timeout, "sending to") from exc
    while data := _recv(sock, CHUNK, what, timeout, "waiting for"):
        _write(out, data)


def _reader(inp: BinaryIO) -> Callable[[int], bytes]:
    # read1 returns what is available (one line from a terminal, one chunk from a pipe) instead of
    # blocking until `n` bytes arrived, which keeps interactive use responsive. BinaryIO does not
    # declare read1, hence getattr; plain read() is the fallback for raw streams.
    read: Callable[[int], bytes] = getattr(inp, "read1", inp.read)
    return read


def pipe_stream(sock: socket.socket, inp: BinaryIO, out: BinaryIO, *, what: str = "peer") -> None:
    """Copy ``inp`` -> socket and socket -> ``out`` concurrently until both reach EOF.

    On EOF of ``inp`` the socket's write side is half-closed so the peer sees EOF too, and reading
    continues until the peer closes. If the peer closes first, ``inp`` is still forwarded (the peer
    may have only half-closed); if the peer turns out to be gone completely, the session ends
    quietly at the next failed write, since nothing more can be delivered.
    """
    sock.settimeout(None)  # the connect timeout must not cut off a quiet interactive session
    failure: list[OSError] = []
    read = _reader(inp)

    def pump_input() -> None:
        try:
            while data := read(CHUNK):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            failure.append(exc)

    # Daemon: if the peer's side fails, a thread stuck reading a terminal must not keep us alive.
    pump = threading.Thread(target=pump_input, name="ferry-send-stdin", daemon=True)
    pump.start()
    while data := _recv(sock, CHUNK, what, None, "receiving from"):
        _write(out, data)
    pump.join()
    if failure:
        exc = failure[0]
        if isinstance(exc, BrokenPipeError | ConnectionResetError):
            return  # the peer closed both directions after its EOF: it has finished with us
        raise _io_error(exc, what, None, "sending to") from exc


def pipe_datagrams(sock: socket.socket, inp: BinaryIO, out: BinaryIO, *, timeout: float, what: str = "peer") -> None:
    """Send each chunk read from ``inp`` as one datagram and write every datagram received to ``out``.

    UDP has no EOF, so after ``inp`` ends replies are collected for ``timeout`` more seconds.
    """
    done_at: list[float] = []  # set (to the monotonic time) by the pump thread at input EOF
    failure: list[OSError] = []
    read = _reader(inp)

    def pump_input() -> None:
        try:
            while data := read(MAX_DATAGRAM):
                sock.send(data)
        except OSError as exc:
            failure.append(exc)
        finally:
            done_at.append(time.monotonic())

    pump = threading.Thread(target=pump_input, name="ferry-send-stdin", daemon=True)
    pump.start()
    while True:
        if failure:
            raise _io_error(failure[0], what, timeout, "sending to") from failure[0]
        if done_at:
            remaining = done_at[0] + timeout - time.monotonic()
            if remaining <= 0:
                return
            sock.settimeout(remaining)
        else:
            # Wake up now and then to notice input EOF; a datagram still wakes us at once.
            sock.settimeout(min(timeout, 0.25))
        try:
            data = sock.recv(MAX_DATAGRAM + 1)
        except TimeoutError:
            continue
        except OSError as exc:
            raise _io_error(exc, what, timeout, "receiving from") from exc
        _write(out, data)


def send(
    target: str,
    messages: Sequence[bytes],
    *,
    proto: Proto = "tcp",
    timeout: float = 10.0,
    inp: BinaryIO | None = None,
    out: BinaryIO,
) -> None:
    """Connect to ``target`` and either send ``messages`` or, if there are none, pipe ``inp``.

    This is what ``ferry net send`` runs; see the module docstring for the semantics.
    """
    if timeout <= 0:
        raise UsageError(f"timeout must be positive, not {timeout:g}")
    sock, what = open_socket(target, proto, timeout)
    with sock:
        if messages:
            send_messages(sock, proto, messages, out, timeout=timeout, what=what)
        elif inp is None:
            raise UsageError("nothing to send: give messages or an input stream")
        elif proto == "udp":
            pipe_datagrams(sock, inp, out, timeout=timeout, what=what)
        else:
            pipe_stream(sock, inp, out, what=what)
