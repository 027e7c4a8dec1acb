"""How ``ferry`` ends: a one-shot command run as the program leaves through ``os._exit`` once its
output is flushed (``ferry.cli._exit_now``). These run the real console entry in subprocesses against
a real loopback server and check that nothing printed is lost, that exit statuses are the ones
documented in ``ferry.errors.ExitCode``, and that a reader closing the pipe early gets no traceback.

The subprocesses run *without* PYTHONUNBUFFERED (unlike most CLI tests): buffered standard output is
what a user's ``ferry ... | jq`` has, and what the fast exit must not drop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FERRY, free_port
from ferry.errors import ExitCode
from ferry.paths import home_dir
from ferry_server import PASSWORD, ServerThread

PIPE_BUFFER = 64 * 1024  # Linux's default pipe capacity
FILES = 2000  # ~190 KB of ls --json: several times the pipe buffer


pytestmark = pytest.mark.shared_server(ann={})


@pytest.fixture(scope="module", autouse=True)
def many(module_server: ServerThread) -> None:
    """ann's folder ``many``: a listing several times the pipe buffer."""
    many = module_server.root / "homes" / "ann" / "many"
    many.mkdir()
    for i in range(FILES):
        (many / f"file-{i:05d}.txt").write_bytes(b"x")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_") and k != "PYTHONUNBUFFERED"}
    env.update(FERRY_HOME=str(tmp_path / "ferry-home"), FERRY_PASSWORD=PASSWORD)
    return env


def remote(srv: ServerThread, path: str = "") -> list[str]:
    return ["-P", str(srv.port), f"ann@127.0.0.1:{path}"]


def ferry(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FERRY, *args], env=env, capture_output=True, text=True, timeout=60)


def as_console(argv: list[str], before: str = "") -> list[str]:
    """A ``python -c`` that runs ``before`` and then the console entry with ``argv``."""
    code = f"import sys\nsys.argv = {['ferry', *argv]!r}\n{before}\nfrom ferry.cli import main\nmain()\n"
    return [sys.executable, "-c", code]


#: Output still in sys.stdout's buffer when the command ends. click.echo flushes each line, so
#: today's commands leave nothing there; this stands for any output that does (a print(), a
#: buffered writer): the exit must still deliver it.
PENDING = "sys.stdout.write('pending output\\n')"


def test_json_listing_bigger_than_a_pipe_buffer_arrives_whole(
    server: ServerThread, env: dict[str, str]
) -> None:
    p = ferry(env, "ls", "--json", *remote(server, "many"))
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.encode()) > 2 * PIPE_BUFFER
    assert p.stdout.endswith("}\n")
    names = [json.loads(line)["name"] for line in p.stdout.splitlines()]
    assert names == [f"file-{i:05d}.txt" for i in range(FILES)]


