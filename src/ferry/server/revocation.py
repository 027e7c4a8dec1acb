"""Ending sessions whose login is no longer valid, within about a second of the change.

``ferry user ...`` runs in another process (with shared accounts, maybe on another machine) and
changes the accounts database directly, so the server has to notice. Once per
:attr:`Revocation.interval` it asks the database whether another connection committed a change
(SQLite: ``PRAGMA data_version``, a read of a counter in shared memory, no query; PostgreSQL: one
row read, ``account_changes``, bumped by every write transaction of any server or ``ferry user``);
only then does it read the revisions (``users.rev``) of the users that have sessions, and for a
user whose revision moved it re-reads that account, its key fingerprints and token ids once and
judges each of the user's sessions:

* account deleted or disabled: every session of it ends;
* password changed (``pw_gen``): the sessions that logged in with the password end;
* key removed / token revoked: the sessions that logged in with that key / token end;
* the right to run programs removed or narrowed: sessions that may run programs end (their
  commands are killed with them);
* anything else (quota, a new key): the sessions go on with the account as it is now.

Token expiry needs no database: a session that logged in with a token ends when it expires.
The cost when nothing changed is one ``PRAGMA`` (or one PostgreSQL round trip) per interval
(measured in docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from ferry.server.accounts import Accounts, User
from ferry.server.credentials import Credentials

if TYPE_CHECKING:
    from ferry.server.auth import Login

__all__ = ["LiveSession", "Revocation", "judge"]


class LiveSession(Protocol):
    """What the watcher needs of a logged-in session."""

    login: Login | None
    user: User | None
    checked_rev: int

    def may_run_programs(self) -> bool:
        """Whether this session can start commands (it has an exec handler)."""

    def end(self, reason: str) -> None:
        """End the session at once, telling the client ``reason``."""


def _narrowed(old: User, new: User) -> bool:
    """Whether ``new`` may run less than ``old`` could."""
    if not new.exec_allowed:
        return old.exec_allowed
    if new.exec_allow is None:
        return False
    return old.exec_allow is None or not set(new.exec_allow) >= set(old.exec_allow)


def judge(
    session: LiveSession, user: User | None, keys: set[str], tokens: dict[str, int | None]
) -> str | None:
    """Why ``session`` must end given the account as it is now, or None if it may go on."""
    login = session.login
    assert login is not None
    if user is None:
        return "your account was deleted"
    if user.disabled:
        return "your account was disabled"
    if login.method == "password" and user.pw_gen != login.user.pw_gen:
        return "your password was changed"
    if login.method == "key" and login.credential not in keys:
        return f"the key {login.credential} was removed from your account"
    if login.method == "token" and login.credential not in tokens:
        return f"the token {login.credential} was revoked"
    old = session.user or login.user
    if session.may_run_programs() and _narrowed(old, user):
        return "your right to run programs was changed"
    return None


class Revocation:
    """The logged-in sessions by user, and the task that checks them against the database."""

    def __init__(self, accounts: Accounts, *, interval: float = 1.0) -> None:
        self.accounts = accounts
        self.credentials = Credentials(accounts)
        self.interval = interval
        self._by_user: dict[str, set[LiveSession]] = {}
        self._version: int | None = None
        self._revs: dict[str, int] = {}
        #: passes that found a database change (for tests and measurements)
        self.passes = 0

    def add(self, session: LiveSession) -> None:
        """Watch a session that has just logged in."""
        assert session.login is not None
        session.checked_rev = session.login.user.rev
        self._by_user.setdefault(session.login.user.name, set()).add(session)

    def discard(self, session: LiveSession) -> None:
        """Stop watching a session (it ended)."""
        if session.login is None:
            return
        sessions = self._by_user.get(session.login.user.name)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_user[session.login.user.name]

    def sessions(self) -> Iterable[LiveSession]:
        """Every watched session."""
        for group in self._by_user.values():
            yield from group

    async def run(self) -> None:
        """Check every :attr:`interval` seconds until cancelled; a failing check is retried later."""
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(Exception):  # e.g. the database is locked for long: next time
                await self.check()

    def _poll(self, names: list[str]) -> dict[str, int] | None:
        """In a thread: the revisions of ``names`` if the database changed since the last poll."""
        version = self.accounts.data_version()
        if version == self._version:
            return None
        self._version = version
        return self.accounts.revisions(names)

    async def check(self) -> None:
        """One pass: end expired token sessions, and judge the sessions of changed users."""
        now = time.time()
        for session in list(self.sessions()):
            login = session.login
            if login is not None and login.expires is not None and now >= login.expires:
                session.end(f"the token {login.credential} expired")
        if not self._by_user:
            return
        revs = await asyncio.to_thread(self._poll, list(self._by_user))
        if revs is not None:
            self._revs = revs
            self.passes += 1
        stale = {
            name
            for name, group in self._by_user.items()
            if any(s.checked_rev != self._revs.get(name, -1) for s in group)
        }
        for name in stale:
            user, keys, tokens = await asyncio.to_thread(self.credentials.state, name)
            for session in list(self._by_user.get(name, ())):
                reason = judge(session, user, keys, tokens)
                if reason is not None:
                    session.end(reason)
                    continue
                session.user = user
                session.checked_rev = user.rev if user is not None else -1
            # A user first seen since the last poll is now known, and not judged again each pass.
            self._revs[name] = user.rev if user is not None else -1
