"""Issue 10, break 3 (the server-wide part): descriptors never run out in a way that hangs clients.

A real ``ferry serve`` process with a low ``RLIMIT_NOFILE``: it raises its soft limit to the hard
one, refuses new connections with a clear ``busy`` once its reserve is reached (instead of
admitting them to fail later, or leaving them hanging in the backlog), keeps serving the sessions
it has, and takes new ones again as soon as descriptors are free.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from pathlib import Path

import pytest

from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.errors import ConnectionBroken
from ferry.server.accounts import Accounts
from serve_process import ServeProcess

PASSWORD = "a long and honest password"
SOFT, HARD = 128, 256


def low_descriptor_limit() -> None:
    """preexec_fn: start the server with a soft limit of 128 and a hard limit of 256."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (SOFT, HARD))


def soft_limit_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start(tmp_path: Path, **kw: object) -> ServeProcess:
    env = dict(os.environ, FERRY_HOME=str(tmp_path / "client-home"), PYTHONUNBUFFERED="1")
    root = tmp_path / "root"
    acc = Accounts(root)
    try:
        acc.add("alice", PASSWORD)
    finally:
        acc.close()
    return ServeProcess(root, env, **kw).start()  # type: ignore[arg-type]


async def login(srv: ServeProcess, tmp_path: Path, timeout: float = 10.0) -> AsyncClient:
    return await AsyncClient.connect(
        "127.0.0.1",
        srv.port,
        user="alice",
        password=PASSWORD,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        timeout=timeout,
    )


@pytest.mark.timeout(180)
def test_near_the_descriptor_limit_new_clients_are_refused_clearly_and_the_server_recovers(
    tmp_path: Path,
) -> None:
    srv = start(tmp_path, preexec_fn=low_descriptor_limit)
    assert srv.proc is not None
    try:
        assert soft_limit_of(srv.proc.pid) == HARD  # raised from 128 at start
        log = (srv.root / "logs" / "ferry.log").read_text(encoding="utf-8")
        assert f"descriptors: limit {HARD} (raised from {SOFT})" in log

        async def main() -> None:
            sessions: list[AsyncClient] = []
            refusal: ConnectionBroken | None = None
            try:
                for _ in range(HARD):  # each session holds 2 descriptors: this must hit the reserve
                    t0 = time.monotonic()
                    try:
                        sessions.append(await login(srv, tmp_path))
                    except ConnectionBroken as exc:
                        refusal = exc
                        assert time.monotonic() - t0 < 5  # told at once, not left hanging
                        break
                assert refusal is not None and "out of connection capacity" in str(refusal), refusal
                assert len(sessions) >= 50, len(sessions)  # the reserve is a quarter at most
                assert srv.proc is not None and open_fds(srv.proc.pid) < HARD
                for c in sessions[:3]:  # the sessions it has are still served
                    assert (await c.stat("")).kind == "dir"
                for c in sessions[-10:]:
                    await c.close()
                del sessions[-10:]
                deadline = time.monotonic() + 10
                while True:  # the server notices the closed sessions within moments
                    try:
                        sessions.append(await login(srv, tmp_path))
                        break
                    except ConnectionBroken:
                        assert time.monotonic() < deadline, "no recovery after sessions closed"
                        await asyncio.sleep(0.2)
                assert (await sessions[-1].stat("")).kind == "dir"
            finally:
                for c in sessions:
                    await c.close()

        asyncio.run(main())
    finally:
        assert srv.stop(signal.SIGTERM) == 0


@pytest.mark.timeout(120)
def test_when_accept_runs_out_of_descriptors_the_client_still_hears_busy(tmp_path: Path) -> None:
    """Descriptors used up behind the reserve's back (here: the operator lowers the limit of the
    running server to what it has open): accept() fails, and the server spends one of its spare
    descriptors to take the connection anyway and say ``busy``, instead of leaving it in the
    backlog until the client times out."""
    srv = start(tmp_path)
    assert srv.proc is not None
    pid = srv.proc.pid
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:

        async def main() -> None:
            kept = await login(srv, tmp_path)
            try:
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid), hard))
                for _ in range(6):  # more than the spares: each is given back after its refusal
                    t0 = time.monotonic()
                    with pytest.raises(ConnectionBroken, match="out of connection capacity"):
                        await login(srv, tmp_path, timeout=5)
                    assert time.monotonic() - t0 < 4
                assert (await kept.stat("")).kind == "dir"  # the session it has is still served
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
                deadline = time.monotonic() + 10
                while True:
                    try:
                        async with await login(srv, tmp_path) as c:
                            assert (await c.stat("")).kind == "dir"
                        break
                    except ConnectionBroken:
                        assert time.monotonic() < deadline, "no recovery after the limit was raised"
                        await asyncio.sleep(0.2)
            finally:
                await kept.close()

        asyncio.run(main())
    finally:
        assert srv.stop(signal.SIGTERM) == 0
