"""Keys made by the real ssh-keygen, and a real ssh-agent, for the login tests.

ssh-keygen and ssh-agent come with the OpenSSH client (Debian: openssh-client; .ci/run installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ferry.errors import AuthError, FerryError

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient
    from ferry_server import ServerThread

PASSPHRASE = "correct passphrase"
#: How long ending a revoked session may take (servers check once a second; the machine is shared).
REVOCATION_WITHIN = 8.0


async def ended(c: AsyncClient, within: float = REVOCATION_WITHIN) -> str | None:
    """The error that ended the session within ``within`` seconds, or None if it is still open."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            await c.ping()
        except FerryError as exc:
            # The class that says why: an AuthError (revoked) is not retried, a ConnectionBroken is.
            return f"{'AuthError' if isinstance(exc, AuthError) else type(exc).__name__}: {exc}"
        await asyncio.sleep(0.1)
    return None


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: install the OpenSSH client (apt-get install openssh-client)")
    return path


@dataclass(frozen=True)
class Key:
    """A key pair made by ssh-keygen: ``path`` (private), ``pub`` (the line), ``fingerprint``."""

    path: Path
    pub: str
    fingerprint: str


def make_key(folder: Path, name: str, kind: str, bits: int | None = None, passphrase: str = "") -> Key:
    """``ssh-keygen -t KIND [-b BITS] -N PASSPHRASE -f folder/name``; the fingerprint as it prints it."""
    path = folder / name
    args = [need("ssh-keygen"), "-q", "-t", kind, "-N", passphrase, "-C", f"{name}@test", "-f", str(path)]
    if bits is not None:
        args += ["-b", str(bits)]
    subprocess.run(args, check=True, timeout=60, capture_output=True)
    listed = subprocess.run(
        [need("ssh-keygen"), "-lf", str(path) + ".pub"], check=True, timeout=30, capture_output=True, text=True
    ).stdout
    fingerprint = listed.split()[1]
    return Key(path, (folder / f"{name}.pub").read_text(), fingerprint)


@dataclass(frozen=True)
class KeySet:
    """One key of each kind the tests log in with."""

    ed25519: Key
    ecdsa: Key
    rsa: Key
    protected: Key
    rsa1024: Key
    stranger: Key


def make_keys(folder: Path) -> KeySet:
    folder.mkdir(parents=True, exist_ok=True)
    return KeySet(
        ed25519=make_key(folder, "id_ed25519", "ed25519"),
        ecdsa=make_key(folder, "id_ecdsa", "ecdsa", 384),
        rsa=make_key(folder, "id_rsa", "rsa", 3072),
        protected=make_key(folder, "id_protected", "ed25519", passphrase=PASSPHRASE),
        rsa1024=make_key(folder, "id_rsa1024", "rsa", 1024),
        stranger=make_key(folder, "id_stranger", "ed25519"),
    )


@contextlib.contextmanager
def ssh_agent(folder: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real ssh-agent on a private socket in ``folder``; yields (socket, env for ssh-add); killed by PID."""
    sock = folder / "agent.sock"
    out = subprocess.run(
        [need("ssh-agent"), "-s", "-a", str(sock)], check=True, timeout=30, capture_output=True, text=True
    ).stdout
    match = re.search(r"SSH_AGENT_PID=(\d+)", out)
    assert match, out
    pid = int(match.group(1))
    env = dict(os.environ, SSH_AUTH_SOCK=str(sock))
    try:
        yield str(sock), env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)


def ssh_add(env: dict[str, str], *keys: Key) -> None:
    """Load ``keys`` into the agent of ``env`` (passphrase-less keys only)."""
    subprocess.run(
        [need("ssh-add"), *(str(k.path) for k in keys)], check=True, timeout=30, env=env, capture_output=True
    )


def key_server(root: Path, *lines: str, exec_allowed: bool = True) -> ServerThread:
    """A started server with user ``alice`` (password PASSWORD) whose keys are ``lines``."""
    from ferry.server.accounts import Accounts
    from ferry.server.credentials import Credentials
    from ferry_server import CHEAP_HASHER
    from ferry_server import ServerThread as Server

    srv = Server(root)
    srv.add_user("alice", exec_allowed=exec_allowed)
    srv.start()
    with Accounts(srv.root, hasher=CHEAP_HASHER) as acc:
        Credentials(acc).add_keys("alice", "".join(lines))
    return srv


def bare_env(ferry_env: dict[str, str], home: Path) -> dict[str, str]:
    """``ferry_env`` with HOME at ``home`` and no agent, password, token or user from outside."""
    env = dict(ferry_env, HOME=str(home))
    for var in ("SSH_AUTH_SOCK", "FERRY_PASSWORD", "FERRY_TOKEN", "FERRY_USER"):
        env.pop(var, None)
    return env
