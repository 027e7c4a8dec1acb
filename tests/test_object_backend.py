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
from ferry.errors import PermissionDenied
from ferry_server import ServerThread

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
