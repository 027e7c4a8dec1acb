"""Accounts (argon2id over SQLite or PostgreSQL) and the standard paths of ferry.paths.

The tests that take the ``accounts`` fixture run over both engines: the account logic is one, the
engines (ferry.server.accountdb_sqlite, ferry.server.accountdb_pg) only store it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from ferry import paths
from ferry.errors import AccountError, AuthError, ExitCode, FerryError, NoSuchUser, UserExists
from ferry.server.accounts import FIRST_USER, UNCHANGED, Accounts, User, validate_name


def fast_hasher(time_cost: int = 1) -> PasswordHasher:
    """Cheap argon2id parameters: the production defaults cost ~50-100 ms per hash."""
    return PasswordHasher(time_cost=time_cost, memory_cost=8192, parallelism=1)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture(params=["sqlite", "postgresql"])
def accounts(request: pytest.FixtureRequest, root: Path) -> Iterator[Accounts]:
    """The accounts of a server root, in SQLite (the default) or in a fresh PostgreSQL schema."""
    db = request.getfixturevalue("pg_dsn") if request.param == "postgresql" else None
    acc = Accounts(root, hasher=fast_hasher(), db=db)
    yield acc
    acc.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- paths ---------------------------------------------------------------------------------------


def test_default_root_precedence() -> None:
    assert paths.default_root({"FERRY_ROOT": "/srv/f", "XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path("/srv/f")
    assert paths.default_root({"XDG_DATA_HOME": "/x", "HOME": "/h"}) == Path("/x/ferry")
    assert paths.default_root({"HOME": "/h"}) == Path("/h/.local/share/ferry")
    # The XDG spec says relative or empty values are to be ignored.
    assert paths.default_root({"XDG_DATA_HOME": "rel", "HOME": "/h"}) == Path("/h/.local/share/ferry")
    assert paths.default_root({"FERRY_ROOT": "", "HOME": "/h"}) == Path("/h/.local/share/ferry")


def test_client_home_precedence() -> None:
    assert paths.client_home({"FERRY_HOME": "/c", "XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/c")
    assert paths.client_home({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == Path("/x/ferry")
    assert paths.client_home({"HOME": "/h"}) == Path("/h/.config/ferry")
    assert paths.known_hosts_file(Path("/c")) == Path("/c/known_hosts")


def test_layout() -> None:
    r = Path("/r")
    assert paths.users_db(r) == Path("/r/users.db")
    assert paths.cert_file(r) == Path("/r/tls/cert.pem")
    assert paths.key_file(r) == Path("/r/tls/key.pem")
    assert paths.home_dir(r, "bob") == Path("/r/homes/bob")
    assert paths.log_file(r) == Path("/r/logs/ferry.log")
    assert paths.DEFAULT_PORT == 7373


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bob", "_svc", "a.b-c_1", "x" * 32, "a", "a1"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "Bob", "1abc", "-x", ".x", "a/b", "..", "../x", "x" * 33, "a b", "é", "bob\n", "a\x00"]
)
def test_invalid_names(accounts: Accounts, name: str) -> None:
    with pytest.raises(AccountError, match="invalid user name"):
        accounts.add(name, "pw")
    assert accounts.get(name) is None
    assert AccountError.exit_code == ExitCode.USAGE


# --- add / verify --------------------------------------------------------------------------------


def test_add_and_verify(accounts: Accounts, root: Path) -> None:
    user = accounts.add("bob", "s3cret", quota=1000)
    assert user == User("bob", root.absolute() / "homes" / "bob", 1000, False, None)
    assert user.home.is_dir()
    assert accounts.verify("bob", "s3cret") == user
    assert accounts.get("bob") == user


def test_wrong_password_and_unknown_user_same_error(accounts: Accounts) -> None:
    accounts.add("bob", "s3cret")
    errors = []
    for name, password in [("bob", "wrong"), ("alice", "s3cret"), ("Invalid!", "x"), ("bob", "")]:
        with pytest.raises(AuthError) as info:
            accounts.verify(name, password)
        errors.append(str(info.value))
    assert set(errors) == {"wrong user name or password"}


class CountingHasher(PasswordHasher):
    """Counts verify() calls, to prove unknown users cost an argon2 check too."""

    def __init__(self) -> None:
        super().__init__(time_cost=1, memory_cost=8192, parallelism=1)
        self.verifies = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifies += 1
        return super().verify(hash, password)


def test_unknown_user_does_the_same_argon2_work(root: Path) -> None:
    hasher = CountingHasher()
    with Accounts(root, hasher=hasher) as acc:
        acc.add("bob", "pw")
        for name in ("bob", "nobody", "NOT VALID"):
            before = hasher.verifies
            with pytest.raises(AuthError):
                acc.verify(name, "wrong")
            assert hasher.verifies == before + 1, name


def test_duplicate_user(accounts: Accounts) -> None:
    accounts.add("bob", "pw")
    with pytest.raises(UserExists, match="already exists"):
        accounts.add("bob", "other")
    assert accounts.verify("bob", "pw").name == "bob"  # the original is untouched


def test_empty_password_refused(accounts: Accounts) -> None:
    with pytest.raises(AccountError, match="empty"):
        accounts.add("bob", "")
    assert accounts.get("bob") is None


@pytest.mark.parametrize("quota", [-1, True, 1.5, "10G"])
def test_bad_quota_refused(accounts: Accounts, quota: Any) -> None:
    with pytest.raises(AccountError, match="quota"):
        accounts.add("bob", "pw", quota=quota)


def test_exec_allow_validation(accounts: Accounts) -> None:
    with pytest.raises(AccountError, match="list of program names"):
        accounts.add("bob", "pw", exec_allowed=True, exec_allow="ls")
    with pytest.raises(AccountError, match="invalid program"):
        accounts.add("bob", "pw", exec_allowed=True, exec_allow=["ls", ""])
    user = accounts.add("bob", "pw", exec_allowed=True, exec_allow=["ls", "cat", "ls"])
    assert user.exec_allow == ("ls", "cat")  # de-duplicated, order kept
    assert accounts.get("bob") == user


def test_may_exec() -> None:
    home = Path("/h")
    assert not User("a", home, None, False, None).may_exec("ls")
    assert User("a", home, None, True, None).may_exec("anything")
    limited = User("a", home, None, True, ("ls",))
    assert limited.may_exec("ls")
    assert not limited.may_exec("/tmp/evil/ls")  # exact match only
    assert not limited.may_exec("cat")


# --- delete / passwd / modify / list -------------------------------------------------------------


def test_delete_keeps_home_by_default(accounts: Accounts) -> None:
    user = accounts.add("bob", "pw")
    (user.home / "file.txt").write_text("data")
    accounts.delete("bob")
    assert accounts.get("bob") is None
    assert (user.home / "file.txt").read_text() == "data"
    with pytest.raises(AuthError):
        accounts.verify("bob", "pw")
    # Re-adding reuses the kept folder.
    assert accounts.add("bob", "pw2").home == user.home
    assert (user.home / "file.txt").exists()


def test_delete_remove_home(accounts: Accounts) -> None:
    user = accounts.add("bob", "pw")
    (user.home / "sub").mkdir()
    (user.home / "sub" / "f").write_text("x")
    accounts.delete("bob", remove_home=True)
    assert not user.home.exists()
    assert accounts.list() == []


def test_delete_unknown(accounts: Accounts) -> None:
    with pytest.raises(NoSuchUser, match="no such user"):
        accounts.delete("nobody")
    with pytest.raises(AccountError):
        accounts.delete("../etc", remove_home=True)


def test_set_password(accounts: Accounts) -> None:
    accounts.add("bob", "old")
    accounts.set_password("bob", "new")
    assert accounts.verify("bob", "new").name == "bob"
    with pytest.raises(AuthError):
        accounts.verify("bob", "old")
    with pytest.raises(NoSuchUser):
        accounts.set_password("nobody", "x")
    with pytest.raises(AccountError):
        accounts.set_password("bob", "")


def test_modify(accounts: Accounts) -> None:
    accounts.add("bob", "pw", quota=10)
    u = accounts.modify("bob", exec_allowed=True)
    assert (u.quota, u.exec_allowed, u.exec_allow) == (10, True, None)  # quota unchanged
    u = accounts.modify("bob", quota=None, exec_allow=["ls"])
    assert (u.quota, u.exec_allowed, u.exec_allow) == (None, True, ("ls",))
    u = accounts.modify("bob", exec_allow=None, quota=5)
    assert (u.quota, u.exec_allowed, u.exec_allow) == (5, True, None)
    u = accounts.modify("bob")  # nothing to change: returns the user as is
    assert u == accounts.get("bob")
    assert accounts.modify("bob", quota=UNCHANGED, exec_allowed=False).exec_allowed is False
    with pytest.raises(NoSuchUser):
        accounts.modify("nobody", quota=1)
    with pytest.raises(AccountError):
        accounts.modify("bob", quota=-5)
    assert accounts.verify("bob", "pw").quota == 5  # password untouched by modify


def test_list_sorted(accounts: Accounts) -> None:
    for name in ("carol", "alice", "bob"):
        accounts.add(name, "pw")
    assert [u.name for u in accounts.list()] == ["alice", "bob", "carol"]


def test_list_is_in_byte_order_on_every_engine(accounts: Accounts) -> None:
    """A locale's collation would ignore the punctuation (PostgreSQL's default): the same list
    must come out of both engines."""
    names = ["ab", "a_b", "a.c", "a-d", "aa", "_z"]
    for name in names:
        accounts.add(name, "pw")
    assert [u.name for u in accounts.list()] == sorted(names)


def test_changes_visible_to_another_instance(root: Path) -> None:
    """The server's Accounts must see `ferry user ...` changes made through another connection."""
    with Accounts(root, hasher=fast_hasher()) as server, Accounts(root, hasher=fast_hasher()) as cli:
        assert server.get("bob") is None
        cli.add("bob", "pw")
        assert server.verify("bob", "pw").name == "bob"
        cli.set_password("bob", "pw2")
        with pytest.raises(AuthError):
            server.verify("bob", "pw")
        cli.delete("bob")
        assert server.get("bob") is None


