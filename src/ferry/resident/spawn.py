"""Starting a resident process, and the two things it and its callers must agree on: how long it
stays (:func:`persist_seconds`) and which credentials a command asks for (:func:`creds_digest`).

A command that connected directly (no resident was there) starts one when it is done, if the
feature is on: a new process (``python -m ferry.resident``) in its own session, with nothing of
the command's descriptors, that logs in on its own with the credentials that just worked
(handed over through a pipe, never the command line or the environment), checks that the server
presents the certificate the command just checked, and then listens. The command does not wait
for it; ``ferry resident start`` does (:func:`start`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ferry.resident import runtime, thin

#: Environment variables the resident process does not inherit: the secrets it needs come
#: through the pipe, and its /proc/PID/environ should not show them for its whole life.
_SECRET_VARS = ("FERRY_PASSWORD", "FERRY_TOKEN")
#: Seconds ``ferry resident start`` waits for the new process to log in.
START_TIMEOUT = 30.0


def persist_seconds(no_resident: bool = False, env: Mapping[str, str] | None = None) -> int | None:
    """How long a new resident process should stay idle (None: the feature is off):
    ``--no-resident``, then FERRY_RESIDENT, then the config's ``[defaults] resident``, then
    :data:`~ferry.resident.runtime.DEFAULT_PERSIST`."""
    if no_resident:
        return None
    env = os.environ if env is None else env
    wanted = runtime.setting(env)
    if wanted is False:
        return None
    if isinstance(wanted, int) and wanted is not True:
        return wanted
    if wanted is None:
        from ferry.client.config import load_config

        configured = load_config().defaults.resident
        if configured is False:
            return None
        if isinstance(configured, int) and configured is not True:
            return runtime.clamp_persist(configured)
    return runtime.DEFAULT_PERSIST


def creds_digest(
    identities: Sequence[str], token_file: str | None, password_file: str | None, env: Mapping[str, str]
) -> str:
    """What a command asks to log in with, as a digest: the key, token and password files it
    names and the FERRY_TOKEN and FERRY_PASSWORD it has. A resident process serves only commands
    that ask for what it logged in with: a read-only token or a wrong password must not borrow a
    login that another command made."""

    def secret(name: str) -> str | None:
        value = env.get(name)
        return None if value is None else hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()

    def where(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(os.path.expanduser(path))

    wanted = [[where(i) for i in identities], where(token_file), where(password_file), secret("FERRY_TOKEN"), secret("FERRY_PASSWORD")]
    return hashlib.sha256(json.dumps(wanted).encode()).hexdigest()


@dataclass
class Spec:
    """What a new resident process needs (written to its standard input as JSON)."""

    key: str
    host: str
    port: int
    user: str
    plain: bool
    persist: int
    #: the certificate the starting command saw (None: plain); the resident refuses another one
    fingerprint: str | None
    creds: str
    password: str | None = None
    token: str | None = None
    identities: tuple[str, ...] = ()
    agent: bool | str = True
    default_keys: bool = True
    passphrase: str | None = None


def alive(key: str, env: Mapping[str, str] | None = None) -> bool:
    """Whether a resident process for ``key`` answers (a stale socket is removed)."""
    path = runtime.socket_path(key, os.environ if env is None else env)
    if path is None:
        return False
    sock = thin.connect(path)
    if sock is None:
        return False
    sock.close()
    return True


def start(spec: Spec, *, wait: bool = False) -> str | None:
    """Start a resident process for ``spec`` unless one answers already. With ``wait``, wait
    (at most :data:`START_TIMEOUT`) until it listens and return None (also when one was there
    already), or the reason it did not start; without, return None at once."""
    if runtime.socket_path(spec.key, os.environ, create=True) is None:
        return "no private runtime folder for the socket (see docs/cli.md)" if wait else None
    if alive(spec.key):
        return None
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_VARS}
    label = f"{spec.user}@{spec.host}:{spec.port}"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.resident", label],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if wait else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            start_new_session=True,  # no terminal: Ctrl-C and hang-ups of the caller's session miss it
            cwd="/",
            env=env,
        )
    except OSError as exc:
        return f"cannot start the resident process: {exc.strerror or exc}" if wait else None
    assert proc.stdin is not None
    with contextlib.suppress(OSError):
        proc.stdin.write(json.dumps(spec.__dict__).encode())
        proc.stdin.close()
    if not wait:
        return None
    assert proc.stdout is not None
    try:
        line = _read_line(proc.stdout.fileno(), START_TIMEOUT)
    finally:
        proc.stdout.close()
    if line.startswith("ready"):
        return None
    return line.removeprefix("failed: ") or "the resident process ended without saying why"


def _read_line(fd: int, timeout: float) -> str:
    """The first line the process writes (bounded by ``timeout``)."""
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return "failed: the resident process did not start in time"
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")


def ask(path: str, kind: bytes) -> bytes | None:
    """Send a control request (``info``, ``stop``) to the resident at ``path``; its whole answer
    (None: nobody answers there)."""
    sock = thin.connect(path)
    if sock is None:
        return None
    try:
        sock.settimeout(5.0)
        sock.sendall(runtime.encode_request(kind, []))
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
        return data
    except OSError:
        return None
    finally:
        sock.close()


def residents(env: Mapping[str, str] | None = None) -> list[tuple[str, dict[str, object]]]:
    """``(socket path, what it says about itself)`` of every resident process of this user."""
    folder = runtime.runtime_dir(os.environ if env is None else env)
    if folder is None:
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".sock"):
            continue
        path = os.path.join(folder, name)
        answer = ask(path, b"info")
        if answer is None or not answer.startswith(runtime.INFO):
            continue
        with contextlib.suppress(ValueError):
            found.append((path, json.loads(answer[1:])))
    return found
