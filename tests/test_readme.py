"""The README's examples work as printed, against a real server with a brand-new account."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ferry_server import ServerThread

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(after: str, lang: str) -> str:
    """The first fenced ``lang`` block after the heading ``after``."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index(after) :]
    found = re.search(rf"```{lang}\n(.*?)```", section, re.S)
    assert found, f"no {lang} block after {after!r} in the README"
    return found.group(1)


def test_api_example_works_on_a_new_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    srv = ServerThread(tmp_path / "root").start()
    try:
        # The first user a new server creates, as a reader of the README has it: an empty home.
        assert srv.banner.first_user is not None
        name, password = srv.banner.first_user
        home = srv.root / "homes" / name
        assert name == "ferry" and not any(home.iterdir())
        work = tmp_path / "work"
        work.mkdir()
        (work / "report.pdf").write_bytes(b"%PDF-1.4 not really\n" * 1000)
        monkeypatch.chdir(work)
        monkeypatch.setenv("FERRY_HOME", str(tmp_path / "client-home"))
        monkeypatch.setenv("FERRY_PASSWORD", password)  # as the README's client section exports it
        code = readme_block("## Python API", "python")
        # The one change: the test server's port (the README uses the default port).
        assert '"ferry@127.0.0.1"' in code
        code = code.replace('"ferry@127.0.0.1"', f'"ferry@127.0.0.1:{srv.port}"')
        exec(compile(code, "README.md", "exec"), {})
        assert (home / "inbox" / "report.pdf").read_bytes() == (work / "report.pdf").read_bytes()
        assert "['report.pdf']" in capsys.readouterr().out
    finally:
        srv.stop()


def test_license_and_distribution_name_agree_with_the_readme() -> None:
    import tomllib

    root = README.parent
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (root / "LICENSE").read_text(encoding="utf-8").startswith("MIT License\n")
    # "ferry" on the package index is someone else's project: installing it must not be suggested.
    name = project["name"]
    assert name != "ferry"
    assert f"pip install {name} " in README.read_text(encoding="utf-8")
    # the command keeps its name; its entry looks for a resident connection first (ferry.resident.thin)
    assert project["scripts"] == {"ferry": "ferry.resident.thin:main"}
