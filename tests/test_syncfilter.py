"""The sync filter rules against a table of gitignore cases (the same code runs on client and server;
test_sync_cli checks that both sides pick the same files over real sockets)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ferry.errors import UsageError
from ferry.syncfilter import Filter, build_rules

FILES = ["a.log", "keep.log", "src/x.c", "src/x.h", "src/deep/y.c", "build/out.o", "sub/build/z", "top.txt",
         "sub/top.txt", "doc/a/b/c.md", "doc/c.md", "name with space", "#hash", "!bang", "node_modules/m/i.js"]


def included(rules: list[str], paths: list[str] = FILES) -> set[str]:
    """The paths a top-down walk keeps: an excluded folder hides everything in it."""
    f = Filter(rules)
    out = set()
    for p in paths:
        parts = p.split("/")
        if any(f.excluded("/".join(parts[: i + 1]), True) for i in range(len(parts) - 1)):
            continue
        if not f.excluded(p, False):
            out.add(p)
    return out


ALL = set(FILES)
TABLE = [
    ([], ALL),
    (["*.log"], ALL - {"a.log", "keep.log"}),
    (["*.log", "!keep.log"], ALL - {"a.log"}),
    (["!keep.log", "*.log"], ALL - {"a.log", "keep.log"}),  # the last matching rule decides
    (["build/"], ALL - {"build/out.o", "sub/build/z"}),  # a folder at any depth
    (["/build/"], ALL - {"build/out.o"}),  # anchored at the root
    (["top.txt"], ALL - {"top.txt", "sub/top.txt"}),  # a name at any depth
    (["/top.txt"], ALL - {"top.txt"}),
    (["sub/top.txt"], ALL - {"sub/top.txt"}),  # a slash inside: a path from the root
    (["doc/**/c.md"], ALL - {"doc/a/b/c.md", "doc/c.md"}),  # ** spans zero or more folders
    (["doc/**"], ALL - {"doc/a/b/c.md", "doc/c.md"}),
    (["**/c.md"], ALL - {"doc/a/b/c.md", "doc/c.md"}),
    (["src/*"], ALL - {"src/x.c", "src/x.h", "src/deep/y.c"}),
    (["*", "!*/", "!*.c"], {"src/x.c", "src/deep/y.c"}),  # only C files, folders kept open
    (["*", "!*.c"], set()),  # '*' excludes folders too: their files cannot be re-included
    (["src/", "!src/x.c"], ALL - {"src/x.c", "src/x.h", "src/deep/y.c"}),  # as in git: parent excluded
    (["x.?"], ALL - {"src/x.c", "src/x.h"}),
    (["x.[ch]", "!x.h"], ALL - {"src/x.c"}),
    (["name with space"], ALL - {"name with space"}),
    (["\\#hash", "\\!bang"], ALL - {"#hash", "!bang"}),  # escaped specials are names
    (["# a comment", "", "node_modules"], ALL - {"node_modules/m/i.js"}),
    (["deep"], ALL - {"src/deep/y.c"}),  # a name matches folders as well as files
    (["deep/"], ALL - {"src/deep/y.c"}),
    (["y.c/"], ALL),  # folder-only rules never match files
]


@pytest.mark.parametrize(("rules", "expected"), TABLE, ids=[" ".join(r) or "none" for r, _ in TABLE])
def test_filter_table(rules: list[str], expected: set[str]) -> None:
    assert included(rules) == expected


def test_command_line_order_includes_win() -> None:
    rules = build_rules(["# from a file", "*.o"], exclude=["*"], include=["*/", "*.c"])
    assert rules == ["# from a file", "*.o", "*", "!*/", "!*.c"]
    assert included(rules) == {"src/x.c", "src/deep/y.c"}


def test_empty_filter_and_limits() -> None:
    assert not Filter([]) and not Filter(["", "# only comments"])
    assert Filter(["x"])
    with pytest.raises(UsageError):
        Filter(["x"] * 5000)


def test_table_agrees_with_git(tmp_path: Path) -> None:
    """The same table through git itself (``git ls-files --others --exclude-standard``): ferry's
    filters claim gitignore's semantics, so git is the referee."""
    git = shutil.which("git")
    assert git, "this test needs git (apt-get install git)"
    for n, (rules, expected) in enumerate(TABLE):
        repo = tmp_path / f"r{n}"
        subprocess.run([git, "init", "-q", str(repo)], check=True)
        for f in FILES:
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            (repo / f).write_text("x")
        (repo / ".git" / "info" / "exclude").write_text("\n".join(rules) + "\n")
        out = subprocess.run(
            [git, "-C", str(repo), "-c", "core.quotePath=false", "ls-files", "-z", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
        assert {p.decode() for p in out.split(b"\0") if p} == expected, rules
