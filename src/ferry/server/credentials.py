"""SSH public keys and access tokens of the accounts, in the accounts database.

Both live beside the users in the same database (tables ``keys`` and ``tokens``, see
:mod:`ferry.server.accounts_schema`; SQLite's ``users.db`` or the shared PostgreSQL database), so
``ferry user key ...`` and ``ferry user token ...`` work while the server runs, like every other
account change. The statements are the engines' common dialect (:mod:`ferry.server.accountdb`). Each change bumps the user's revision, which
a running server polls to end the sessions of a removed key or token within seconds
(:mod:`ferry.server.revocation`).

Tokens: ``fyt_<id>_<secret>``. The id (12 characters) is public: it is how ``token list`` and
``token del`` name a token. The secret is 256 random bits. Only the SHA-256 of the whole token is
stored: a token is a random 256-bit secret, not a password, so a slow hash would add nothing but
login cost. The ``fyt_`` prefix lets secret scanners recognise a leaked token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Final

from ferry.errors import NoSuchUser, UsageError
from ferry.server.accountdb import Conn
from ferry.server.accounts import USER_COLUMNS, Accounts, User, validate_name

__all__ = ["TOKEN_PREFIX", "Credentials", "KeyRecord", "TokenRecord", "token_id"]

#: Every token starts with this (recognisable by secret scanners and by ``ferry`` itself).
TOKEN_PREFIX: Final = "fyt_"
_ID_ALPHABET: Final = "abcdefghijkmnpqrstuvwxyz23456789"  # no 0/o, 1/l: ids are read and typed
_ID_LEN: Final = 12
_MAX_LABEL: Final = 200
#: Keys one user may have; a bound so a login's key lookup stays small.
MAX_KEYS_PER_USER: Final = 1000


@dataclass(frozen=True)
class KeyRecord:
    """One public key of a user as stored."""

    user: str
    fingerprint: str
    type: str
    blob: bytes
    comment: str
    added: int

    @property
    def line(self) -> str:
        """The key as an ``authorized_keys`` line."""
        import base64

        text = f"{self.type} {base64.b64encode(self.blob).decode('ascii')}"
        return f"{text} {self.comment}" if self.comment else text


@dataclass(frozen=True)
class TokenRecord:
    """One token of a user as stored (the secret itself is never stored)."""

    id: str
    user: str
    read_only: bool
    label: str
    created: int
    expires: int | None

    def expired(self, now: float | None = None) -> bool:
        """Whether the token has expired at ``now`` (default: the current time)."""
        return self.expires is not None and (time.time() if now is None else now) >= self.expires


def token_id(token: str) -> str | None:
    """The id part of a well-formed token, or None (never raises: tokens come from clients)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
        return None
    ident, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not sep or len(ident) != _ID_LEN or not secret or any(c not in _ID_ALPHABET for c in ident):
        return None
    return ident


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


_KEY_COLUMNS: Final = '"user", fingerprint, type, blob, comment, added'
_TOKEN_COLUMNS: Final = 'id, "user", read_only, label, created, expires'


def _token(row: tuple[str, str, int, str, int, int | None]) -> TokenRecord:
    ident, user, read_only, label, created, expires = row
    return TokenRecord(ident, user, bool(read_only), label, created, expires)


