"""Where the accounts are stored: the thin connection layer under :mod:`ferry.server.accounts`.

The account logic (validation, hashing, verification, keys, tokens, revision counters) is written
once, in :mod:`ferry.server.accounts` and :mod:`ferry.server.credentials`, as plain SQL statements
with ``?`` placeholders over a DB-API-like connection (:class:`Conn`). An engine (:class:`AccountsDB`)
supplies that connection, the transactions, the schema and its migrations, and a change counter:

* :mod:`ferry.server.accountdb_sqlite` — SQLite in ``users.db`` under the server root (the default:
  zero configuration, one server);
* :mod:`ferry.server.accountdb_pg` — PostgreSQL (``ferry serve --db postgresql://...``): the
  accounts shared by every server behind one address, managed with ``ferry user ... --db URL``.

The statements are written in the common subset of both dialects: ``?`` placeholders (an engine
translates them), integers for flags, and the column ``user`` always quoted (``"user"``): unquoted,
PostgreSQL reads it as ``CURRENT_USER``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["AccountsDB", "Conn", "Cursor", "NoAccounts"]


class NoAccounts(Exception):
    """The database holds no ferry accounts yet and the caller asked not to create them."""


class Cursor(Protocol):
    """The result of one statement (a DB-API cursor: sqlite3's and psycopg's both fit)."""

    @property
    def rowcount(self) -> int:
        """Rows changed by an INSERT, UPDATE or DELETE."""

    def fetchone(self) -> Any:
        """The next row as a tuple, or None."""

    def fetchall(self) -> list[Any]:
        """The remaining rows as tuples."""


class Conn(Protocol):
    """A connection inside :meth:`AccountsDB.reading` or :meth:`AccountsDB.writing`."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor:
        """Run one statement (``?`` placeholders)."""


class AccountsDB(Protocol):
    """An accounts database engine (see the module docstring)."""

    #: What the database is, for messages: the file path, or the URL without its password.
    where: str

    @property
    def integrity_error(self) -> type[Exception]:
        """The exception a statement raises on a duplicate key (a user name taken, a token id reused)."""

    def reading(self) -> contextlib.AbstractContextManager[Conn]:
        """A connection for reads (each statement sees the latest committed data)."""

    def writing(self) -> contextlib.AbstractContextManager[Conn]:
        """A write transaction, one writer at a time across every process and server using the
        database; committed at the end of the block, rolled back if the block raises."""

    def changes(self) -> int:
        """A number that moves whenever another connection committed a change to the accounts;
        cheap enough to poll every second (ferry.server.revocation)."""

    def close(self) -> None:
        """Close the connections; using the engine afterwards raises FerryError."""
