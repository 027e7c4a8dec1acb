"""The object backend (``ferry serve --store s3://... --db postgresql://...``) as a client sees it:
files in the real SeaweedFS, namespace and accounts in PostgreSQL (docs/scale-out.md).

Behaviour both backends share is tested once over both (``pytest.mark.backends`` and the matrix,
tests/README.md); here is what is the object backend's own: the refusals it gives where it differs.
"""

from __future__ import annotations

from typing import Any

import pytest

from ferry.errors import PermissionDenied

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
