"""The server's glob rules (ferry.server.glob), on a real folder through a real Jail."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import PathRefused, RemoteError
from ferry.server import glob as server_glob
from ferry.server.glob import expand, matches
from ferry.server.jail import Jail
from ferry.wire.codes import ErrorCode


def names(jail: Jail, pattern: str) -> list[str]:
    return [path for path, _ in expand(jail, pattern, lambda: None)]


def test_rules(tmp_path: Path) -> None:
    for rel in ("a.log", "b.log", "B.log", ".h.log", "c.txt", "d/x.log", "d/y.txt", "e/x.log", "[x].log"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / ".dot").mkdir()
    (tmp_path / ".dot" / "x.log").write_text("dot")
    (tmp_path / ".a.log.ferry-part-0123456789abcdef").write_text("partial")
    with Jail(tmp_path) as jail:
        assert names(jail, "*.log") == ["B.log", "[x].log", "a.log", "b.log"]  # sorted, case-sensitive
        assert names(jail, "?.log") == ["B.log", "a.log", "b.log"]
        assert names(jail, "[ab].log") == ["a.log", "b.log"]
        assert names(jail, "[!ab].log") == ["B.log"]
        assert names(jail, "[[]x].log") == ["[x].log"]  # a literal '[' written as a set
        assert names(jail, ".*") == [".dot", ".h.log"]  # hidden names need the leading '.'; no partials
        assert names(jail, "*/x.log") == ["d/x.log", "e/x.log"]  # not .dot/x.log
        assert names(jail, ".dot/*") == [".dot/x.log"]
        assert names(jail, "**/x.log") == ["d/x.log", "e/x.log"]  # ** is *: one level
        assert names(jail, "d/y.txt") == ["d/y.txt"] and names(jail, "d/nothing") == []
        assert names(jail, "c.txt/*") == []  # a file is not entered
        with pytest.raises(PathRefused):
            names(jail, "../*")
        with pytest.raises(PathRefused):
            names(jail, "/etc/*")


def test_too_many_matches_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_text("x")
    monkeypatch.setattr(server_glob, "MAX_MATCHES", 4)
    with Jail(tmp_path) as jail, pytest.raises(RemoteError) as err:
        names(jail, "f*")
    assert err.value.code == ErrorCode.BAD_REQUEST and "narrow the pattern" in str(err.value)


def test_matches() -> None:
    assert matches("*", "a") and not matches("*", ".a") and matches(".*", ".a")
    assert not matches("a*", "A") and matches("a?c", "abc") and not matches("a?c", "ac")