# --- first user ----------------------------------------------------------------------------------


def test_ensure_first_user(accounts: Accounts) -> None:
    created = accounts.ensure_first_user()
    assert created is not None
    user, password = created
    assert user.name == FIRST_USER
    assert len(password) >= 20
    assert accounts.verify(FIRST_USER, password) == user
    assert user.home.is_dir()
    assert accounts.ensure_first_user() is None


def test_ensure_first_user_not_when_users_exist(accounts: Accounts) -> None:
    accounts.add("bob", "pw")
    assert accounts.ensure_first_user() is None
    assert [u.name for u in accounts.list()] == ["bob"]


def test_ensure_first_user_passwords_are_random(tmp_path: Path) -> None:
    passwords = set()
    for i in range(3):
        with Accounts(tmp_path / str(i), hasher=fast_hasher()) as acc:
            created = acc.ensure_first_user()
            assert created is not None
            passwords.add(created[1])
    assert len(passwords) == 3


# --- storage -------------------------------------------------------------------------------------


def test_file_modes_under_permissive_umask(root: Path) -> None:
    old = os.umask(0)
    try:
        with Accounts(root, hasher=fast_hasher()) as acc:
            user = acc.add("bob", "pw")
            assert mode(paths.users_db(root)) == 0o600
            wal = paths.users_db(root).with_name("users.db-wal")
            if wal.exists():
                assert mode(wal) == 0o600
            assert mode(root) == 0o700
            assert mode(paths.homes_dir(root)) == 0o700
            assert mode(user.home) == 0o700
    finally:
        os.umask(old)


