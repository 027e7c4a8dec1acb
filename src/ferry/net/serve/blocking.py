"""The blocking models: ``iterative`` and ``thread`` (and the per-connection code ``fork`` runs).

Each connection is driven by :func:`serve_connection`, a plain loop of wait/recv/handle/send.
"Blocking" describes the style, not the syscalls: the socket is non-blocking and every wait is
a ``poll`` on the socket *and* the stop pipe, so a shutdown interrupts a client stuck mid-send
and the idle timeout covers both a silent client and one that stopped reading our replies.
"""

from __future__ import annotations

import math
import select
import socket
import threading
import time
from typing import Final

from ferry.net.serve.common import CHUNK, LINGER, MAX_DATAGRAM, log, try_accept
from ferry.net.serve.config import ServeConfig
from ferry.net.serve.handlers import Step, datagram_reply, stream_handler
from ferry.net.serve.stop import StopSignal

_IN: Final = select.POLLIN
_OUT: Final = select.POLLOUT
#: How much a lingering close reads and throws away at most before giving up on a polite close.
_MAX_DISCARD: Final = 1 << 20
#: How long shutdown waits for connection threads to notice the stop before giving up on them.
_JOIN_GRACE: Final = 5.0
#: Back-off after accept() failed for server-side reasons (out of file descriptors, ...).
_ACCEPT_BACKOFF: Final = 0.1


class Waiter:
    """``poll`` on one socket plus the stop pipe, reusing one poll object for the connection."""

    def __init__(self, fd: int, stop: StopSignal) -> None:
        self._fd = fd
        self._stop_fd = stop.fileno()
        self._events = _IN
        self._poll = select.poll()
        self._poll.register(self._stop_fd, _IN)
        self._poll.register(fd, _IN)

    def wait(self, events: int, timeout: float | None) -> bool:
        """True when the socket is ready (or in error); False on timeout or stop request."""
        if events != self._events:
            self._poll.modify(self._fd, events)
            self._events = events
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
        ready = self._poll.poll(ms)
        if not ready:
            return False
        # Stop wins over data: a shutdown must not wait for a chatty client to pause.
        return all(fd != self._stop_fd for fd, _ev in ready)


def _send_all(conn: socket.socket, data: bytes, waiter: Waiter, idle: float) -> bool:
    """Send everything; False if the client vanished, stopped reading for ``idle`` s, or stop."""
    view = memoryview(data)
    while view:
        try:
            sent = conn.send(view)
        except BlockingIOError:
            if not waiter.wait(_OUT, idle):
                return False
            continue
        view = view[sent:]
    return True


def _linger_close(conn: socket.socket, waiter: Waiter, got_eof: bool, idle: float) -> None:
    """Half-close, then drain the client's input briefly so our last bytes are not lost to RST."""
    conn.shutdown(socket.SHUT_WR)
    if got_eof:
        return
    deadline = time.monotonic() + min(LINGER, idle)
    discarded = 0
    while discarded < _MAX_DISCARD:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not waiter.wait(_IN, remaining):
            return
        try:
            data = conn.recv(CHUNK)
        except BlockingIOError:
            continue
        if not data:
            return
        discarded += len(data)


def serve_connection(conn: socket.socket, kind: str, idle: float, stop: StopSignal) -> None:
    """Serve one stream connection to completion and close it; never raises.

    Any failure (reset, broken pipe, even a handler bug) ends only this connection: the models
    call this in a loop, a thread or a child process and must keep serving the others.
    """
    conn.setblocking(False)
    try:
        waiter = Waiter(conn.fileno(), stop)
        handler = stream_handler(kind)
        got_eof = False
        step: Step = handler.start()
        while True:
            if step.out and not _send_all(conn, step.out, waiter, idle):
                return
            if step.close:
                _linger_close(conn, waiter, got_eof, idle)
                return
            if not waiter.wait(_IN, idle):
                return  # idle timeout or shutdown
            try:
                data = conn.recv(CHUNK)
            except BlockingIOError:  # spurious wake-up
                step = Step()
                continue
            if data:
                step = handler.feed(data)
            else:
                got_eof = True
                step = Step(handler.eof().out, close=True)
    except OSError as exc:  # ECONNRESET, EPIPE, ETIMEDOUT...: the client's problem, not ours
        log.debug("client dropped: %s", exc)
    except Exception:
        log.exception("bug while serving a %s client; dropping it", kind)
    finally:
        conn.close()


class AcceptLoop:
    """Wait for connections or the stop request on a non-blocking listener; yields connections."""

    def __init__(self, lsock: socket.socket, stop: StopSignal, tick: float | None = None) -> None:
        lsock.setblocking(False)
        self._lsock = lsock
        self._stop = stop
        self._tick = tick
        self._waiter = Waiter(lsock.fileno(), stop)

    def next(self) -> socket.socket | None:
        """The next connection; None on a ``tick`` timeout or when stopping (check ``stop``)."""
        while not self._stop.is_set:
            if not self._waiter.wait(_IN, self._tick):
                return None
            got = try_accept(self._lsock)
            if isinstance(got, socket.socket):
                return got
            if isinstance(got, OSError):
                # Out of descriptors or similar: the listener stays readable, so spinning would
                # burn a core; wait a little (still waking at once on stop).
                self._waiter.wait(0, _ACCEPT_BACKOFF)
            if self._tick is not None:
                return None
        return None


def serve_iterative(lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    """``iterative``: one client at a time; the next waits in the listen backlog until it leaves."""
    accept = AcceptLoop(lsock, stop)
    while not stop.is_set:
        conn = accept.next()
        if conn is not None:
            serve_connection(conn, config.kind, config.idle_timeout, stop)


def serve_threaded(lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    """``thread``: one thread per connection; on stop, every thread sees the stop pipe and exits."""
    accept = AcceptLoop(lsock, stop)
    threads: set[threading.Thread] = set()
    lock = threading.Lock()

    def run(conn: socket.socket) -> None:
        try:
            serve_connection(conn, config.kind, config.idle_timeout, stop)
        finally:
            with lock:
                threads.discard(threading.current_thread())

    while not stop.is_set:
        conn = accept.next()
        if conn is None:
            continue
        # daemon: a thread wedged in a handler bug must not keep the process alive forever.
        thread = threading.Thread(target=run, args=(conn,), name="ferry-net-conn", daemon=True)
        with lock:
            threads.add(thread)
        try:
            thread.start()
        except RuntimeError:  # can't start new thread: resource limit; drop this client only
            with lock:
                threads.discard(thread)
            log.warning("cannot start a thread; dropping a client")
            conn.close()
    deadline = time.monotonic() + _JOIN_GRACE
    with lock:
        pending = list(threads)
    for thread in pending:
        thread.join(max(0.0, deadline - time.monotonic()))


def serve_datagrams(sock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    """UDP for ``iterative``, ``select`` and each ``prefork`` worker: recvfrom, reply, repeat.

    Datagrams have no connection state, so a single loop already is the select-style model; a
    reply that cannot be sent at once (full socket buffer) is dropped, as UDP allows.
    """
    sock.setblocking(False)
    waiter = Waiter(sock.fileno(), stop)
    while waiter.wait(_IN, None):
        for _ in range(64):  # bounded batch, then re-check stop
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. ICMP port-unreachable reported on some systems
                log.debug("recvfrom: %s", exc)
                continue
            try:
                reply = datagram_reply(config.kind, data)
            except Exception:
                log.exception("bug while answering a %s datagram", config.kind)
                continue
            try:
                sock.sendto(reply, addr)
            except OSError as exc:
                log.debug("sendto %s: %s", addr, exc)
