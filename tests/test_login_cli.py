"""How the `ferry` command logs in: the order of methods, -v, token and password files, prompts."""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from cli_inproc import run_inproc
from conftest import FERRY
from ferry.errors import ExitCode
from ferry.server.accounts import Accounts
from ferry.server.context import Limits
from ferry.server.credentials import Credentials
from ferry_server import CHEAP_HASHER, PASSWORD, ServerThread
from login_support import PASSPHRASE, KeySet, bare_env, key_server, ssh_add, ssh_agent


@dataclass
class Setup:
    srv: ServerThread
    env: dict[str, str]  # HOME without keys, no agent, no password, no token
    home: Path
    token: str
    read_token: str

    def target(self) -> list[str]:
        return ["-P", str(self.srv.port), "alice@127.0.0.1:"]


@pytest.fixture
def setup(tmp_path: Path, keys: KeySet, ferry_env: dict[str, str]) -> Iterator[Setup]:
    srv = key_server(tmp_path / "root", keys.ed25519.pub, keys.rsa.pub, keys.protected.pub)
    with Accounts(srv.root, hasher=CHEAP_HASHER) as acc:
        creds = Credentials(acc)
        token = creds.add_token("alice")[1]
        read_token = creds.add_token("alice", read_only=True)[1]
    home = tmp_path / "home"
    home.mkdir()
    env = bare_env(ferry_env, home)
    try:
        yield Setup(srv, env, home, token, read_token)
    finally:
        srv.stop()


