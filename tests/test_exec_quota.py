"""Exec and the quota (issue 10): a command's writes are not counted against the quota, but each
file a command of a user with a quota writes is limited to what was left of the quota when it
started (``RLIMIT_FSIZE``, set in the child before exec). Real server, real processes."""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
from pathlib import Path

import pytest

from cli_inproc import run_cli
from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry_server import PASSWORD, ServerThread

MiB = 1 << 20
QUOTA = MiB
ALREADY = 256 << 10  # stored before the first command: what is left is QUOTA - ALREADY
BIG = 10 * MiB
XFSZ_STATUS = 128 + signal.SIGXFSZ  # 153 on Linux

pytestmark = pytest.mark.shared_server(
    quinn={"exec_allowed": True, "quota": QUOTA},
    quentin={"exec_allowed": True, "quota": QUOTA},
    una={"exec_allowed": True},  # no quota: no limit
)


def home(srv: ServerThread, user: str) -> Path:
    return srv.root / "homes" / user


def run(srv: ServerThread, tmp: Path, user: str, command: str) -> tuple[int, int | None, bytes]:
    """Run ``command`` (through the user's shell) as ``user``: (exit code, signal, stderr)."""

    async def main() -> tuple[int, int | None, bytes]:
        c = await AsyncClient.connect(
            "127.0.0.1", srv.port, user=user, password=PASSWORD, known_hosts=KnownHosts(tmp / "known_hosts")
        )
        async with c:
            r = await c.run(command, timeout=60)
            return r.exit_code, r.signal, r.stderr

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_a_command_cannot_write_a_file_past_what_is_left_of_the_quota(server: ServerThread, tmp_path: Path) -> None:
    (home(server, "quinn") / "kept").write_bytes(b"k" * ALREADY)
    code, sig, _ = run(server, tmp_path, "quinn", f"head -c {BIG} /dev/zero > f")
    assert code == XFSZ_STATUS, (code, sig)  # head killed by SIGXFSZ (the shell may report 128+25)
    assert (home(server, "quinn") / "f").stat().st_size == QUOTA - ALREADY  # bounded: not 10 MiB
    # Python ignores SIGXFSZ itself: its write fails with EFBIG ("File too large") instead.
    write = f"open('g', 'wb').write(bytes({BIG}))"
    code, sig, err = run(server, tmp_path, "quinn", f"{shlex.quote(sys.executable)} -c {shlex.quote(write)}")
    assert code != 0 and b"File too large" in err, (code, err)
    assert (home(server, "quinn") / "g").stat().st_size <= QUOTA - ALREADY


@pytest.mark.timeout(60)
def test_without_a_quota_a_command_writes_freely(server: ServerThread, tmp_path: Path) -> None:
    code, sig, err = run(server, tmp_path, "una", f"head -c {BIG} /dev/zero > f")
    assert (code, sig) == (0, None), err
    assert (home(server, "una") / "f").stat().st_size == BIG


@pytest.mark.timeout(60)
def test_ferry_exec_says_why_the_command_stopped(server: ServerThread, ferry_env: dict[str, str]) -> None:
    (home(server, "quentin") / "kept").write_bytes(b"k" * ALREADY)
    target = f"ferry://quentin@127.0.0.1:{server.port}"
    r = run_cli(
        ["exec", "-n", target, "--", "sh", "-c", f"head -c {BIG} /dev/zero > h"],
        env={**ferry_env, "FERRY_PASSWORD": PASSWORD},
    )
    assert r.code == XFSZ_STATUS, r
    assert "(SIGXFSZ): a file it wrote reached the file size limit" in r.stderr and "quota" in r.stderr, r.stderr
    assert (home(server, "quentin") / "h").stat().st_size == QUOTA - ALREADY