class Credentials:
    """Keys and tokens of the accounts in ``accounts`` (shares its connection and lock)."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts
        # A token hash to compare against when the id is unknown: the same work either way.
        self._dummy = _token_hash(TOKEN_PREFIX + secrets.token_urlsafe(32))

    @staticmethod
    def _require(conn: Conn, name: str) -> None:
        validate_name(name)
        if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
            raise NoSuchUser(f"no such user: {name!r}")

    # --- keys ------------------------------------------------------------------------------------

    def add_keys(self, name: str, text: str, *, source: str = "input") -> tuple[list[KeyRecord], list[KeyRecord]]:
        """Add every key line of ``text`` (a ``.pub`` file or a whole ``authorized_keys``) to ``name``.

        Blank lines and ``#`` comments are skipped. All or nothing: if any line is refused, no key
        is added and the error names every bad line of ``source``. Returns ``(added, already)``:
        keys new to the user and keys it already had.
        """
        from ferry.sshkeys import KeyError_, parse_public_line

        keys = []
        problems = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                keys.append(parse_public_line(line))
            except KeyError_ as exc:
                problems.append(f"  {source}, line {number}: {exc}")
        if problems:
            raise UsageError("no key was added:\n" + "\n".join(problems))
        if not keys:
            raise UsageError(f"no public key found in {source} (expected lines like 'ssh-ed25519 AAAA... comment')")
        added: list[KeyRecord] = []
        already: list[KeyRecord] = []
        now = int(time.time())
        with self.accounts.writing() as conn:
            self._require(conn, name)
            for key in keys:
                record = KeyRecord(name, key.fingerprint, key.type, key.blob, key.comment, now)
                if any(r.fingerprint == record.fingerprint for r in added) or conn.execute(
                    'SELECT 1 FROM keys WHERE "user" = ? AND fingerprint = ?', (name, record.fingerprint)
                ).fetchone():
                    already.append(record)
                    continue
                conn.execute(
                    f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, record.fingerprint, record.type, record.blob, record.comment, record.added),
                )
                added.append(record)
            count = conn.execute('SELECT count(*) FROM keys WHERE "user" = ?', (name,)).fetchone()[0]
            if count > MAX_KEYS_PER_USER:
                raise UsageError(f"a user may have at most {MAX_KEYS_PER_USER} keys; no key was added")
            if added:
                self.accounts.bump(conn, name)
        return added, already

    def keys(self, name: str) -> list[KeyRecord]:
        """The keys of ``name``, oldest first."""
        with self.accounts.reading() as conn:
            self._require(conn, name)
            rows = conn.execute(
                f'SELECT {_KEY_COLUMNS} FROM keys WHERE "user" = ? ORDER BY added, fingerprint', (name,)
            ).fetchall()
        return [KeyRecord(*row) for row in rows]

    def delete_key(self, name: str, fingerprint: str) -> KeyRecord:
        """Remove the key of ``name`` with this fingerprint (``SHA256:...``, the prefix optional)."""
        fp = fingerprint if fingerprint.startswith("SHA256:") else "SHA256:" + fingerprint
        with self.accounts.writing() as conn:
            self._require(conn, name)
            row = conn.execute(
                f'SELECT {_KEY_COLUMNS} FROM keys WHERE "user" = ? AND fingerprint = ?', (name, fp)
            ).fetchone()
            if row is None:
                raise UsageError(
                    f"{name!r} has no key {fingerprint}; 'ferry user key list {name}' shows its keys"
                )
            conn.execute('DELETE FROM keys WHERE "user" = ? AND fingerprint = ?', (name, fp))
            self.accounts.bump(conn, name)
        return KeyRecord(*row)

    def login_keys(self, name: str, fingerprints: list[str]) -> tuple[User | None, dict[str, bytes]]:
        """For a key login: the user ``name`` (None if there is none) and which of ``fingerprints``
        are its keys (fingerprint -> stored blob). One read, the same queries whether or not the
        user exists."""
        with self.accounts.reading() as conn:
            row = conn.execute(f"SELECT {USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
            marks = ",".join("?" * len(fingerprints))
            found = conn.execute(
                f'SELECT fingerprint, blob FROM keys WHERE "user" = ? AND fingerprint IN ({marks})',
                (name, *fingerprints),
            ).fetchall()
        user = None if row is None else self.accounts.user_from_row(row)
        return user, {fp: blob for fp, blob in found}

    # --- tokens ----------------------------------------------------------------------------------

    def add_token(
        self, name: str, *, read_only: bool = False, expires: int | None = None, label: str = ""
    ) -> tuple[TokenRecord, str]:
        """Create a token for ``name``; returns its record and the token (shown once, not stored).

        ``expires`` is a Unix time (None: never).
        """
        if len(label) > _MAX_LABEL or any(not c.isprintable() for c in label):
            raise UsageError(f"a token label is at most {_MAX_LABEL} printable characters")
        if expires is not None and expires <= time.time():
            raise UsageError("the expiry time is in the past")
        ident = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))
        token = f"{TOKEN_PREFIX}{ident}_{secrets.token_urlsafe(32)}"
        record = TokenRecord(ident, name, read_only, label, int(time.time()), expires)
        with self.accounts.writing() as conn:
            self._require(conn, name)
            conn.execute(
                'INSERT INTO tokens (id, "user", hash, read_only, label, created, expires) '
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (ident, name, _token_hash(token), int(read_only), label, record.created, expires),
            )
            self.accounts.bump(conn, name)
        return record, token

    def tokens(self, name: str) -> list[TokenRecord]:
        """The tokens of ``name`` (expired ones too), oldest first."""
        with self.accounts.reading() as conn:
            self._require(conn, name)
            rows = conn.execute(
                f'SELECT {_TOKEN_COLUMNS} FROM tokens WHERE "user" = ? ORDER BY created, id', (name,)
            ).fetchall()
        return [_token(row) for row in rows]

    def delete_token(self, name: str, ident: str) -> TokenRecord:
        """Remove token ``ident`` (the id ``token list`` shows, or the whole token) of ``name``."""
        ident = token_id(ident) or ident
        with self.accounts.writing() as conn:
            self._require(conn, name)
            row = conn.execute(
                f'SELECT {_TOKEN_COLUMNS} FROM tokens WHERE "user" = ? AND id = ?', (name, ident)
            ).fetchone()
            if row is None:
                raise UsageError(f"{name!r} has no token {ident}; 'ferry user token list {name}' shows them")
            conn.execute("DELETE FROM tokens WHERE id = ?", (ident,))
            self.accounts.bump(conn, name)
        return _token(row)

    def login_token(self, token: str) -> tuple[User, TokenRecord] | None:
        """For a token login: the user and token record if ``token`` is valid and not expired.

        The same work for an unknown id as for a wrong secret (a hash compared either way).
        """
        ident = token_id(token) or ""
        with self.accounts.reading() as conn:
            row = conn.execute(
                f"SELECT hash, {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (ident,)
            ).fetchone()
            user_row = None
            if row is not None:
                user_row = conn.execute(
                    f"SELECT {USER_COLUMNS} FROM users WHERE name = ?", (row[2],)
                ).fetchone()
        stored = row[0] if row is not None else self._dummy
        good = hmac.compare_digest(stored, _token_hash(token if isinstance(token, str) else ""))
        if not good or row is None or user_row is None:
            return None
        record = _token(row[1:])
        if record.expired():
            return None
        return self.accounts.user_from_row(user_row), record

    def state(self, name: str) -> tuple[User | None, set[str], dict[str, int | None]]:
        """What the revocation check needs about ``name``: the user (None if deleted), its key
        fingerprints and its tokens (id -> expiry)."""
        with self.accounts.reading() as conn:
            row = conn.execute(f"SELECT {USER_COLUMNS} FROM users WHERE name = ?", (name,)).fetchone()
            keys = conn.execute('SELECT fingerprint FROM keys WHERE "user" = ?', (name,)).fetchall()
            tokens = conn.execute('SELECT id, expires FROM tokens WHERE "user" = ?', (name,)).fetchall()
        user = None if row is None else self.accounts.user_from_row(row)
        return user, {fp for (fp,) in keys}, dict(tokens)

