"""``ferry user ... --db URL`` (and ``$FERRY_DB``): every user command on the accounts several servers
share in PostgreSQL (real database; in-process runs of the real command line, tests/cli_inproc.py).
The servers' side, and ``ferry user --db`` from another process, are in tests/test_serve_shared.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_inproc import CliResult, run_cli
from components import run_sql
from login_support import make_key


def user(dsn: str | None, *args: str, stdin: str | None = None, env: dict[str, str | None] | None = None) -> CliResult:
    argv = ["user", *args] + (["--db", dsn] if dsn is not None else [])
    return run_cli(argv, input=stdin, env={"FERRY_DB": None, **(env or {})})


def test_every_user_command_works_on_the_shared_database(pg_dsn: str, tmp_path: Path) -> None:
    key = make_key(tmp_path, "id", "ed25519")
    r = user(pg_dsn, "list")
    assert r.code == 2 and "no ferry accounts in the database" in r.stderr, r.stderr  # nothing made yet
    assert run_sql("SELECT to_regclass('users') IS NULL", pg_dsn) == [True]

    r = user(pg_dsn, "add", "ann", "--password-stdin", "--quota", "1G", stdin="pw one\n")
    assert r.code == 0, r.stderr
    assert "created the ferry accounts in the database postgresql://" in r.stdout
    assert "home homes/ann under each server's root" in r.stdout
    r = user(pg_dsn, "add", "ann", "--password-stdin", stdin="x\n")
    assert r.code != 0 and "already exists (accounts database postgresql://" in r.stderr, r.stderr
    # $FERRY_DB instead of --db, as for ferry serve.
    r = user(None, "add", "bob", "--password-stdin", "--exec", stdin="pw two\n", env={"FERRY_DB": pg_dsn})
    assert r.code == 0 and "created the ferry accounts" not in r.stdout, r.stdout + r.stderr

    listed = json.loads(user(pg_dsn, "list", "--json").stdout)
    assert [(u["name"], u["home"], u["quota"], u["exec_allowed"]) for u in listed] == [
        ("ann", "homes/ann", 1 << 30, False),
        ("bob", "homes/bob", None, True),
    ]
    assert user(pg_dsn, "passwd", "ann", "--password-stdin", stdin="pw three\n").code == 0
    r = user(pg_dsn, "mod", "ann", "--disable", "--quota", "none")
    assert r.code == 0 and "quota unlimited" in r.stdout and "disabled" in r.stdout, r.stdout

    r = user(pg_dsn, "key", "add", "ann", str(key.path) + ".pub")
    assert r.code == 0 and key.fingerprint in r.stdout, r.stderr
    assert key.fingerprint in user(pg_dsn, "key", "list", "ann").stdout
    r = user(pg_dsn, "token", "add", "ann", "--read-only", "--label", "ci")
    assert r.code == 0 and r.stdout.startswith("fyt_"), r.stderr
    tokens = json.loads(user(pg_dsn, "token", "list", "ann", "--json").stdout)
    assert [(t["read_only"], t["label"]) for t in tokens] == [(True, "ci")]
    assert user(pg_dsn, "token", "del", "ann", tokens[0]["id"]).code == 0
    assert user(pg_dsn, "key", "del", "ann", key.fingerprint).code == 0

    r = user(pg_dsn, "del", "ann", "--remove-home")
    assert r.code == 2 and "each server keeps the homes" in r.stderr, r.stderr
    assert "ann" in user(pg_dsn, "list").stdout  # refused: nothing was deleted
    r = user(pg_dsn, "del", "ann")
    assert r.code == 0 and "servers keep its home folder, homes/ann" in r.stdout, r.stdout
    assert [u["name"] for u in json.loads(user(pg_dsn, "list", "--json").stdout)] == ["bob"]
    assert run_sql("SELECT count(*) FROM keys", pg_dsn) == [0] and run_sql("SELECT count(*) FROM tokens", pg_dsn) == [0]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["list", "--db", "mysql://u@h/db"], {}, "invalid database URL 'mysql://u@h/db'"),
        (["list", "--db", "postgresql://u@127.0.0.1/db", "--root", "/tmp"], {}, "not both"),
        (["list", "--root", "/tmp"], {"FERRY_DB": "postgresql://u@127.0.0.1/db"}, "($FERRY_DB is set)"),
    ],
)
def test_where_the_accounts_are_must_be_clear(args: list[str], env: dict[str, str | None], message: str) -> None:
    r = run_cli(["user", *args], env=env)
    assert r.code == 2 and message in r.stderr, r.stderr


def test_an_unreachable_database_is_named_without_its_password() -> None:
    from conftest import free_port

    r = run_cli(["user", "list", "--db", f"postgresql://ann:s3cret@127.0.0.1:{free_port()}/ferry"], env={"FERRY_DB": None})
    assert r.code == 1 and "the accounts database postgresql://ann@127.0.0.1:" in r.stderr, r.stderr
    assert "unreachable" in r.stderr and "s3cret" not in r.stderr
