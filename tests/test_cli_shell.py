"""``ferry shell``: scripted on stdin, interactively under a PTY (completion, history), and ``--pty``."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from cli_inproc import run_inproc
from conftest import FERRY
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
    assert "first connection" in run_inproc(["df", f"ferry://ferry@127.0.0.1:{srv.port}"], env).stderr
    try:
        yield srv, env
    finally:
        assert srv.stop() == 0


def target(srv: ServeProcess) -> str:
    return f"ferry://ferry@127.0.0.1:{srv.port}"


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
    p = run_inproc(["shell", target(srv)], env, input=script + "\n", cwd=tmp_path)
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
    p = run_inproc(["shell", target(srv)], env, input=script, cwd=tmp_path)
    assert p.stdout.splitlines() == ["fine/"]
    errors = p.stderr.splitlines()
    assert len(errors) == 5 and all(e.startswith("ferry: ") for e in errors), errors
    assert "unknown command 'frobnicate'" in p.stderr and "nothing-here" in p.stderr
    assert p.returncode == 2  # the last failure (a usage error)
    p = run_inproc(["shell", target(srv)], env, input="get nothing-here\n", cwd=tmp_path)
    assert p.returncode == 4
    # --json: listings, metadata and usage as JSON lines for scripts
    p = run_inproc(["shell", "--json", target(srv)], env, input="mkdir j\nls\nstat j\ndf\nrmdir j\n")
    recs = [json.loads(line) for line in p.stdout.splitlines()]
    assert p.returncode == 0 and [r.get("name") for r in recs[:2]] == ["j", "j"] and "used" in recs[2]
    p = run_inproc(["shell", target(srv)], dict(env, FERRY_PASSWORD="wrong"), input="ls\n")
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
    run_inproc(["user", "mod", "ferry", "--exec", "--root", str(srv.root)], env)
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


def test_split_partial_and_completion_text() -> None:
    from ferry.cli.shell import completion_text, split_partial

    assert split_partial('get "my fi') == (["get"], "my fi", '"')
    assert split_partial("get my\\ fi") == (["get"], "my fi", None)
    assert split_partial("put 'a b' c") == (["put", "a b"], "c", None)
    assert split_partial('get "') == (["get"], "", '"')
    # readline replaces only what follows the last space or quote
    assert completion_text("my fi", '"', "fi", "my file.txt") == "file.txt"  # readline closes the quote
    assert completion_text("my fi", None, "fi", "my file.txt") == "file.txt"  # after 'my\ '
    assert completion_text("my", None, "my", "my file.txt") == "my\\ file.txt"
    assert completion_text('say "hi', '"', "hi", 'say "hi".txt') == 'hi\\".txt'
    assert completion_text('say "hi', "'", "hi", 'say "hi".txt') == 'hi".txt'
    assert completion_text("it", "'", "it", "it's") is None


@pytest.mark.timeout(60)
def test_interactive_quoting_ctrl_c_bang_and_exit_status(
    served: tuple[ServeProcess, dict[str, str]], tmp_path: Path
) -> None:
    srv, env = served
    home = srv.root / "homes" / "ferry"
    (home / "quoting").mkdir()
    (home / "quoting" / "space name.txt").write_text("s")
    transcript = io.StringIO()
    child = pexpect.spawn(
        sys.executable, ["-m", "ferry", "shell", target(srv)], env=env, cwd=str(tmp_path),
        encoding="utf-8", timeout=15, dimensions=(24, 200),
    )  # fmt: skip
    child.logfile_read = transcript
    try:
        child.expect_exact("> ")
        child.send("cd quoting\r")
        child.expect_exact("/quoting> ")
        child.send("stat spa\t")  # unquoted: completed with an escaped space
        child.expect_exact("stat space\\ name.txt")
        child.send("\r")
        child.expect_exact("kind: file")
        child.expect_exact("> ")
        child.send('stat "spa\t')  # after an opening quote: completed inside it, quote closed
        child.expect_exact('stat "space name.txt"')
        child.send("\r")
        child.expect_exact("kind: file")
        child.expect_exact("> ")
        child.send("ls nothing-here\r")  # a failed command ...
        child.expect_exact("no such file or folder")
        child.expect_exact("> ")
        child.send("\x03")  # Ctrl-C at the prompt: a new prompt, no banner
        child.expect_exact("^C")
        child.expect_exact("/quoting> ")
        child.send("!echo local-$((6 * 7))\r")  # a local command
        child.expect_exact("local-42")
        child.expect_exact("> ")
        child.send("exit\r")  # ... then exit: status 0, as sftp
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, transcript.getvalue()
    assert transcript.getvalue().count("Connected to") == 1


@pytest.mark.timeout(60)
def test_batch_comments_local_commands_and_df_json(
    served: tuple[ServeProcess, dict[str, str]], tmp_path: Path
) -> None:
    srv, env = served
    script = "# a comment line\n  # indented too\n!echo from-the-local-shell\n!exit 3\ndf\n"
    p = run_ferry(["shell", "--json", target(srv)], env, input=script, cwd=tmp_path)
    lines = p.stdout.splitlines()
    assert lines[0] == "from-the-local-shell"
    assert p.stderr == "ferry: local command ended with status 3\n"
    assert p.returncode == 1  # the failed local command
    shell_df = json.loads(lines[1])
    (cli_df,) = [json.loads(x) for x in run_inproc(["df", "--json", target(srv)], env).stdout.splitlines()]
    assert list(shell_df) == list(cli_df) == [
        "used", "quota", "free", "available", "partial", "partials", "files", "max_files"
    ]


@pytest.mark.timeout(90)
def test_reconnect_keeps_the_remote_folder_or_says_it_cannot(tmp_path: Path) -> None:
    env = dict(os.environ, FERRY_HOME=str(tmp_path / "client-home"), PYTHONUNBUFFERED="1")
    srv = ServeProcess(tmp_path / "root", env).start()
    env["FERRY_PASSWORD"] = srv.password or ""
    port = srv.port
    work = srv.root / "homes" / "ferry" / "work"
    work.mkdir()
    (work / "inside.txt").write_text("x")
    shell = subprocess.Popen(
        [*FERRY, "shell", "-P", str(port), "ferry@127.0.0.1:"], env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert shell.stdin is not None and shell.stdout is not None and shell.stderr is not None

    def command(line: str) -> str:
        assert shell.stdin is not None and shell.stdout is not None
        shell.stdin.write(line + "\npwd\n")  # pwd marks the end of the command's output
        shell.stdin.flush()
        return shell.stdout.readline()

    try:
        assert command("cd work") == "/work\n"
        srv.stop()  # the server goes away (its sessions are closed) and comes back
        srv = ServeProcess(tmp_path / "root", env, port=port).start()
        assert command("ls") == "inside.txt\n"
        assert shell.stdout.readline() == "/work\n"  # still in the folder
        srv.stop()
        (work / "inside.txt").unlink()
        work.rmdir()
        srv = ServeProcess(tmp_path / "root", env, port=port).start()
        shell.stdin.write("ls\npwd\n")
        shell.stdin.close()
        rest = shell.stdout.read()
        err = shell.stderr.read()
        assert shell.wait(30) == 4  # a script ends: its next commands were meant for /work
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait(10)
        srv.stop()
    assert rest == ""  # neither the 'ls' nor the 'pwd' ran
    assert "reconnecting" in err and "reconnected; still in /work" in err
    assert "reconnected, but /work is no longer a folder on the server; back in your home folder" in err


@pytest.mark.timeout(90)
def test_interactive_shell_waits_for_a_server_that_is_away(tmp_path: Path) -> None:
    env = dict(os.environ, FERRY_HOME=str(tmp_path / "client-home"), PYTHONUNBUFFERED="1")
    srv = ServeProcess(tmp_path / "root", env).start()
    env["FERRY_PASSWORD"] = srv.password or ""
    port = srv.port
    (srv.root / "homes" / "ferry" / "here").mkdir()
    child = pexpect.spawn(sys.executable, ["-m", "ferry", "shell", "-P", str(port), "ferry@127.0.0.1:here"],
                          env=env, cwd=str(tmp_path), encoding="utf-8", timeout=20)  # fmt: skip
    try:
        child.expect_exact("/here> ")
        srv.stop()
        child.send("ls\r")
        child.expect_exact("connection refused")
        child.expect_exact("not connected; the next command tries again (exit to leave)")
        child.expect_exact("/here> ")  # still in the shell, still in the folder
        (srv.root / "homes" / "ferry" / "here" / "back.txt").write_text("b")
        srv = ServeProcess(tmp_path / "root", env, port=port).start()
        child.send("ls\r")
        child.expect_exact("reconnected; still in /here")
        child.expect_exact("back.txt")
        child.send("exit\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        srv.stop()
    assert child.exitstatus == 0
