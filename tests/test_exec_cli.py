"""``ferry exec`` as a subprocess against a real server: exit codes, pipes, signals, PTYs, orphans."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time

import pexpect
import pytest

from conftest import FERRY
from ferry_server import PASSWORD, ServerThread
from transfer_support import marker, pids_with, wait_until

pytestmark = pytest.mark.shared_server(bob={})  # bob: commands not allowed


@pytest.fixture
def env(ferry_env: dict[str, str]) -> dict[str, str]:
    ferry_env["FERRY_PASSWORD"] = PASSWORD
    ferry_env["TERM"] = "xterm"
    return ferry_env


def target(srv: ServerThread, user: str = "alice") -> str:
    return f"ferry://{user}@127.0.0.1:{srv.port}"


def ferry_exec(
    srv: ServerThread, env: dict[str, str], *args: str, input: bytes | None = None, user: str = "alice"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*FERRY, "exec", target(srv, user), *args],
        input=input if input is not None else b"",
        capture_output=True,
        env=env,
        timeout=30,
    )


def read_line(proc: subprocess.Popen[bytes], within: float = 15) -> bytes:
    """One line of the child's stdout, bounded in time (the test fails instead of hanging)."""
    assert proc.stdout is not None
    import select

    buf = b""
    deadline = time.monotonic() + within
    while not buf.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 1)
        if not chunk:
            break
        buf += chunk
    return buf


# --- exit codes, output, input ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_exit_code_and_separate_streams(server: ServerThread, env: dict[str, str]) -> None:
    r = ferry_exec(server, env, "--", "echo out; echo err >&2; exit 7")
    assert r.returncode == 7
    assert r.stdout == b"out\n"
    assert r.stderr.endswith(b"err\n")
    killed = ferry_exec(server, env, "--", "kill -TERM $$")
    assert killed.returncode == 128 + 15


@pytest.mark.timeout(60)
def test_argv_form_runs_without_a_shell(server: ServerThread, env: dict[str, str]) -> None:
    r = ferry_exec(server, env, "--", "printf", "%s|", "a b", "$HOME", "*")
    assert r.returncode == 0
    assert r.stdout == b"a b|$HOME|*|"


@pytest.mark.timeout(60)
def test_stdin_is_forwarded_binary_safe_with_eof(server: ServerThread, env: dict[str, str]) -> None:
    blob = os.urandom(3 << 20) + bytes(range(256))
    r = ferry_exec(server, env, "--", "cat", input=blob)
    assert r.returncode == 0 and r.stdout == blob
    wc = ferry_exec(server, env, "--", "wc -c", input=blob)
    assert int(wc.stdout) == len(blob)
    # -n: the command gets EOF at once even though our stdin has data
    n = ferry_exec(server, env, "-n", "--", "wc -c", input=b"ignored")
    assert n.stdout.strip() == b"0"


