"""The listening sockets, the accept loop, and the descriptor budget that keeps accepting possible.

The server accepts connections itself (not through ``loop.create_server``) so that it sees each
one *before* its TLS handshake: the admission decision (per-address and pre-login caps, session
limits, descriptors) is taken on the raw socket, and the login deadline covers the handshake too.

Descriptors: every connection, open file and folder costs one, and the process has a limit
(``RLIMIT_NOFILE``; often a soft 1,024). :func:`raise_descriptor_limit` raises the soft limit to
the hard one at start. :class:`DescriptorBudget` then keeps a *reserve*: once fewer than
``reserve`` descriptors are free, new connections are refused with a clear ``busy`` instead of
being admitted to fail later. For the case where the descriptors run out anyway (file work of
logged-in users in between), it holds a few *spare* descriptors: when ``accept()`` fails for lack
of descriptors, one spare is closed so the pending connection can still be accepted and told
``busy``, and re-opened afterwards. Without that, the connection would sit in the kernel's backlog
and the listening socket would wake the loop again and again (a busy loop) until something closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import time
from collections.abc import Callable
from typing import Final

__all__ = ["DescriptorBudget", "Listener", "bind_sockets", "raise_descriptor_limit"]

#: accept() errors meaning "no descriptor (or kernel memory) for the new connection right now".
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: accept() errors that concern only the one connection (it was reset before we took it).
_CONNECTION_GONE: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
#: Connections taken per wake-up of a listening socket, so a flood cannot monopolise the loop.
_ACCEPTS_PER_WAKEUP: Final = 64
#: Pause of the accept loop when accept() fails and no spare descriptor is left.
_ACCEPT_PAUSE: Final = 0.1
#: Seconds an estimate of the open descriptors may age before it is counted again.
_RECOUNT_AFTER: Final = 1.0
#: Shortest interval between two counts when near the limit (a count lists /proc/self/fd).
_MIN_RECOUNT: Final = 0.01


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; returns ``(before, after)``.

    Services often start with a soft limit of 1,024 and a much higher hard limit: a server that
    holds one descriptor per connection (and more per transfer) should use what it is allowed.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # not on Linux (nr_open bounds it), but be safe elsewhere
        target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
    if soft == resource.RLIM_INFINITY or target <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the descriptor listdir itself used
    except OSError:
        return 0


class DescriptorBudget:
    """Tells whether a new connection may be admitted without eating into the reserve, and holds
    the spare descriptors (see the module docstring)."""

    def __init__(self, *, reserve: int, spares: int) -> None:
        self._wanted_reserve = reserve
        self._wanted_spares = max(0, spares)
        self.limit = self.reserve = 0
        self._read_limit()
        self._spares: list[int] = []
        for _ in range(self._wanted_spares):
            self._open_spare()
        # Only what could be opened counts as wanted: a host without os.devnull must not look
        # short of descriptors for ever (tight() treats a missing spare as exhaustion).
        self._wanted_spares = len(self._spares)
        self._count = _open_descriptors()
        self._counted_at = time.monotonic()
        self._since = 0  # connections accepted since the count (closes are not seen: an upper bound)

    def _read_limit(self) -> None:
        """(Re)read the soft limit: an operator may change it while we run (``prlimit``)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.limit = soft if soft != resource.RLIM_INFINITY else 1 << 30
        # A tiny limit (tests, odd hosts) must still leave room for sessions: at most a quarter.
        self.reserve = max(1, min(self._wanted_reserve, self.limit // 4))

    def _open_spare(self) -> bool:
        try:
            self._spares.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            return False
        return True

    @property
    def spares(self) -> int:
        """Spare descriptors held right now."""
        return len(self._spares)

    def tight(self, newest: int) -> bool:
        """True if fewer than ``reserve`` descriptors are free, given that ``newest`` was just
        returned by accept().

        Linux hands out the lowest free number, so a ``newest`` past ``limit - reserve`` proves it;
        so does a spare descriptor that could not be re-opened yet (accept() recently found none
        free). Otherwise an estimate (last count plus connections accepted since) decides, counted
        afresh every second, whenever the estimate comes near the limit, and after :meth:`exhausted`.
        """
        if newest >= self.limit - self.reserve or len(self._spares) < self._wanted_spares:
            return True
        self._since += 1
        now = time.monotonic()
        estimate = self._count + self._since
        if now - self._counted_at > _RECOUNT_AFTER or (
            estimate >= self.limit - self.reserve and now - self._counted_at > _MIN_RECOUNT
        ):
            self._read_limit()
            self._count, self._counted_at, self._since = _open_descriptors(), now, 0
            estimate = self._count
        return estimate >= self.limit - self.reserve

    def exhausted(self) -> None:
        """accept() found no free descriptor: count again (and re-read the limit) at the next check."""
        self._counted_at = float("-inf")

    def take_spare(self) -> bool:
        """Close one spare descriptor so that accept() can succeed; False if none is left."""
        if not self._spares:
            return False
        os.close(self._spares.pop())
        return True

    def return_spare(self) -> None:
        """Re-open a spare taken by :meth:`take_spare` (retried later if there is no room yet)."""
        if not self._open_spare():
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(_ACCEPT_PAUSE, self.return_spare)

    def close(self) -> None:
        """Close the spare descriptors."""
        while self._spares:
            os.close(self._spares.pop())


def bind_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening, non-blocking TCP sockets for ``host``:``port`` (one per address ``host`` names,
    like ``loop.create_server``); raises :class:`OSError` when none can be bound."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Like asyncio: an IPv6 socket does not also take the IPv4 port ("::" and "0.0.0.0"
                # can both be listened on).
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for s in sockets:
            s.close()
        raise
    if not sockets:
        raise OSError(errno.EADDRNOTAVAIL, f"no address to listen on for {host!r}")
    return sockets


#: What the listener hands each accepted connection to: (socket, peer address, spare_used).
OnAccept = Callable[[socket.socket, object, bool], None]


class Listener:
    """Accepts connections on ``sockets`` and passes each to ``on_accept`` at once.

    ``on_accept(sock, peer, spare)`` must take ownership of ``sock`` synchronously (start a task or
    close it). ``spare`` is True when a spare descriptor of ``budget`` was released to accept this
    connection: the receiver must refuse it and call ``budget.return_spare()`` when done.
    """

    def __init__(self, sockets: list[socket.socket], budget: DescriptorBudget, on_accept: OnAccept) -> None:
        self.sockets = sockets
        self.budget = budget
        self._on_accept = on_accept
        self._loop = asyncio.get_running_loop()
        self._paused: set[int] = set()
        self._closed = False

    def start(self) -> None:
        """Start accepting."""
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept_some, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (established connections are not touched)."""
        if self._closed:
            return
        self._closed = True
        for sock in self.sockets:
            if sock.fileno() not in self._paused:
                self._loop.remove_reader(sock.fileno())
            sock.close()

    def _pause(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` for a moment (its pending connection cannot be taken yet)."""
        self._loop.remove_reader(sock.fileno())
        self._paused.add(sock.fileno())
        self._loop.call_later(_ACCEPT_PAUSE, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._paused.discard(sock.fileno())
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept_some, sock)

    def _accept_some(self, sock: socket.socket) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            spare = False
            try:
                conn, peer = sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _CONNECTION_GONE:
                    continue
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self.budget.exhausted()
                if exc.errno not in _OUT_OF_DESCRIPTORS or not self.budget.take_spare():
                    self._pause(sock)
                    return
                try:
                    conn, peer = sock.accept()
                except OSError:
                    self.budget.return_spare()
                    self._pause(sock)
                    return
                spare = True
            conn.setblocking(False)
            self._on_accept(conn, peer, spare)
