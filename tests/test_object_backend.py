"""The object backend (``ferry serve --store s3://... --db postgresql://...``) as a client sees it:
files in the real SeaweedFS, namespace and accounts in PostgreSQL (docs/scale-out.md).

Behaviour both backends share is tested once over both (``pytest.mark.backends`` and the matrix,
tests/README.md); here is what is the object backend's own: the refusals it gives where it differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cli_inproc import run_cli
from components import run_sql
from conformance import Cell, open_client
from ferry.errors import PathRefused, PermissionDenied
from ferry_server import PASSWORD, ServerThread

pytestmark = [pytest.mark.cell(backend="object"), pytest.mark.timeout(60)]


def test_namespace_operations(client: Any) -> None:
    c = client
    c.mkdir("a/b/c", parents=True)
    c.mkdir("a/b/c", parents=True)  # exists: fine with parents
    assert [e.name for e in c.listdir("a", recursive=True)] == ["b", "b/c"]
    c.rename("a/b", "a/x")
    assert [e.name for e in c.listdir("a")] == ["x"]
    assert c.stat("a/x/c").kind == "dir"
    assert [e.name for e in c.glob("a/*/c")] == ["a/x/c"]
    df = c.df()
    assert df.quota is None and df.free > 0 and df.used == 0
    c.remove("a", recursive=True)
    assert c.listdir("") == []


def test_commands_are_refused_clearly(client: Any) -> None:
    with pytest.raises(PermissionDenied, match="object store"):
        client.run(["true"])
    assert client.ping() < 5  # the session goes on


def test_user_del_remove_home_empties_the_users_namespace(
    cell: Cell, server: ServerThread, client: Any, tmp_path: Path
) -> None:
    """``ferry user del NAME --db URL --remove-home`` reaches the files of the object backend (they live in
    the accounts' database): the account goes, then everything it held; other users keep theirs."""
    server.add_user("bob")
    with open_client(cell, server, tmp_path, user="bob") as bob:
        bob.mkdir("kept")
    client.mkdir("a/b", parents=True)
    dsn = server.config.db
    assert dsn is not None
    r = run_cli(["user", "del", "alice", "--db", dsn, "--remove-home"], env={"FERRY_DB": None})
    assert r.code == 0 and "deleted user alice" in r.stdout and "from the object store" in r.stdout, r.stdout + r.stderr
    left = "SELECT count(*) FROM nodes n JOIN owners o ON o.id = n.owner_id WHERE o.name = '{}'"
    assert run_sql(left.format("alice"), dsn) == [1]  # the empty home only
    assert run_sql(left.format("bob"), dsn) == [2]
    r = run_cli(["user", "del", "alice", "--db", dsn, "--remove-home"], env={"FERRY_DB": None})
    assert r.code != 0 and "no such user" in r.stderr, r.stderr



def test_df_says_unlimited_where_the_store_has_no_free_space_to_measure(server: ServerThread, tmp_path: Path) -> None:
    """An object store has no free space to read: ``df`` shows "unlimited" for it (and what the quota
    leaves as available), never a made-up number."""
    server.add_user("qu", quota=1 << 20)
    env = {"FERRY_HOME": str(tmp_path / "ferry-home"), "FERRY_PASSWORD": PASSWORD, "FERRY_USER": None}
    r = run_cli(["df", "-P", str(server.port), "qu@127.0.0.1:"], env=env)
    assert r.code == 0, r
    head, values = r.stdout.splitlines()[:2]
    assert head.split() == ["used", "partial", "quota", "available", "server", "free", "files"]
    assert values.split() == ["0", "B", "0", "B", "1.0", "MiB", "1.0", "MiB", "unlimited", "0"], values
    r = run_cli(["df", "-P", str(server.port), "alice@127.0.0.1:"], env={**env, "FERRY_PASSWORD": PASSWORD})
    assert r.stdout.splitlines()[1].split()[4:6] == ["unlimited", "unlimited"], r.stdout


def test_paths_that_leave_the_home_are_refused(client: Any, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for bad in ["../x", "/etc/passwd", "a/../../x", "a/./b", ""]:
        with pytest.raises(PathRefused):
            client.put(src, bad) if bad else client.stat("a//b")
        with pytest.raises(PathRefused):
            client.get(bad or "a//b", tmp_path / "got")
    assert not (tmp_path / "got").exists()
    assert client.listdir("") == []
