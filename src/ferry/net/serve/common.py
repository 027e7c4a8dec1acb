"""Small pieces every concurrency model shares: sizes, socket tuning, accepting, logging."""

from __future__ import annotations

import errno
import logging
import socket
from typing import Final

log: Final = logging.getLogger("ferry.net.serve")

#: Bytes read per ``recv``; also the most one client can make the server hold per read.
CHUNK: Final = 64 * 1024
#: Stop reading from a client whose pending output exceeds this (backpressure for ``echo``).
HIGH_WATER: Final = 256 * 1024
#: After we close our side, how long we keep draining the client's input before ``close``.
#: Closing with unread input makes the kernel send RST, which can destroy our final reply
#: (e.g. ``Hello world``) before the client reads it; a short linger avoids that.
LINGER: Final = 1.0
#: Largest UDP payload (65535 minus the IP and UDP headers); bigger buffers are never needed.
MAX_DATAGRAM: Final = 65507

#: accept() failures that concern one would-be client, not the server: just try the next one.
_TRANSIENT_ACCEPT: Final = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})


def tune(conn: socket.socket) -> None:
    """Per-connection options: TCP_NODELAY, because these line protocols are latency-bound."""
    conn.setblocking(False)
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the peer may already have reset the connection
            pass


def try_accept(lsock: socket.socket) -> socket.socket | OSError | None:
    """Accept one connection from a non-blocking listener.

    Returns the tuned connection, None if there is nothing (left) to accept or the would-be
    client already vanished, or the OSError when the *server* is in trouble (EMFILE, ENOBUFS...)
    so the caller can back off instead of spinning on a listener that stays readable.
    """
    try:
        conn, _addr = lsock.accept()
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in _TRANSIENT_ACCEPT:
            return None
        log.warning("accept failed: %s", exc.strerror or exc)
        return exc
    tune(conn)
    return conn
