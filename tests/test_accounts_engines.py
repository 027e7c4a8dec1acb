"""The accounts engines: SQLite (the default) and PostgreSQL (accounts shared by N servers).

One account logic over both (tests/test_accounts.py runs its logic tests on each); here: keys and
tokens on both, the two schemas kept in step, and what only a shared database has to get right —
servers that notice each other's changes, first starts that race, a database that is missing,
unreachable, or drops its connections. All against the real PostgreSQL (tests/components.py).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from components import run_sql
from ferry.errors import FerryError, NoSuchUser, UsageError, UserExists
from ferry.server.accountdb import NoAccounts
from ferry.server.accountdb_pg import APPLICATION, PostgresAccounts, redact_url
from ferry.server.accounts import FIRST_USER, Accounts
from ferry.server.accounts_schema import SCHEMA_VERSION
from ferry.server.credentials import Credentials
from login_support import Key, make_key

HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)


@pytest.fixture(scope="module")
def two_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Key, Key]:
    folder = tmp_path_factory.mktemp("keys")
    return make_key(folder, "one", "ed25519"), make_key(folder, "two", "ed25519")


@pytest.fixture(params=["sqlite", "postgresql"])
def accounts(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Accounts]:
    db = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    with Accounts(tmp_path / "root", hasher=HASHER, db=db) as acc:
        yield acc


def test_keys_and_tokens_on_both_engines(accounts: Accounts, two_keys: tuple[Key, Key]) -> None:
    """Every credential statement runs on both engines (an unquoted column ``user`` would compare
    with PostgreSQL's CURRENT_USER and find nothing)."""
    one, two = two_keys
    creds = Credentials(accounts)
    accounts.add("ann", "pw")
    accounts.add("bob", "pw")
    rev = accounts.revisions(["ann"])["ann"]
    added, already = creds.add_keys("ann", one.pub + "\n" + two.pub)
    assert [k.fingerprint for k in added] == [one.fingerprint, two.fingerprint] and not already
    assert creds.add_keys("ann", one.pub) == ([], [added[0]])
    # Added in one call, so in the same second: listed in fingerprint order (byte order on both engines).
    assert [k.fingerprint for k in creds.keys("ann")] == sorted([one.fingerprint, two.fingerprint])
    assert creds.keys("bob") == []
    user, found = creds.login_keys("ann", [one.fingerprint, "SHA256:nope"])
    assert user is not None and user.name == "ann" and set(found) == {one.fingerprint}
    assert creds.login_keys("bob", [one.fingerprint])[1] == {}
    assert creds.delete_key("ann", two.fingerprint).fingerprint == two.fingerprint
    record, token = creds.add_token("ann", read_only=True, label="ci")
    found_token = creds.login_token(token)
    assert found_token is not None and found_token[0].name == "ann" and found_token[1].read_only
    assert creds.login_token(token[:-1] + ("x" if token[-1] != "x" else "y")) is None
    assert [t.id for t in creds.tokens("ann")] == [record.id] and creds.tokens("bob") == []
    user, keys, tokens = creds.state("ann")
    assert user is not None and keys == {one.fingerprint} and set(tokens) == {record.id}
    assert user.rev > rev  # every credential change moves the account's revision
    creds.delete_token("ann", record.id)
    assert creds.login_token(token) is None
    creds.add_token("ann")
    accounts.delete("ann")
    assert creds.state("ann") == (None, set(), {})  # keys and tokens went with the account
    with pytest.raises(NoSuchUser):
        creds.keys("ann")


def test_both_schemas_end_with_the_same_columns(tmp_path: Path, pg_dsn: str) -> None:
    """The account code reads both with the same statements: a step added to one engine's
    migrations only (ferry.server.accounts_schema) fails here."""
    Accounts(tmp_path, hasher=HASHER).close()
    Accounts(None, hasher=HASHER, db=pg_dsn).close()
    conn = sqlite3.connect(tmp_path / "users.db")
    for table in ("users", "keys", "tokens"):
        lite = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
        pg = run_sql(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
            f"AND table_name = '{table}' ORDER BY ordinal_position",
            pg_dsn,
        )
        assert sorted(pg) == sorted(lite), table
    conn.close()
    assert run_sql("SELECT value FROM ferry_meta WHERE key = 'accounts_schema_version'", pg_dsn) == [
        str(SCHEMA_VERSION)
    ]


def test_a_change_through_one_server_is_seen_by_another(pg_dsn: str) -> None:
    """Two servers on one database: what one writes, the other reads at once, and its change
    counter (what the revocation watcher polls) moves."""
    with Accounts(None, hasher=HASHER, db=pg_dsn) as a, Accounts(None, hasher=HASHER, db=pg_dsn) as b:
        seen = b.data_version()
        a.add("ann", "pw")
        assert b.data_version() != seen
        assert b.verify("ann", "pw").name == "ann"
        seen = b.data_version()
        assert b.data_version() == seen  # nothing changed: it stays
        a.set_password("ann", "new")
        assert b.data_version() != seen
        assert b.revisions(["ann", "nobody"]) == {"ann": 1}
        with pytest.raises(UserExists):
            b.add("ann", "other")


def test_servers_starting_together_create_one_first_user(pg_dsn: str) -> None:
    """Writers take turns across servers: of four servers starting at once on an empty database,
    exactly one creates the first user (and prints its password)."""
    engines = [Accounts(None, hasher=HASHER, db=pg_dsn) for _ in range(4)]
    barrier = threading.Barrier(len(engines), timeout=20)
    results: list[object] = [None] * len(engines)

    def start(i: int) -> None:
        barrier.wait()
        results[i] = engines[i].ensure_first_user()

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for e in engines:
        e.close()
    created = [r for r in results if r is not None]
    assert len(created) == 1, results
    assert run_sql("SELECT name FROM users", pg_dsn) == [FIRST_USER]


def test_a_database_without_accounts_is_refused_unless_asked_to_create(pg_dsn: str) -> None:
    with pytest.raises(NoAccounts):
        PostgresAccounts(pg_dsn, create=False)
    assert run_sql("SELECT to_regclass('users') IS NULL", pg_dsn) == [True]  # nothing was created
    PostgresAccounts(pg_dsn).close()
    PostgresAccounts(pg_dsn, create=False).close()


def test_accounts_of_a_newer_ferry_are_refused(pg_dsn: str) -> None:
    PostgresAccounts(pg_dsn).close()
    run_sql(f"UPDATE ferry_meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'accounts_schema_version'", pg_dsn)
    with pytest.raises(FerryError, match="newer ferry"):
        PostgresAccounts(pg_dsn)


def test_bad_or_unreachable_database_is_a_clear_error_without_the_password() -> None:
    with pytest.raises(UsageError, match="postgresql://"):
        Accounts(None, db="mysql://u:pw@127.0.0.1/db")
    from conftest import free_port

    url = f"postgresql://ferry:s3cret-pw@127.0.0.1:{free_port()}/ferry"
    with pytest.raises(FerryError) as info:
        Accounts(None, db=url)
    assert f"accounts database postgresql://ferry@127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/ferry" in str(
        info.value
    )
    assert "unreachable" in str(info.value) and "s3cret" not in str(info.value)
    assert redact_url("postgresql://u:pw@h/db?password=x&sslmode=require") == "postgresql://u@h/db?sslmode=require"


def test_connections_the_database_closed_are_replaced_without_a_failed_call(pg_dsn: str) -> None:
    """The database restarting (here: every one of our connections terminated by the server) costs
    no failed login: a pooled connection the server closed is noticed before it is used."""
    with Accounts(None, hasher=HASHER, db=pg_dsn) as acc:
        acc.add("ann", "pw")
        assert acc.get("ann") is not None
        # With a timeout, pg_terminate_backend returns once each backend has exited (its socket
        # closed); without one it only signals them, and a login could race the dying backend.
        killed = run_sql(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
            f"WHERE application_name = '{APPLICATION}' AND datname = current_database()",
            pg_dsn,
        )
        assert killed[0] >= 1
        for _ in range(3):
            assert acc.verify("ann", "pw").name == "ann"
