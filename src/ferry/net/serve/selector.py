"""The ``select`` model: one thread, ``selectors``, non-blocking sockets, per-client buffers.

This is also what each ``prefork`` worker runs. Every client is a small state machine:

* open: read when pending output is below :data:`HIGH_WATER` (that pause is the backpressure
  that keeps a 16 MiB ``echo`` at bounded memory), write while output is pending;
* closing: the handler asked to close; only flush the remaining output;
* lingering: our side is shut down; read and discard until EOF or a short deadline, so the final
  reply is not destroyed by an RST (see :data:`~ferry.net.serve.common.LINGER`).

Idle timeouts are per-client deadlines; instead of a timer per client, the loop remembers the
earliest deadline and sweeps all clients only when it has passed.
"""

from __future__ import annotations

import math
import selectors
import socket
import time
from typing import Final

from ferry.net.serve.common import CHUNK, HIGH_WATER, LINGER, log, try_accept
from ferry.net.serve.config import ServeConfig
from ferry.net.serve.handlers import Step, StreamHandler, stream_handler
from ferry.net.serve.stop import StopSignal

_R: Final = selectors.EVENT_READ
_W: Final = selectors.EVENT_WRITE
#: Connections accepted per wake-up before serving existing clients again (fairness).
_ACCEPT_BATCH: Final = 64
_ACCEPT_BACKOFF: Final = 0.1
#: Markers in SelectorKey.data for the two non-client registrations.
_LISTENER: Final = "listener"
_STOP: Final = "stop"


class _Client:
    """Per-connection state of the select loop."""

    __slots__ = (
        "closing",
        "dead",
        "deadline",
        "events",
        "fd",
        "got_eof",
        "handler",
        "lingering",
        "out",
        "sock",
    )

    def __init__(self, sock: socket.socket, handler: StreamHandler, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # kept: fileno() turns into -1 once the socket is closed
        self.dead = False
        self.handler = handler
        self.out = bytearray()
        self.closing = False
        self.lingering = False
        self.got_eof = False
        self.deadline = deadline
        self.events = _R


class SelectServer:
    """The event loop over one listener; :meth:`run` returns when ``stop`` is set."""

    def __init__(self, lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
        self._lsock = lsock
        self._kind = config.kind
        self._idle = config.idle_timeout
        self._linger = min(LINGER, config.idle_timeout)
        self._stop = stop
        self._sel = selectors.DefaultSelector()
        self._clients: dict[int, _Client] = {}
        self._next_sweep = math.inf
        self._accept_paused_until = 0.0

    def run(self) -> None:
        """Serve until stopped, then close every client."""
        self._lsock.setblocking(False)
        self._sel.register(self._lsock, _R, _LISTENER)
        self._sel.register(self._stop.fileno(), _R, _STOP)
        try:
            while not self._stop.is_set:
                timeout = None
                if self._next_sweep < math.inf:
                    timeout = max(0.0, self._next_sweep - time.monotonic())
                for key, mask in self._sel.select(timeout):
                    data = key.data
                    if data is _STOP:
                        return
                    if data is _LISTENER:
                        self._accept()
                    elif isinstance(data, _Client):
                        self._on_event(data, mask)
                if time.monotonic() >= self._next_sweep:
                    self._sweep()
        finally:
            for client in list(self._clients.values()):
                self._drop(client)
            self._sel.close()

    # -- bookkeeping -------------------------------------------------------------------------

    def _set_deadline(self, client: _Client, deadline: float) -> None:
        client.deadline = deadline
        if deadline < self._next_sweep:
            self._next_sweep = deadline

    def _sweep(self) -> None:
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self._lsock, _R, _LISTENER)
        nxt = self._accept_paused_until or math.inf
        for client in list(self._clients.values()):
            if client.deadline <= now:
                log.debug("closing idle client")
                self._drop(client)
            elif client.deadline < nxt:
                nxt = client.deadline
        self._next_sweep = nxt

    def _drop(self, client: _Client) -> None:
        if client.dead:
            return
        client.dead = True
        self._clients.pop(client.fd, None)
        self._sel.unregister(client.sock)
        client.sock.close()

    def _update(self, client: _Client) -> None:
        want = 0
        if client.lingering or (not client.closing and len(client.out) < HIGH_WATER):
            want |= _R
        if client.out:
            want |= _W
        if want != client.events:
            self._sel.modify(client.sock, want, client)
            client.events = want

    # -- events ------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            got = try_accept(self._lsock)
            if got is None:
                return
            if isinstance(got, OSError):
                # Out of descriptors: stop watching the (still readable) listener for a while
                # rather than spin; the sweep re-enables it.
                self._sel.unregister(self._lsock)
                self._accept_paused_until = time.monotonic() + _ACCEPT_BACKOFF
                self._next_sweep = min(self._next_sweep, self._accept_paused_until)
                return
            client = _Client(got, stream_handler(self._kind), 0.0)
            self._clients[client.fd] = client
            self._sel.register(got, _R, client)
            self._set_deadline(client, time.monotonic() + self._idle)
            self._apply(client, self._call(client, None))

    def _call(self, client: _Client, data: bytes | None) -> Step | None:
        """Run the handler; a handler bug drops this client only (returns None)."""
        try:
            if data is None:
                return client.handler.start()
            if data:
                return client.handler.feed(data)
            return Step(client.handler.eof().out, close=True)
        except Exception:
            log.exception("bug while serving a %s client; dropping it", self._kind)
            return None

    def _on_event(self, client: _Client, mask: int) -> None:
        if client.dead:  # dropped earlier in this same batch of events
            return
        if mask & _W:
            self._flush(client)
            if client.dead:
                return  # dropped while flushing
        if mask & _R:
            self._read(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:  # reset by peer etc.: only this client is affected
            log.debug("client dropped: %s", exc)
            self._drop(client)
            return
        if client.lingering:
            if not data:
                self._drop(client)
            return  # discard: we already said everything we will say
        if client.closing:
            return
        client.deadline = time.monotonic() + self._idle
        if not data:
            client.got_eof = True
        self._apply(client, self._call(client, data))

    def _apply(self, client: _Client, step: Step | None) -> None:
        if step is None:
            self._drop(client)
            return
        if step.out:
            client.out += step.out
        if step.close:
            client.closing = True
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        """Send what the socket takes now; then either linger-close or update interest."""
        out = client.out
        while out:
            try:
                sent = client.sock.send(out)
            except BlockingIOError:
                break
            except OSError as exc:  # EPIPE / ECONNRESET: the client vanished
                log.debug("client dropped: %s", exc)
                self._drop(client)
                return
            del out[:sent]  # bytearray front deletion is O(1) amortised in CPython
            client.deadline = time.monotonic() + self._idle
        if not out and client.closing and not client.lingering:
            self._start_linger(client)
            return
        self._update(client)

    def _start_linger(self, client: _Client) -> None:
        try:
            client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(client)
            return
        if client.got_eof:
            self._drop(client)
            return
        client.lingering = True
        self._set_deadline(client, time.monotonic() + self._linger)
        self._update(client)


def serve_select(lsock: socket.socket, config: ServeConfig, stop: StopSignal) -> None:
    """``select``: serve every client from one thread until ``stop`` is set."""
    SelectServer(lsock, config, stop).run()
