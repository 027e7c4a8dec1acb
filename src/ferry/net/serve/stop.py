"""A latched, broadcast "please stop" that any poller can wait on: a self-pipe.

A ``threading.Event`` cannot be waited on together with sockets, and a signal handler must not
take locks. A pipe solves both: :meth:`StopSignal.set` is one ``write`` (safe from a signal handler
and from any thread), and the read end stays readable forever after, so every thread's ``poll``,
the ``selectors`` loop and the asyncio loop all see it at once without anyone draining it.
"""

from __future__ import annotations

import contextlib
import os


class StopSignal:
    """One self-pipe; readable (and :attr:`is_set`) once :meth:`set` was called."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._set = False

    def fileno(self) -> int:
        """The read end, to register with poll/selectors/asyncio."""
        return self._r

    @property
    def is_set(self) -> bool:
        """True once :meth:`set` was called (in this process)."""
        return self._set

    def set(self) -> None:
        """Request a stop. Idempotent, lock-free, callable from signal handlers and any thread."""
        if self._set:
            return
        self._set = True
        # BlockingIOError cannot really happen (one byte, never drained) but must not raise here;
        # OSError covers a pipe already closed during shutdown.
        with contextlib.suppress(OSError):
            os.write(self._w, b"!")

    def close(self) -> None:
        """Release both pipe ends (in a forked child: the inherited copies of the parent's)."""
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._r = self._w = -1
