"""User accounts of ``ferry serve``: the account logic, written once over an accounts database.

Passwords are argon2id hashes; keys and tokens live beside the users (:mod:`ferry.server.credentials`).
Where the accounts are stored is the engine's business (:mod:`ferry.server.accountdb`): by default
SQLite in ``<root>/users.db`` (:mod:`ferry.server.accountdb_sqlite`); with ``--db postgresql://...``
PostgreSQL, shared by every server behind one address (:mod:`ferry.server.accountdb_pg`). Nothing is
cached: ``ferry user ...`` can change accounts while servers run and they see it at the next login.

The server runs :meth:`Accounts.verify` in a thread: argon2 is deliberately CPU-heavy (~25 ms), and
the hashing itself runs outside any database lock or transaction so several logins can be checked in
parallel.

Layout and modes (see :mod:`ferry.paths`): ``<root>/users.db`` is 0600, each user's home
``<root>/homes/<name>/`` is created 0700 when the user is added (with shared accounts, by each server
at the user's first login there: ``ferry user`` may run on another machine).
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ferry import paths
from ferry.errors import AccountError, AuthError, FerryError, NoSuchUser, UsageError, UserExists
from ferry.errtext import os_reason
from ferry.server.accountdb import AccountsDB, Conn
from ferry.server.accountdb_sqlite import SqliteAccounts

__all__ = [
    "FIRST_USER",
    "UNCHANGED",
    "USER_COLUMNS",
    "Accounts",
    "User",
    "validate_name",
]

#: The name of the account ``ensure_first_user`` creates. A fixed name rather than ``$USER``: the
#: server often runs as root or a service account, and a predictable name is easier to document
#: and to type on the client than whoever happened to start the server first.
FIRST_USER: Final = "ferry"

# POSIX-login-like names: they become folder names under homes/, so no '/', no leading '.' or '-'.
_NAME_RE: Final = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")

# One message for unknown user and wrong password, so a client cannot probe which names exist.
_AUTH_FAILED: Final = "wrong user name or password"

#: The columns of ``users`` that make a :class:`User`, in the order ``Accounts.user_from_row`` reads.
USER_COLUMNS: Final = "name, quota, exec_allowed, exec_allow, disabled, rev, pw_gen, max_files"


class _Unchanged(enum.Enum):
    """Type of the :data:`UNCHANGED` sentinel (an enum so mypy can narrow it away)."""

    UNCHANGED = enum.auto()


#: Passed to :meth:`Accounts.modify` for "leave this field as it is" (``None`` has a meaning there).
UNCHANGED: Final = _Unchanged.UNCHANGED


@dataclass(frozen=True)
class User:
    """One account as stored: what the server needs to authorise a session.

    ``quota`` is in bytes (``None`` = unlimited); ``max_files`` bounds the files and folders of the
    home (``None`` = unlimited; partial uploads have their own server-wide cap). ``exec_allowed`` says whether the user may run
    programs at all; ``exec_allow`` then restricts which ones (``None`` = any program). A
    ``disabled`` account cannot log in. ``rev`` and ``pw_gen`` are the account's revision (any
    change of it or of its keys and tokens) and password generation when it was read: a running
    server compares them to notice changes made by ``ferry user`` (see ferry.server.revocation).
    """

    name: str
    home: Path
    quota: int | None
    exec_allowed: bool
    exec_allow: tuple[str, ...] | None
    disabled: bool = False
    rev: int = 0
    pw_gen: int = 0
    max_files: int | None = None

    def may_exec(self, program: str) -> bool:
        """Whether this user may run ``program`` (matched *exactly*, so ``/tmp/x/ls`` is not ``ls``)."""
        if not self.exec_allowed:
            return False
        return self.exec_allow is None or program in self.exec_allow


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid user name, else raise :class:`AccountError` saying why."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise AccountError(
            f"invalid user name {name!r}: use 1 to 32 characters from a-z, 0-9, '_', '.', '-', "
            "starting with a letter or '_'"
        )
    return name


def _validate_password(password: str) -> str:
    if not isinstance(password, str) or not password:
        raise AccountError("the password must not be empty")
    return password


def _validate_quota(quota: int | None, what: str = "quota", unit: str = "bytes") -> int | None:
    # bool is an int subclass; True as a quota is surely a bug.
    if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool) or quota < 0):
        raise AccountError(f"invalid {what} {quota!r}: use a number of {unit} >= 0, or None for unlimited")
    return quota


def _validate_max_files(max_files: int | None) -> int | None:
    return _validate_quota(max_files, "file limit", "files and folders")


def _validate_allow(allow: Iterable[str] | None) -> tuple[str, ...] | None:
    if allow is None:
        return None
    if isinstance(allow, str):
        # tuple("ls") would silently become ('l', 's').
        raise AccountError("exec_allow must be a list of program names, not a single string")
    seen: dict[str, None] = {}  # ordered de-duplication
    for program in allow:
        if not isinstance(program, str) or not program or any(ord(c) < 32 for c in program):
            raise AccountError(f"invalid program name {program!r} in the exec allow list")
        seen[program] = None
    return tuple(seen)


def default_hasher() -> PasswordHasher:
    """argon2id with OWASP's recommended parameters (m=19 MiB, t=2, p=1).

    Why not argon2-cffi's default (RFC 9106 low-memory: 64 MiB, t=3, p=4): on the 2-core servers we
    target it costs ~130 ms and 64 MiB per login, which made a whole ``ferry exec`` slower than a
    fresh ssh and lets a burst of logins eat memory. These parameters cost ~20 ms and 19 MiB while
    remaining the OWASP-recommended baseline for argon2id.
    """
    return PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


class Accounts:
    """The accounts of a server root, or of a shared database (see the module docstring).

    ``Accounts(root)``: SQLite in ``<root>/users.db`` (created when missing). ``Accounts(root,
    db=URL)``: the PostgreSQL database at ``URL`` (``root``, when given, is where this server keeps
    the homes; ``ferry user --db`` passes none); ``create=False`` refuses a database that holds no
    accounts yet (:class:`~ferry.server.accountdb.NoAccounts`). ``engine`` passes a ready engine.

    ``hasher`` defaults to :func:`default_hasher` (argon2id, OWASP's recommended m=19 MiB, t=2,
    p=1). Tests pass a cheaper one; changing the parameters is safe because :meth:`verify`
    re-hashes old hashes on the next successful login.
    """

    def __init__(
        self,
        root: Path | None,
        *,
        hasher: PasswordHasher | None = None,
        db: str | None = None,
        create: bool = True,
        engine: AccountsDB | None = None,
    ) -> None:
        # Absolute: homes are handed to the server, which must not depend on a later chdir().
        self.root = Path(root).absolute() if root is not None else None
        self._hasher = hasher if hasher is not None else default_hasher()
        self._dummy_hash: str | None = None
        if engine is None and db is not None:
            from ferry.server.accountdb_pg import PostgresAccounts  # psycopg: only with --db

            engine = PostgresAccounts(db, create=create)
        if engine is None:
            if self.root is None:
                raise ValueError("accounts in SQLite need the server root")
            engine = SqliteAccounts(paths.users_db(self.root))
        self.db: AccountsDB = engine
        #: the database, for messages: the users.db path or the database URL without its password
        self.where = engine.where

    def _user(self, row: tuple[Any, ...]) -> User:
        """A :class:`User` from a row of :data:`USER_COLUMNS`."""
        name, quota, exec_allowed, exec_allow, disabled, rev, pw_gen, max_files = row
        return User(
            name=name,
            home=self.home_of(name),
            quota=quota,
            exec_allowed=bool(exec_allowed),
            exec_allow=None if exec_allow is None else tuple(json.loads(exec_allow)),
            disabled=bool(disabled),
            rev=rev,
            pw_gen=pw_gen,
            max_files=max_files,
        )

    def home_of(self, name: str) -> Path:
        """Where the home of ``name`` is: under the root; without a root (``ferry user --db``), the
        same place relative to each server's root (``homes/NAME``)."""
        if self.root is None:
            return paths.home_dir(Path(), name)
        return paths.home_dir(self.root, name)

    def _make_home(self, name: str) -> None:
        """Create ``homes/<name>`` 0700 under the root, if this process has one (an existing folder,
        left by a deleted user, is reused). Without a root (shared accounts managed from anywhere),
        each server makes the home at the user's first login there."""
        if self.root is None:
            return
        try:
            paths.ensure_private_dir(paths.homes_dir(self.root))
            home = paths.home_dir(self.root, name)
            home.mkdir(mode=paths.PRIVATE_DIR_MODE, exist_ok=True)
            os.chmod(home, paths.PRIVATE_DIR_MODE)
        except OSError as exc:
            raise FerryError(f"cannot create the home folder of {name!r}: {os_reason(exc)}") from exc

    _COLUMNS: Final = USER_COLUMNS

    # --- for the credential stores (ferry.server.credentials) ---------------------------------------

    def reading(self) -> contextlib.AbstractContextManager[Conn]:
        """A connection for reads; errors become FerryError."""
        return self.db.reading()

    def writing(self) -> contextlib.AbstractContextManager[Conn]:
        """A write transaction (one writer at a time; rolled back if the body raises)."""
        return self.db.writing()

    def user_from_row(self, row: tuple[Any, ...]) -> User:
        """A :class:`User` from a row selected with :data:`USER_COLUMNS` (in that order)."""
        return self._user(row)

    @staticmethod
    def bump(conn: Conn, name: str) -> bool:
        """Increase the revision of ``name`` inside a write transaction; whether the user exists."""
        return conn.execute("UPDATE users SET rev = rev + 1 WHERE name = ?", (name,)).rowcount > 0

    # --- public API ------------------------------------------------------------------------------

    def add(
        self,
        name: str,
        password: str,
        *,
        quota: int | None = None,
        exec_allowed: bool = False,
        exec_allow: Iterable[str] | None = None,
        max_files: int | None = None,
    ) -> User:
        """Create a user and its home folder; raises :class:`UserExists` if the name is taken."""
        validate_name(name)
        _validate_password(password)
        quota = _validate_quota(quota)
        max_files = _validate_max_files(max_files)
        allow = _validate_allow(exec_allow)
        pw_hash = self._hasher.hash(password)  # slow: outside the lock
        with self.writing() as conn:
            try:
                conn.execute(
                    "INSERT INTO users (name, hash, quota, exec_allowed, exec_allow, max_files) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (name, pw_hash, quota, int(exec_allowed), None if allow is None else json.dumps(allow), max_files),
                )
            except self.db.integrity_error:
                raise UserExists(f"user {name!r} already exists") from None
            # Inside the transaction: if the folder cannot be made, the user is not added either.
            self._make_home(name)
        return User(name, self.home_of(name), quota, bool(exec_allowed), allow, max_files=max_files)

    def delete(self, name: str, *, remove_home: bool = False) -> None:
        """Delete a user; with ``remove_home`` also delete its home folder and everything in it."""
        validate_name(name)  # also guarantees the rmtree below stays inside homes/
        if remove_home and self.root is None:
            raise UsageError(
                "with shared accounts (--db) each server keeps the homes under its own root: the user "
                "was not deleted; delete it without --remove-home, then remove homes/"
                f"{name} on each server"
            )
        with self.writing() as conn:
            if conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise NoSuchUser(f"no such user: {name!r}")
            # Else a user added later under the same name would inherit them.
            conn.execute('DELETE FROM keys WHERE "user" = ?', (name,))
            conn.execute('DELETE FROM tokens WHERE "user" = ?', (name,))
        if remove_home:
            home = self.home_of(name)
            try:
                # After the row is gone: the account (what grants access) disappears even if some
                # file cannot be removed.
                shutil.rmtree(home)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise FerryError(
                    f"user {name!r} deleted, but its home {home} was not fully removed: {os_reason(exc)}"
                ) from exc

    def set_password(self, name: str, password: str) -> None:
        """Replace a user's password; raises :class:`NoSuchUser` for an unknown name."""
        validate_name(name)
        _validate_password(password)
        pw_hash = self._hasher.hash(password)
        with self.writing() as conn:
            sql = "UPDATE users SET hash = ?, pw_gen = pw_gen + 1, rev = rev + 1 WHERE name = ?"
            if conn.execute(sql, (pw_hash, name)).rowcount == 0:
                raise NoSuchUser(f"no such user: {name!r}")

    def modify(
        self,
        name: str,
        *,
        quota: int | _Unchanged | None = UNCHANGED,
        exec_allowed: bool | _Unchanged = UNCHANGED,
        exec_allow: Iterable[str] | _Unchanged | None = UNCHANGED,
        disabled: bool | _Unchanged = UNCHANGED,
        max_files: int | _Unchanged | None = UNCHANGED,
    ) -> User:
        """Change some of a user's settings (fields left at :data:`UNCHANGED` keep their value).

        ``quota=None`` and ``max_files=None`` mean unlimited and ``exec_allow=None`` means any
        program, which is why
        "unchanged" needs its own sentinel. Returns the updated user.
        """
        validate_name(name)
        sets: builtins.list[str] = []
        args: builtins.list[object] = []
        if quota is not UNCHANGED:
            sets.append("quota = ?")
            args.append(_validate_quota(quota))
        if exec_allowed is not UNCHANGED:
            sets.append("exec_allowed = ?")
            args.append(int(bool(exec_allowed)))
        if exec_allow is not UNCHANGED:
            allow = _validate_allow(exec_allow)
            sets.append("exec_allow = ?")
            args.append(None if allow is None else json.dumps(allow))
        if disabled is not UNCHANGED:
            sets.append("disabled = ?")
            args.append(int(bool(disabled)))
        if max_files is not UNCHANGED:
            sets.append("max_files = ?")
            args.append(_validate_max_files(max_files))
        if sets:
            sets.append("rev = rev + 1")
        with self.writing() as conn:
            if sets:
                # The column names come from the fixed strings above, never from the caller.
                sql = f"UPDATE users SET {', '.join(sets)} WHERE name = ?"
                if conn.execute(sql, (*args, name)).rowcount == 0:
                    raise NoSuchUser(f"no such user: {name!r}")
            row = conn.execute(f"SELECT {self._COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NoSuchUser(f"no such user: {name!r}")
        return self._user(row)

    def list(self) -> builtins.list[User]:
        """All users, sorted by name."""
        with self.reading() as conn:
            rows = conn.execute(f"SELECT {self._COLUMNS} FROM users ORDER BY name").fetchall()
        return [self._user(row) for row in rows]

    def get(self, name: str) -> User | None:
        """The user called ``name``, or ``None`` if there is none (or the name is not even valid)."""
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            return None
        with self.reading() as conn:
            row = conn.execute(f"SELECT {self._COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._user(row)

    def verify(self, name: str, password: str) -> User:
        """Check a login; return the user, or raise ``AuthError("wrong user name or password")``.

        Unknown names cost the same argon2 work as wrong passwords (a dummy hash is checked), so
        response time does not reveal which user names exist. CPU-heavy: call it in a thread.
        If the stored hash used other parameters than the current hasher, it is re-hashed.
        """
        row: tuple[Any, ...] | None = None
        if isinstance(name, str) and _NAME_RE.fullmatch(name):
            with self.reading() as conn:
                row = conn.execute(
                    f"SELECT hash, {self._COLUMNS} FROM users WHERE name = ?", (name,)
                ).fetchone()
        if row is None or not isinstance(password, str):
            try:
                self._hasher.verify(self._get_dummy_hash(), password if isinstance(password, str) else "")
            except VerificationError:
                pass
            raise AuthError(_AUTH_FAILED)
        stored, user = row[0], self._user(row[1:])
        try:
            self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            # InvalidHashError: a corrupt stored hash must lock the account, not crash the server.
            raise AuthError(_AUTH_FAILED) from None
        if user.disabled:  # after the hash: a disabled account costs what any other does
            raise AuthError(_AUTH_FAILED)
        if self._hasher.check_needs_rehash(stored):
            new_hash = self._hasher.hash(password)
            with self.writing() as conn:
                # "AND hash = ?": do not overwrite a password changed while we were hashing.
                conn.execute(
                    "UPDATE users SET hash = ? WHERE name = ? AND hash = ?", (new_hash, name, stored)
                )
        return user

    def data_version(self) -> int:
        """A number that moves whenever another connection (``ferry user`` in another process, or
        another server) committed a change; cheap to poll (see the engines' ``changes``)."""
        return self.db.changes()

    def revisions(self, names: builtins.list[str]) -> dict[str, int]:
        """The revision (``rev``) of each existing user among ``names``."""
        out: dict[str, int] = {}
        with self.reading() as conn:
            for start in range(0, len(names), 500):  # stay far below SQLite's variable limit
                chunk = names[start : start + 500]
                marks = ",".join("?" * len(chunk))
                out.update(conn.execute(f"SELECT name, rev FROM users WHERE name IN ({marks})", chunk).fetchall())
        return out

    def _get_dummy_hash(self) -> str:
        # Computed lazily (it costs one hash) with the current parameters, so the dummy check takes
        # as long as a real one.
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        return self._dummy_hash

    def ensure_first_user(self) -> tuple[User, str] | None:
        """If there is no user at all, create :data:`FIRST_USER` with a random password.

        Returns ``(user, password)`` so ``ferry serve`` can print the password once (it is not
        stored anywhere in clear text), or ``None`` if users already exist. Safe against two
        servers starting at once: only one of them creates the user.
        """
        with self.reading() as conn:
            if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None:
                return None
        password = secrets.token_urlsafe(18)  # 144 random bits, URL- and shell-safe
        pw_hash = self._hasher.hash(password)
        with self.writing() as conn:
            if conn.execute("SELECT 1 FROM users LIMIT 1").fetchone() is not None:
                return None
            conn.execute(
                "INSERT INTO users (name, hash, quota, exec_allowed, exec_allow) VALUES (?, ?, NULL, 0, NULL)",
                (FIRST_USER, pw_hash),
            )
            self._make_home(FIRST_USER)
        user = self.get(FIRST_USER)
        assert user is not None
        return user, password

    def close(self) -> None:
        """Close the database connections; further calls raise. Closing twice is harmless."""
        self.db.close()

    def __enter__(self) -> Accounts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
