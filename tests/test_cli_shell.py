"""``ferry shell``: scripted on stdin, interactively under a PTY (completion, history), and ``--pty``."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from ferry.cli.shell import HOME_LIMIT, resolve, split_flags
from ferry.errors import UsageError
from serve_process import ServeProcess, run_ferry


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("shell")
    env = dict(os.environ, FERRY_HOME=str(tmp / "client-home"), PYTHONUNBUFFERED="1")
    srv = ServeProcess(tmp / "root", env).start()
    env["FERRY_PASSWORD"] = srv.password or ""
    # Pin the certificate now, so no test sees the first-connection notice on its stderr.
    assert "first connection" in run_ferry(["df", f"ferry@127.0.0.1:{srv.port}"], env).stderr
    try:
        yield srv, env
    finally:
        assert srv.stop() == 0


def target(srv: ServeProcess) -> str:
    return f"ferry@127.0.0.1:{srv.port}"


def test_resolve_is_lexical_and_stays_in_the_home() -> None:
    assert resolve("", "") == "" and resolve("a/b", "") == "a/b"
    assert resolve("a", "b/./c//") == "a/b/c"
    assert resolve("a/b", "..") == "a" and resolve("a/b", "../../x") == "x"
    assert resolve("a/b", "/x/y") == "x/y" and resolve("a", "/") == ""
    for cwd, path in [("", ".."), ("a", "../.."), ("", "/.."), ("a/b", "../../../etc")]:
        with pytest.raises(UsageError, match=HOME_LIMIT):
            resolve(cwd, path)
    assert split_flags(["-rp", "x", "-y"], "rp") == ({"r", "p"}, ["x", "-y"])
    assert split_flags(["--", "-x"], "r") == (set(), ["-x"])
    with pytest.raises(UsageError, match="-z"):
        split_flags(["-z"], "r")


@pytest.mark.timeout(60)
def test_commands_from_stdin(served: tuple[ServeProcess, dict[str, str]], tmp_path: Path) -> None:
    srv, env = served
    (tmp_path / "local.txt").write_text("from the shell\n")
    (tmp_path / "tree" / "in").mkdir(parents=True)
    (tmp_path / "tree" / "in" / "leaf").write_text("leaf")
    script = "\n".join(
        [
            "pwd",
            "mkdir -p work/deep",
            "cd work",
            "pwd",
            "put local.txt",
            "put -r tree",
            "ls",
            "ls -l deep",
            "cd deep",
            "cd ../..",
            "cd ..",  # refused: already at the home
            "pwd",
            "stat work/local.txt",
            "mv work/local.txt work/deep",
            "ls -R work",
            "lcd out",
            "lpwd",
            "get work/deep/local.txt",
            "get -r work/tree copy",
            "lls",
            "df",
            "rm -r work",
            "ls",
            "pwd",
        ]
    )
    (tmp_path / "out").mkdir()
    p = run_ferry(["shell", target(srv)], env, input=script + "\n", cwd=tmp_path)
    assert p.returncode == 2, p.stderr  # the refused 'cd ..' is the last failure: exit 2
    assert p.stderr.count("ferry:") == 1 and HOME_LIMIT in p.stderr
    out = p.stdout.splitlines()
    assert out[0] == "/" and out[1] == "/work"
    assert "deep/" in out and "local.txt" in out and "tree/" in out
    assert "/" in out[out.index("tree/") :]  # pwd after 'cd ../..' and the refused 'cd ..'
    assert "  kind: file" in out
    assert {"deep/local.txt", "tree/in/", "tree/in/leaf"} <= set(out)  # ls -R: relative names
    assert str(tmp_path / "out") in out
    assert (tmp_path / "out" / "local.txt").read_text() == "from the shell\n"
    assert (tmp_path / "out" / "copy" / "in" / "leaf").read_text() == "leaf"
    assert "copy/" in out and any(line.startswith("used") for line in out)
    assert out[-1] == "/" and not (srv.root / "homes" / "ferry" / "work").exists()


@pytest.mark.timeout(60)
def test_errors_keep_the_shell_going_and_set_the_exit_status(
    served: tuple[ServeProcess, dict[str, str]], tmp_path: Path
) -> None:
    srv, env = served
    script = "get nothing-here\nfrobnicate\nls -z\nmv onlyone\nput 'unbalanced\nmkdir fine\nls\nrmdir fine\n"
    p = run_ferry(["shell", target(srv)], env, input=script, cwd=tmp_path)
    assert p.stdout.splitlines() == ["fine/"]
    errors = p.stderr.splitlines()
    assert len(errors) == 5 and all(e.startswith("ferry: ") for e in errors), errors
    assert "unknown command 'frobnicate'" in p.stderr and "nothing-here" in p.stderr
    assert p.returncode == 2  # the last failure (a usage error)
    p = run_ferry(["shell", target(srv)], env, input="get nothing-here\n", cwd=tmp_path)
    assert p.returncode == 4
    # --json: listings, metadata and usage as JSON lines for scripts
    p = run_ferry(["shell", "--json", target(srv)], env, input="mkdir j\nls\nstat j\ndf\nrmdir j\n")
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert p.returncode == 0 and [r.get("name") for r in recs[:2]] == ["j", "j"] and "used" in recs[2]
    p = run_ferry(["shell", target(srv)], dict(env, FERRY_PASSWORD="wrong"), input="ls\n")
    assert p.returncode == 3


@pytest.mark.timeout(60)
def test_interactive_completion_and_history(
    served: tuple[ServeProcess, dict[str, str]], tmp_path: Path
) -> None:
    srv, env = served
    home = srv.root / "homes" / "ferry"
    (home / "complete-me" / "inner").mkdir(parents=True)
    (home / "complete-me" / "file-one.txt").write_text("1")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ferry", "shell", target(srv)],
        env=env,
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=15,
        dimensions=(24, 200),
    )
    try:
        child.expect_exact("> ")
        child.send("cd compl\t")
        child.expect_exact("complete-me/")
        child.send("\r")
        child.expect_exact("ferry@127.0.0.1:/complete-me> ")
        child.send("stat file-\t")
        child.expect_exact("file-one.txt")
        child.send("\r")
        child.expect_exact("kind: file")
        child.expect_exact("> ")
        child.send("\x1b[A")  # history: arrow up recalls the last command
        child.expect_exact("stat file-one.txt")
        child.send("\x15pwd\r")  # Ctrl-U clears the line
        child.expect_exact("/complete-me\r\n")
        child.send("\x04")  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "stat file-one.txt" in (Path(env["FERRY_HOME"]) / "shell_history").read_text()


def _pty_available() -> bool:
    from ferry.client.pty import run_pty_session

    try:
        asyncio.run(run_pty_session(None, command=None))  # type: ignore[arg-type]
    except NotImplementedError:
        return False
    except Exception:
        return True
    return True


@pytest.mark.timeout(60)
def test_pty_mode_delegates_to_the_terminal_session(
    served: tuple[ServeProcess, dict[str, str]], tmp_path: Path
) -> None:
    if not _pty_available():
        pytest.skip("ferry.client.pty.run_pty_session is not implemented yet")
    srv, env = served
    run_ferry(["user", "mod", "ferry", "--exec", "--root", str(srv.root)], env)
    child = pexpect.spawn(
        sys.executable, ["-m", "ferry", "shell", "--pty", target(srv)], env=env, encoding="utf-8", timeout=15
    )
    try:
        child.sendline("echo pty-$((6 * 7)); exit 3")
        child.expect_exact("pty-42")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3