def test_output_still_buffered_at_exit_is_written(server: ServerThread, env: dict[str, str]) -> None:
    # A successful command that prints nothing itself (mkdir -p of the home), and a usage error.
    ok = subprocess.run(as_console(["mkdir", "-p", *remote(server, "made")], PENDING), env=env,
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (ok.returncode, ok.stdout) == (0, "pending output\n"), ok.stderr
    bad = subprocess.run(as_console(["ls"], PENDING), env=env, capture_output=True, text=True, timeout=60)
    assert (bad.returncode, bad.stdout) == (ExitCode.USAGE, "pending output\n")
    assert "Missing argument" in bad.stderr


@pytest.mark.parametrize(
    ("case", "status"),
    [
        ("succeeded", ExitCode.OK),  # its reader went away: unwanted output, not an error (coreutils)
        ("failed", ExitCode.USAGE),  # a command that failed keeps its own status
    ],
)
def test_stdout_closed_before_exit_is_quiet(
    server: ServerThread, env: dict[str, str], case: str, status: int
) -> None:
    argv = ["mkdir", "-p", *remote(server, "made")] if case == "succeeded" else ["ls"]
    r, w = os.pipe()
    os.close(r)  # the reader is gone before the command writes anything
    try:
        p = subprocess.run(as_console(argv, PENDING), env=env, stdout=w, stderr=subprocess.PIPE,
                           text=True, timeout=60)  # fmt: skip
    finally:
        os.close(w)
    assert p.returncode == status, p.stderr
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr


@pytest.mark.parametrize("json_mode", [True, False])
def test_listing_into_a_pipe_closed_early_is_quiet(
    server: ServerThread, env: dict[str, str], json_mode: bool
) -> None:
    """``ferry ls ... | head -c 1``: like ``ls`` (killed by SIGPIPE, which the shell does not
    report), the command ends silently with status 0: no "local file: Broken pipe", no
    "Exception ignored ... BrokenPipeError" from the interpreter's last flush."""
    args = ["ls", "--json"] if json_mode else ["ls", "-l"]
    proc = subprocess.Popen([*FERRY, *args, *remote(server, "many")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        assert proc.stdout.read(1) == ("{" if json_mode else "-")
        proc.stdout.close()
        err = proc.stderr.read()
        status = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert status == ExitCode.OK, err
    assert "pinned its certificate" in err and err.count("\n") == 1  # the first connection's note, nothing else


@pytest.mark.parametrize(
    ("case", "status", "says"),
    [
        ("ok", ExitCode.OK, ""),
        ("not found", ExitCode.NOT_FOUND, "no such file or folder"),
        ("wrong password", ExitCode.AUTH, "wrong user name or password"),
        ("unknown option", ExitCode.USAGE, "No such option"),
        ("missing operand", ExitCode.USAGE, "Missing argument"),
        ("unknown command", ExitCode.USAGE, "No such command"),
        ("no server", ExitCode.CONNECTION, "cannot connect"),
        ("version", ExitCode.OK, ""),
        ("no arguments", ExitCode.USAGE, "Usage: ferry"),
    ],
)
def test_exit_statuses_and_messages(
    server: ServerThread, env: dict[str, str], case: str, status: int, says: str
) -> None:
    argv = {
        "ok": ["ls", *remote(server, "many/file-00007.txt")],
        "not found": ["ls", *remote(server, "nowhere")],
        "wrong password": ["ls", *remote(server)],
        "unknown option": ["ls", "--bogus", *remote(server)],
        "missing operand": ["ls"],
        "unknown command": ["lsx"],
        "no server": ["ls", "-P", str(free_port()), "ann@127.0.0.1:"],
        "version": ["--version"],
        "no arguments": [],
    }[case]
    if case == "wrong password":
        env["FERRY_PASSWORD"] = "not the password"
    p = ferry(env, *argv)
    assert p.returncode == status, (p.stdout, p.stderr)
    assert says in p.stderr + p.stdout
    if case == "ok":
        assert p.stdout == "file-00007.txt\n"
    if case == "version":
        assert p.stdout.startswith("ferry, version ")


@pytest.mark.parametrize(("case", "fast"), [("version", True), ("ls", True), ("user list", False)])
def test_only_one_shot_commands_skip_teardown(
    server: ServerThread, env: dict[str, str], case: str, fast: bool
) -> None:
    argv = {
        "version": ["--version"],
        "ls": ["ls", *remote(server)],
        "user list": ["user", "list", "--root", str(server.root)],  # not one-shot: normal teardown
    }[case]
    at_exit = "import atexit\natexit.register(lambda: print('teardown ran', file=sys.stderr))"
    p = subprocess.run(as_console(argv, at_exit), env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert ("teardown ran" in p.stderr) is not fast


def test_main_with_argv_returns_or_raises(env: dict[str, str]) -> None:
    """Called with ``argv`` (tests, embedding), main() returns or raises SystemExit; it never ends
    the process. In a subprocess: were it to call os._exit(0) here, pytest itself would end, green."""
    code = (
        "from ferry.cli import main\n"
        "main(['--version'])\n"
        "try:\n"
        "    main(['ls'])\n"
        "except SystemExit as exc:\n"
        "    print('raised', exc.code)\n"
        "print('still here')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("ferry, version ")
    assert lines[1:] == [f"raised {ExitCode.USAGE}", "still here"]


@pytest.mark.parametrize("fd", [0, 1, 2], ids=["stdin", "stdout", "stderr"])
@pytest.mark.parametrize("op", ["get", "put"])
def test_a_closed_standard_descriptor_is_not_reused(
    server: ServerThread, env: dict[str, str], tmp_path: Path, fd: int, op: str
) -> None:
    """``ferry get ... >&-``: started with fd 0, 1 or 2 closed, the connection's socket used to take
    that number. libuv then aborted the process when closing it (status 134), and with stderr closed
    the command failed. ferry puts /dev/null there first, as OpenSSH does."""
    local = tmp_path / "local.txt"
    if op == "get":
        argv = ["get", *remote(server, "many/file-00007.txt"), str(local)]
    else:
        local.write_bytes(b"uploaded\n")
        argv = ["put", "-P", str(server.port), str(local), f"ann@127.0.0.1:put-fd{fd}.txt"]
    # sh closes the descriptor, then exec keeps it closed for ferry (no preexec_fn with threads).
    p = subprocess.run(["/bin/sh", "-c", f'exec "$@" {fd}>&-', "sh", *FERRY, *argv], env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    if op == "get":
        assert local.read_bytes() == b"x"
    else:
        assert (home_dir(server.root, "ann") / f"put-fd{fd}.txt").read_bytes() == b"uploaded\n"