@pytest.mark.timeout(60)
def test_closed_stdout_sends_sigpipe(server: ServerThread, env: dict[str, str]) -> None:
    r = subprocess.run(
        f"{shlex.join([*FERRY, 'exec', target(server), '--', 'yes'])} | head -n 2; echo ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert r.stdout == b"y\ny\n141\n"


# --- refusals and usage ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_refusals_are_clear_and_exit_255(server: ServerThread, env: dict[str, str]) -> None:
    no_exec = ferry_exec(server, env, "--", "true", user="bob")
    assert no_exec.returncode == 255
    assert b"remote commands are disabled" in no_exec.stderr
    bad_env = ferry_exec(server, env, "-e", "LD_PRELOAD=x", "--", "true")
    assert bad_env.returncode == 255 and b"LD_PRELOAD" in bad_env.stderr
    bad_cwd = ferry_exec(server, env, "--cwd", "../..", "--", "true")
    assert bad_cwd.returncode == 255 and b"may not contain '..'" in bad_cwd.stderr
    missing = subprocess.run([*FERRY, "exec", target(server)], capture_output=True, env=env, timeout=30)
    assert missing.returncode == 2 and b"no command" in missing.stderr
    hint = subprocess.run(
        [*FERRY, "exec", target(server), "ls", "-l"], capture_output=True, env=env, timeout=30
    )
    assert hint.returncode == 2 and b"after --" in hint.stderr


@pytest.mark.timeout(60)
def test_env_and_cwd_options(server: ServerThread, env: dict[str, str]) -> None:
    (server.root / "homes" / "alice" / "work").mkdir(exist_ok=True)
    r = ferry_exec(
        server, env, "-e", "TZ=UTC", "-e", "FERRY_X=1", "--cwd", "work", "--", 'echo "$TZ $FERRY_X $PWD"'
    )
    assert r.returncode == 0
    assert r.stdout.decode().split() == ["UTC", "1", str(server.root / "homes" / "alice" / "work")]


# --- timeouts, signals, orphans ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_timeout_exits_124_and_leaves_no_process(server: ServerThread, env: dict[str, str]) -> None:
    mk = marker()
    t0 = time.monotonic()
    r = ferry_exec(server, env, "--timeout", "0.5", "--", f"sleep {mk} & sleep {mk}")
    assert r.returncode == 124
    assert b"timed out after 0.5 s" in r.stderr
    assert time.monotonic() - t0 < 10
    assert wait_until(lambda: not pids_with(mk), 3)


@pytest.mark.timeout(60)
def test_killed_client_leaves_no_orphan(server: ServerThread, env: dict[str, str]) -> None:
    mk = marker()
    proc = subprocess.Popen(
        [*FERRY, "exec", target(server), "--", f"echo started; sleep {mk}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert read_line(proc) == b"started\n"
        assert wait_until(lambda: len(pids_with(mk)) == 1, 5)
        proc.kill()  # SIGKILL: no chance to say goodbye
        proc.wait(10)
        assert wait_until(lambda: not pids_with(mk), 5), "the remote sleep outlived its client"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_ctrl_c_is_forwarded_as_sigint(server: ServerThread, env: dict[str, str]) -> None:
    script = "trap 'echo got INT; exit 42' INT; echo ready; while :; do sleep 0.05; done"
    proc = subprocess.Popen(
        [*FERRY, "exec", target(server), "--", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert read_line(proc) == b"ready\n"
        proc.send_signal(signal.SIGINT)
        assert read_line(proc) == b"got INT\n"
        assert proc.wait(10) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_third_ctrl_c_gives_up_and_the_command_dies(server: ServerThread, env: dict[str, str]) -> None:
    mk = marker()
    proc = subprocess.Popen(
        [*FERRY, "exec", target(server), "--", f"trap '' INT; echo ready; sleep {mk}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert read_line(proc) == b"ready\n"
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.1)
        assert proc.wait(10) == 130
        assert proc.stderr is not None and b"interrupted" in proc.stderr.read()
        assert wait_until(lambda: not pids_with(mk), 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- PTY -----------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pty_session_resize_ctrl_c_and_terminal_restored(server: ServerThread, env: dict[str, str]) -> None:
    cmd = shlex.join([*FERRY, "exec", "-t", target(server), "--", "/bin/sh", "-i"])
    # stty -a after ferry exits shows whether our terminal got its settings back.
    child = pexpect.spawn(
        "/bin/sh", ["-c", f"{cmd}; echo rc=$?; stty -a"], env=env, dimensions=(30, 100), timeout=15
    )
    try:
        child.expect(r"[#$] ")
        child.sendline("stty size; tty; echo term=$TERM")
        child.expect(r"30 100\r\n/dev/pts/\d+\r\nterm=xterm\r\n")
        child.setwinsize(40, 120)  # SIGWINCH -> Resize -> TIOCSWINSZ on the server
        size = ""
        deadline = time.monotonic() + 10
        while size != "40 120" and time.monotonic() < deadline:  # resize is asynchronous: retry
            child.sendline("stty size")
            child.expect(r"(\d+ \d+)\r\n")
            assert isinstance(child.match, re.Match)
            group = child.match.group(1)
            size = group.decode() if isinstance(group, bytes) else str(group)
        assert size == "40 120"
        child.sendline("sleep 30")
        time.sleep(0.3)
        child.sendcontrol("c")  # raw mode locally: ^C is a byte; the remote PTY makes it SIGINT
        child.expect(r"[#$] ")
        child.sendline("exit 5")
        child.expect(r"rc=5\r\n")
        child.expect(pexpect.EOF)
        assert isinstance(child.before, bytes)
        settings = child.before.decode()
        assert "-icanon" not in settings and "icanon" in settings
        assert "-echo " not in settings and " echo " in settings
    finally:
        child.close(force=True)


@pytest.mark.timeout(60)
def test_pty_command_output_and_exit_code(server: ServerThread, env: dict[str, str]) -> None:
    cmd = [*FERRY, "exec", "-t", target(server), "--", "test -t 0 && test -t 1 && echo on-a-tty; exit 3"]
    child = pexpect.spawn(cmd[0], cmd[1:], env=env, timeout=15)
    try:
        child.expect("on-a-tty")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 3


@pytest.mark.timeout(60)
def test_a_refused_terminal_session_exits_255_from_exec_t_and_shell_pty(
    server: ServerThread, env: dict[str, str]
) -> None:
    """bob may not run programs: both ways to ask for a terminal session fail the same way."""
    statuses = {}
    for name, args in (("exec -t", ["exec", "-t", target(server, "bob")]),
                       ("shell --pty", ["shell", "--pty", target(server, "bob")])):  # fmt: skip
        child = pexpect.spawn(FERRY[0], [*FERRY[1:], *args], env=env, encoding="utf-8", timeout=20)
        try:
            child.expect_exact("remote commands are disabled")
            child.expect(pexpect.EOF)
        finally:
            child.close()
        statuses[name] = child.exitstatus
    assert statuses == {"exec -t": 255, "shell --pty": 255}
