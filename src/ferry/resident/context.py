"""The hook between the command line's code and a resident process.

The client commands run their work as one coroutine (``ferry.cli.files.run``) on a client from
``ferry.cli.files.connected``. In a resident process the same code runs, but the coroutine must
run on the resident's event loop (where its connection lives) and ``connected`` must hand out
that connection instead of opening one. :func:`current` is the :class:`Session` of the command
being run there (None in a normal ``ferry`` process); the resident process sets it around each
command (one at a time, see :mod:`ferry.resident.daemon`).
"""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient
    from ferry.client.location import Location

T = TypeVar("T")


class Fallback(BaseException):
    """The resident process cannot run this command (another destination, other credentials, a
    changed pin, a dropped connection); nothing has been done yet, so the thin client runs it
    itself. A BaseException, so that no ``except Exception`` of a command takes it for a failure."""


class Session:
    """One command running in a resident process (the daemon's subclass does the work)."""

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the resident's loop and wait for it; Ctrl-C of the caller cancels it
        (KeyboardInterrupt here, as in a normal run)."""
        raise NotImplementedError

    async def client_for(
        self,
        loc: Location,
        *,
        plain: bool,
        identities: Sequence[str],
        token_file: str | None,
        password_file: str | None,
        verbose: bool,
    ) -> AsyncClient:
        """The resident's client if it is the connection this command would open; raises
        :class:`Fallback` otherwise."""
        raise NotImplementedError


_current: Session | None = None

#: True when this process is the ``ferry`` program (not the library or a test calling
#: ``ferry.cli.main(argv)``): only then may a command leave a resident process behind.
program = False


def current() -> Session | None:
    """The session of the command this resident process is running, or None."""
    return _current


def set_current(session: Session | None) -> None:
    """Enter (or leave, with None) a command's session (the resident process only)."""
    global _current
    _current = session