def ls(s: Setup, *extra: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    r = run_inproc(["ls", "-v", *extra, *s.target()], env or s.env)
    return r.returncode, r.stderr


def test_each_method_and_what_v_says(setup: Setup, keys: KeySet, tmp_path: Path) -> None:
    s = setup
    # Nothing available and no terminal: a clear error, exit status 3.
    rc, err = ls(s)
    assert rc == ExitCode.AUTH and "give a password" in err
    # -i FILE
    rc, err = ls(s, "-i", str(keys.rsa.path))
    assert rc == 0, err
    assert f"logged in to 127.0.0.1:{s.srv.port} as alice with key {keys.rsa.fingerprint} ({keys.rsa.path})" in err
    # A default key file: ~/.ssh/id_ed25519 of HOME.
    (s.home / ".ssh").mkdir(mode=0o700)
    shutil.copy(keys.ed25519.path, s.home / ".ssh" / "id_ed25519")
    (s.home / ".ssh" / "id_ed25519").chmod(0o600)
    rc, err = ls(s)
    assert rc == 0 and f"with key {keys.ed25519.fingerprint} ({s.home}/.ssh/id_ed25519)" in err, err
    # A token wins over keys (it comes first): FERRY_TOKEN, then --token-file.
    rc, err = ls(s, env=dict(s.env, FERRY_TOKEN=s.token))
    assert rc == 0 and "with token " in err, err
    tf = tmp_path / "token"
    tf.write_text(s.read_token + "\n")
    tf.chmod(0o600)
    rc, err = ls(s, "--token-file", str(tf))
    assert rc == 0 and "with token " in err and "(read-only)" in err, err
    tf.chmod(0o640)
    rc, err = ls(s, "--token-file", str(tf))
    assert rc == ExitCode.USAGE and "lets other users read or change it" in err
    # A default key file others can read is not used (as ssh), and -v says why.
    (s.home / ".ssh" / "id_ed25519").chmod(0o644)
    rc, err = ls(s, env=dict(s.env, FERRY_PASSWORD=PASSWORD))
    assert rc == 0 and "ignoring the key file" in err and "with password" in err, err


def test_agent_comes_before_default_key_files(setup: Setup, keys: KeySet, tmp_path: Path) -> None:
    s = setup
    (s.home / ".ssh").mkdir(mode=0o700)
    shutil.copy(keys.ed25519.path, s.home / ".ssh" / "id_ed25519")
    (s.home / ".ssh" / "id_ed25519").chmod(0o600)
    with ssh_agent(tmp_path) as (sock, agent_env):
        ssh_add(agent_env, keys.rsa)
        rc, err = ls(s, env=dict(s.env, SSH_AUTH_SOCK=sock))
        assert rc == 0 and f"with key {keys.rsa.fingerprint} (ssh-agent)" in err, err
        # -i comes before the agent.
        rc, err = ls(s, "-i", str(keys.ed25519.path), env=dict(s.env, SSH_AUTH_SOCK=sock))
        assert rc == 0 and f"with key {keys.ed25519.fingerprint} ({keys.ed25519.path})" in err, err
    # exec takes the same options.
    r = run_inproc(["exec", "-v", "-i", str(keys.rsa.path), "-P", str(s.srv.port), "alice@127.0.0.1", "--", "true"], s.env)
    assert r.returncode == 0 and f"with key {keys.rsa.fingerprint}" in r.stderr, r.stderr


def _spawn(s: Setup, *args: str) -> tuple[pexpect.spawn, io.StringIO]:
    argv = [*FERRY, *args]
    child = pexpect.spawn(argv[0], argv[1:], env=s.env, encoding="utf-8", timeout=30)
    transcript = io.StringIO()
    child.logfile_read = transcript
    return child, transcript


def test_password_prompt_three_tries(setup: Setup) -> None:
    s = setup
    child, transcript = _spawn(s, "ls", *s.target())
    try:
        for attempt in ("wrong 1", "wrong 2", PASSWORD):
            child.expect("alice password: ")
            child.sendline(attempt)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript.getvalue()
    assert transcript.getvalue().count("Permission denied, please try again.") == 2
    assert PASSWORD not in transcript.getvalue()  # never echoed

    child, transcript = _spawn(s, "ls", *s.target())
    try:
        for attempt in ("wrong 1", "wrong 2", "wrong 3"):
            child.expect("alice password: ")
            child.sendline(attempt)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == ExitCode.AUTH, transcript.getvalue()
    assert "wrong user name or password" in transcript.getvalue()


def test_password_typed_after_the_login_deadline_is_sent_on_a_new_connection(
    tmp_path: Path, ferry_env: dict[str, str]
) -> None:
    """The server gives a connection little time to log in; a person typing after a key stage failed
    may take longer. The typed password is then sent on a fresh connection, not lost."""
    srv = ServerThread(tmp_path / "root", limits=Limits(login_timeout=1.0))
    srv.add_user("alice")
    srv.start()
    env = bare_env(ferry_env, tmp_path)
    try:
        argv = [*FERRY, "ls", "-v", "-P", str(srv.port), "alice@127.0.0.1:"]
        child = pexpect.spawn(argv[0], argv[1:], env=env, encoding="utf-8", timeout=30)
        transcript = io.StringIO()
        child.logfile_read = transcript
        try:
            child.expect("alice password: ")
            time.sleep(2.0)  # longer than the server's login deadline
            child.sendline(PASSWORD)
            child.expect(pexpect.EOF)
        finally:
            child.close()
        assert child.exitstatus == 0, transcript.getvalue()
        assert "with password" in transcript.getvalue()
        assert transcript.getvalue().count("alice password: ") == 1  # not asked twice
    finally:
        srv.stop()


def test_passphrase_prompt_on_a_terminal(setup: Setup, keys: KeySet) -> None:
    s = setup
    child, transcript = _spawn(s, "ls", "-v", "-i", str(keys.protected.path), *s.target())
    try:
        child.expect(f"Enter passphrase for key '{keys.protected.path}': ")
        child.sendline(PASSPHRASE)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, transcript.getvalue()
    assert f"with key {keys.protected.fingerprint}" in transcript.getvalue()
    # Without a terminal it is skipped with a note, and the next method is used.
    r = run_inproc(["ls", "-v", "-i", str(keys.protected.path), *s.target()], dict(s.env, FERRY_PASSWORD=PASSWORD))
    assert r.returncode == 0 and "needs a passphrase" in r.stderr and "with password" in r.stderr, r.stderr


def test_plain_prints_what_it_loses(tmp_path: Path, keys: KeySet, ferry_env: dict[str, str]) -> None:
    srv = ServerThread(tmp_path / "root", plain=True)
    srv.add_user("alice")
    srv.start()
    try:
        env = dict(ferry_env, FERRY_PASSWORD=PASSWORD, HOME=str(tmp_path))
        r = run_inproc(["ls", "--plain", "-P", str(srv.port), "alice@127.0.0.1:"], env)
        assert r.returncode == 0, r.stderr
        assert "warning: --plain: no encryption and no server certificate" in r.stderr
        assert "a key login is not bound to this connection" in r.stderr
    finally:
        srv.stop()