def test_existing_db_mode_is_tightened(root: Path) -> None:
    Accounts(root, hasher=fast_hasher()).close()
    os.chmod(paths.users_db(root), 0o644)
    Accounts(root, hasher=fast_hasher()).close()
    assert mode(paths.users_db(root)) == 0o600


def test_persistence_and_wal(root: Path) -> None:
    with Accounts(root, hasher=fast_hasher()) as acc:
        acc.add("bob", "pw", quota=7, exec_allowed=True, exec_allow=["ls"])
        conn = sqlite3.connect(paths.users_db(root))
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    with Accounts(root, hasher=fast_hasher()) as acc:
        assert acc.verify("bob", "pw") == User(
            "bob", paths.home_dir(root.absolute(), "bob"), 7, True, ("ls",)
        )


def test_rehash_on_parameter_change(root: Path) -> None:
    def stored_hash() -> str:
        conn = sqlite3.connect(paths.users_db(root))
        try:
            return str(conn.execute("SELECT hash FROM users WHERE name='bob'").fetchone()[0])
        finally:
            conn.close()

    with Accounts(root, hasher=fast_hasher(time_cost=1)) as acc:
        acc.add("bob", "pw")
    assert "t=1," in stored_hash() and stored_hash().startswith("$argon2id$")
    with Accounts(root, hasher=fast_hasher(time_cost=2)) as acc:
        acc.verify("bob", "pw")
    assert "t=2," in stored_hash()
    with Accounts(root, hasher=fast_hasher(time_cost=2)) as acc:
        assert acc.verify("bob", "pw").name == "bob"


