"""The accounts schema in both SQL dialects: SQLite (the default) and PostgreSQL (shared accounts).

One version number for both engines: version N means the same tables and columns in either, so the
account code reads and writes both with the same statements. A change appends step N+1 to **both**
:data:`SQLITE` and :data:`POSTGRES` (additive changes only, so old rows stay valid);
``tests/test_accounts_engines.py`` checks that the two end with the same columns.

PostgreSQL arrived at version 2, so its first step creates version 2 whole. Its extra table
``account_changes`` holds the counter a running server polls to notice changes made elsewhere (SQLite
has ``PRAGMA data_version`` for that). Text columns that are sorted or compared use ``COLLATE "C"``
(byte order, as SQLite's default ``BINARY``), so both list in the same order.
"""

from __future__ import annotations

from typing import Final

__all__ = ["POSTGRES", "POSTGRES_FIRST", "SCHEMA_VERSION", "SQLITE"]

#: The version this code reads and writes.
SCHEMA_VERSION: Final = 3

#: Statements that bring an SQLite database from version N-1 to N. A new database runs them all.
SQLITE: Final[dict[int, tuple[str, ...]]] = {
    1: (
        """
        CREATE TABLE IF NOT EXISTS users (
            name          TEXT PRIMARY KEY NOT NULL,
            hash          TEXT NOT NULL,              -- argon2id PHC string (includes salt and parameters)
            quota         INTEGER,                    -- bytes; NULL = unlimited
            exec_allowed  INTEGER NOT NULL DEFAULT 0, -- 0/1
            exec_allow    TEXT,                       -- JSON list of program names; NULL = any program
            created       INTEGER NOT NULL DEFAULT (strftime('%s', 'now'))
        ) WITHOUT ROWID
        """,
    ),
    2: (
        # 0/1: a disabled account cannot log in and its sessions end (ferry user mod --disable)
        "ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0",
        # bumped by every change of the account or of its keys and tokens: a running server
        # compares it with what its sessions logged in with (ferry.server.revocation)
        "ALTER TABLE users ADD COLUMN rev INTEGER NOT NULL DEFAULT 0",
        # bumped by a password change only (not by a re-hash): it ends password sessions
        "ALTER TABLE users ADD COLUMN pw_gen INTEGER NOT NULL DEFAULT 0",
        """
        CREATE TABLE IF NOT EXISTS keys (
            user          TEXT NOT NULL,
            fingerprint   TEXT NOT NULL,              -- SHA256:... of the blob, as ssh-keygen -l prints
            type          TEXT NOT NULL,              -- ssh-ed25519, ecdsa-sha2-nistp256, ssh-rsa, ...
            blob          BLOB NOT NULL,              -- the public key in SSH wire format
            comment       TEXT NOT NULL DEFAULT '',
            added         INTEGER NOT NULL DEFAULT (strftime('%s', 'now')),
            PRIMARY KEY (user, fingerprint)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE IF NOT EXISTS tokens (
            id            TEXT PRIMARY KEY NOT NULL,  -- public part of the token, shown by token list
            user          TEXT NOT NULL,
            hash          BLOB NOT NULL,              -- SHA-256 of the whole token; the token is not kept
            read_only     INTEGER NOT NULL DEFAULT 0,
            label         TEXT NOT NULL DEFAULT '',
            created       INTEGER NOT NULL DEFAULT (strftime('%s', 'now')),
            expires       INTEGER                     -- Unix time; NULL = never
        ) WITHOUT ROWID
        """,
        "CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens (user)",
    ),
    3: (
        # files and folders the home may hold (ferry user mod --max-files); NULL = unlimited
        "ALTER TABLE users ADD COLUMN max_files INTEGER",
    ),
}

_NOW: Final = "(extract(epoch FROM now())::bigint)"

#: The version the first PostgreSQL step creates.
POSTGRES_FIRST: Final = 2

#: Statements that bring a PostgreSQL database to version N (the comments of :data:`SQLITE` apply).
POSTGRES: Final[dict[int, tuple[str, ...]]] = {
    2: (
        f"""
        CREATE TABLE users (
            name          text COLLATE "C" PRIMARY KEY,
            hash          text NOT NULL,
            quota         bigint,
            exec_allowed  integer NOT NULL DEFAULT 0,
            exec_allow    text,
            created       bigint NOT NULL DEFAULT {_NOW},
            disabled      integer NOT NULL DEFAULT 0,
            rev           bigint NOT NULL DEFAULT 0,
            pw_gen        bigint NOT NULL DEFAULT 0
        )
        """,
        f"""
        CREATE TABLE keys (
            "user"        text COLLATE "C" NOT NULL,
            fingerprint   text COLLATE "C" NOT NULL,
            type          text NOT NULL,
            blob          bytea NOT NULL,
            comment       text NOT NULL DEFAULT '',
            added         bigint NOT NULL DEFAULT {_NOW},
            PRIMARY KEY ("user", fingerprint)
        )
        """,
        f"""
        CREATE TABLE tokens (
            id            text COLLATE "C" PRIMARY KEY,
            "user"        text COLLATE "C" NOT NULL,
            hash          bytea NOT NULL,
            read_only     integer NOT NULL DEFAULT 0,
            label         text NOT NULL DEFAULT '',
            created       bigint NOT NULL DEFAULT {_NOW},
            expires       bigint
        )
        """,
        'CREATE INDEX tokens_by_user ON tokens ("user")',
        # One row: bumped by every write transaction (ferry.server.accountdb_pg), polled by servers.
        "CREATE TABLE account_changes (id integer PRIMARY KEY CHECK (id = 1), n bigint NOT NULL)",
        "INSERT INTO account_changes VALUES (1, 0)",
    ),
    3: ("ALTER TABLE users ADD COLUMN max_files bigint",),
}
