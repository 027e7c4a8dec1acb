"""`ferry user key ...`, `ferry user token ...`, `--disable`, and the accounts schema migration."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from cli_inproc import run_inproc
from ferry.cli.user_creds import parse_expiry
from ferry.errors import UsageError
from ferry.server.accounts import Accounts
from ferry.server.accounts_schema import SCHEMA_VERSION
from ferry.server.credentials import Credentials, token_id
from ferry_server import CHEAP_HASHER, PASSWORD
from login_support import KeySet


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    with Accounts(root, hasher=CHEAP_HASHER) as acc:
        acc.add("ann", PASSWORD)
    return root


def user(root: Path, env: dict[str, str], *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    r = run_inproc(["user", *args, "--root", str(root)], env, input=stdin)
    return r.returncode, r.stdout, r.stderr


def test_key_add_list_del(root: Path, keys: KeySet, ferry_env: dict[str, str], tmp_path: Path) -> None:
    rc, out, err = user(root, ferry_env, "key", "add", "ann", str(keys.ed25519.path) + ".pub")
    assert rc == 0, err
    assert out.strip() == f"added {keys.ed25519.fingerprint} ssh-ed25519 id_ed25519@test"
    # A whole authorized_keys file from standard input: comments and blank lines skipped, a key
    # already there reported, not doubled.
    authorized = f"# my keys\n\n{keys.ecdsa.pub}{keys.rsa.pub}{keys.ed25519.pub}"
    rc, out, err = user(root, ferry_env, "key", "add", "ann", "-", stdin=authorized)
    assert rc == 0, err
    assert f"added {keys.ecdsa.fingerprint} ecdsa-sha2-nistp384" in out
    assert f"added {keys.rsa.fingerprint} ssh-rsa" in out
    assert f"already there: {keys.ed25519.fingerprint}" in out
    rc, out, _ = user(root, ferry_env, "key", "list", "ann")
    listed = {line.split()[0] for line in out.splitlines()}
    # The fingerprints are the ones ssh-keygen -l prints.
    assert listed == {keys.ed25519.fingerprint, keys.ecdsa.fingerprint, keys.rsa.fingerprint}
    rc, out, _ = user(root, ferry_env, "key", "list", "ann", "--json")
    rows = json.loads(out)
    assert {r["type"] for r in rows} == {"ssh-ed25519", "ecdsa-sha2-nistp384", "ssh-rsa"}
    assert all(r["line"].split()[:2] == next(
        k.pub.split()[:2] for k in (keys.ed25519, keys.ecdsa, keys.rsa) if k.fingerprint == r["fingerprint"]
    ) for r in rows)  # fmt: skip
    rc, out, err = user(root, ferry_env, "key", "del", "ann", keys.rsa.fingerprint)
    assert rc == 0 and out.startswith(f"removed {keys.rsa.fingerprint}"), err
    rc, _, err = user(root, ferry_env, "key", "del", "ann", keys.rsa.fingerprint)
    assert rc == 2 and "has no key" in err


def test_bad_key_lines_add_nothing_and_name_their_lines(
    root: Path, keys: KeySet, ferry_env: dict[str, str]
) -> None:
    text = (
        keys.ed25519.pub
        + f'from="10.0.0.1",no-pty {keys.ecdsa.pub}'
        + keys.rsa1024.pub
        + "ssh-dss AAAAB3NzaC1kc3MAAACBAP== old@dsa\n"
        + "ssh-ed25519 not-base64!! x\n"
    )
    rc, out, err = user(root, ferry_env, "key", "add", "ann", "-", stdin=text)
    assert rc == 2 and out == ""
    assert "no key was added" in err
    assert "standard input, line 2: the line starts with authorized_keys options" in err
    assert "line 3: RSA key of 1024 bits refused" in err
    assert "line 4: unsupported key type 'ssh-dss'" in err
    assert "line 5: the key is not valid base64" in err
    with Accounts(root, hasher=CHEAP_HASHER) as acc:
        assert Credentials(acc).keys("ann") == []
    rc, _, err = user(root, ferry_env, "key", "add", "nobody", "-", stdin=keys.ed25519.pub)
    assert rc == 2 and "no such user" in err
    rc, _, err = user(root, ferry_env, "key", "add", "ann", "-", stdin="# nothing\n")
    assert rc == 2 and "no public key found" in err


def test_token_add_list_del(root: Path, ferry_env: dict[str, str]) -> None:
    rc, out, err = user(root, ferry_env, "token", "add", "ann", "--read-only", "--expires", "30d", "--label", "ci job")
    assert rc == 0, err
    token = out.strip()
    ident = token_id(token)
    assert ident is not None and token.startswith("fyt_")
    assert f"token {ident} for ann: read-only" in err and "shown only this once" in err
    rc, out, _ = user(root, ferry_env, "token", "list", "ann")
    assert ident in out and "read-only" in out and "ci job" in out
    assert token not in out  # the secret is never shown again
    rc, out, _ = user(root, ferry_env, "token", "list", "ann", "--json")
    (row,) = json.loads(out)
    assert row["read_only"] and not row["expired"] and abs(row["expires"] - (time.time() + 30 * 86400)) < 120
    # Only a hash is stored.
    with sqlite3.connect(root / "users.db") as db:
        dump = "\n".join(db.iterdump())
    assert token.split("_", 2)[2] not in dump
    rc, out, err = user(root, ferry_env, "token", "del", "ann", ident)
    assert rc == 0 and f"revoked token {ident}" in out, err
    rc, _, err = user(root, ferry_env, "token", "del", "ann", ident)
    assert rc == 2 and "has no token" in err
    rc, _, err = user(root, ferry_env, "token", "add", "ann", "--expires", "soon")
    assert rc == 2 and "invalid expiry 'soon'" in err


def test_parse_expiry() -> None:
    now = 1_800_000_000.0
    assert parse_expiry("30d", now) == int(now) + 30 * 86400
    assert parse_expiry("12h", now) == int(now) + 12 * 3600
    assert parse_expiry("2w", now) == int(now) + 14 * 86400
    assert parse_expiry("never", now) is None
    assert parse_expiry("2030-01-31", now) == 1896048000
    for bad in ("0d", "-1d", "3x", "2020-01-01", ""):
        with pytest.raises(UsageError):
            parse_expiry(bad, now)


def test_disable_and_enable(root: Path, ferry_env: dict[str, str]) -> None:
    rc, out, _ = user(root, ferry_env, "mod", "ann", "--disable")
    assert rc == 0 and "disabled: cannot log in" in out
    rc, out, _ = user(root, ferry_env, "list", "--json")
    assert json.loads(out)[0]["disabled"] is True
    rc, out, _ = user(root, ferry_env, "mod", "ann", "--enable")
    assert rc == 0 and "disabled" not in out


def test_deleting_a_user_deletes_its_keys_and_tokens(root: Path, keys: KeySet) -> None:
    with Accounts(root, hasher=CHEAP_HASHER) as acc:
        creds = Credentials(acc)
        creds.add_keys("ann", keys.ed25519.pub)
        _, token = creds.add_token("ann")
        acc.delete("ann")
        acc.add("ann", "another password")  # the same name again: a new account
        assert creds.keys("ann") == []
        assert creds.tokens("ann") == []
        assert creds.login_token(token) is None


def test_version_1_database_is_migrated(tmp_path: Path, keys: KeySet) -> None:
    root = tmp_path / "old"
    root.mkdir()
    with sqlite3.connect(root / "users.db") as db:  # exactly what ferry wrote at schema version 1
        db.execute(
            """CREATE TABLE users (
                name TEXT PRIMARY KEY NOT NULL, hash TEXT NOT NULL, quota INTEGER,
                exec_allowed INTEGER NOT NULL DEFAULT 0, exec_allow TEXT,
                created INTEGER NOT NULL DEFAULT (strftime('%s', 'now'))) WITHOUT ROWID"""
        )
        db.execute(
            "INSERT INTO users (name, hash, quota, exec_allowed) VALUES (?, ?, ?, ?)",
            ("old", CHEAP_HASHER.hash(PASSWORD), 1024, 1),
        )
        db.execute("PRAGMA user_version = 1")
    db.close()
    with Accounts(root, hasher=CHEAP_HASHER) as acc:
        user_ = acc.verify("old", PASSWORD)
        assert (user_.quota, user_.exec_allowed, user_.disabled, user_.rev) == (1024, True, False, 0)
        Credentials(acc).add_keys("old", keys.ed25519.pub)
        acc.set_password("old", "new one")
        assert acc.get("old").pw_gen == 1  # type: ignore[union-attr]
    with sqlite3.connect(root / "users.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