def test_corrupt_hash_is_an_auth_failure(accounts: Accounts) -> None:
    accounts.add("bob", "pw")
    with accounts.writing() as conn:
        conn.execute("UPDATE users SET hash = 'garbage' WHERE name = ?", ("bob",))
    with pytest.raises(AuthError):
        accounts.verify("bob", "pw")


def test_default_hasher_is_argon2id_with_owasp_parameters(root: Path) -> None:
    from argon2 import Type

    with Accounts(root) as acc:
        hasher = acc._hasher
    assert (hasher.time_cost, hasher.memory_cost, hasher.parallelism) == (2, 19456, 1)
    assert hasher.type is Type.ID


def test_not_a_database(root: Path) -> None:
    root.mkdir()
    paths.users_db(root).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FerryError, match=r"users\.db"):
        Accounts(root, hasher=fast_hasher())


def test_close(root: Path) -> None:
    acc = Accounts(root, hasher=fast_hasher())
    acc.close()
    acc.close()  # idempotent
    with pytest.raises(FerryError, match="closed"):
        acc.list()


def test_concurrent_verify_from_threads(accounts: Accounts) -> None:
    """The server verifies logins in a thread pool: one shared connection must cope."""
    for i in range(4):
        accounts.add(f"u{i}", f"pw{i}")
    barrier = threading.Barrier(8, timeout=10)

    def login(i: int) -> str:
        barrier.wait()
        name = f"u{i % 4}"
        if i % 2:
            return accounts.verify(name, f"pw{i % 4}").name
        try:
            accounts.verify(name, "wrong")
        except AuthError:
            return "denied"
        return "accepted?!"

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(login, range(8), timeout=30))
    assert results == ["denied", "u1", "denied", "u3", "denied", "u1", "denied", "u3"]


def test_newer_schema_is_refused(root: Path) -> None:
    Accounts(root, hasher=fast_hasher()).close()
    conn = sqlite3.connect(paths.users_db(root))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(FerryError, match="newer ferry"):
        Accounts(root, hasher=fast_hasher())
