"""Revocation: `ferry user ...` (another process) ends exactly the sessions it must, within seconds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.client.aclient import AsyncClient
from ferry.errors import AuthError, FerryError
from ferry.server.accounts import Accounts
from ferry.server.context import Limits
from ferry.server.credentials import Credentials
from ferry_server import CHEAP_HASHER, PASSWORD, ServerThread
from login_support import REVOCATION_WITHIN, KeySet, ended
from serve_process import run_ferry
from transfer_support import connect_with as connect
from transfer_support import running_server

#: How long a revocation may take here (the server checks every second; the machine is shared).
WITHIN = REVOCATION_WITHIN


@pytest.fixture
def server(tmp_path: Path, keys: KeySet) -> Iterator[ServerThread]:
    with running_server(
        tmp_path / "root", limits=Limits(revocation_interval=0.5), exec_allowed=True, users=("alice",)
    ) as srv:
        srv.add_user("bob")
        with Accounts(srv.root, hasher=CHEAP_HASHER) as acc:
            Credentials(acc).add_keys("alice", keys.ed25519.pub + keys.ecdsa.pub)
        yield srv


def user_cmd(srv: ServerThread, ferry_env: dict[str, str], *args: str, stdin: str | None = None) -> None:
    """``ferry user ARGS --root ROOT`` in its own process, as an admin would run it."""
    r = run_ferry(["user", *args, "--root", str(srv.root)], ferry_env, input=stdin)
    assert r.returncode == 0, r.stderr


async def alive(c: AsyncClient) -> bool:
    try:
        await c.ping()
    except FerryError:
        return False
    return True


def test_key_and_token_revocation_ends_only_their_sessions(
    server: ServerThread, tmp_path: Path, keys: KeySet, ferry_env: dict[str, str]
) -> None:
    with Accounts(server.root, hasher=CHEAP_HASHER) as acc:
        record, token = Credentials(acc).add_token("alice")

    async def main() -> None:
        by_ed = await connect(server, tmp_path, key=keys.ed25519.path)
        by_ec = await connect(server, tmp_path, key=keys.ecdsa.path)
        by_token = await connect(server, tmp_path, token=token)
        by_password = await connect(server, tmp_path, password=PASSWORD)
        try:
            started = time.monotonic()
            await asyncio.to_thread(user_cmd, server, ferry_env, "key", "del", "alice", keys.ed25519.fingerprint)
            reason = await ended(by_ed)
            assert reason is not None and reason.startswith("AuthError"), reason
            assert f"the key {keys.ed25519.fingerprint} was removed" in reason
            assert time.monotonic() - started < WITHIN
            assert await alive(by_ec) and await alive(by_token) and await alive(by_password)

            await asyncio.to_thread(user_cmd, server, ferry_env, "token", "del", "alice", record.id)
            reason = await ended(by_token)
            assert reason is not None and f"the token {record.id} was revoked" in reason
            assert await alive(by_ec) and await alive(by_password)

            # A password change ends the password sessions only.
            await asyncio.to_thread(user_cmd, server, ferry_env, "passwd", "alice", "--password-stdin", stdin="new pw\n")
            reason = await ended(by_password)
            assert reason is not None and "your password was changed" in reason
            assert await alive(by_ec)
        finally:
            for c in (by_ed, by_ec, by_token, by_password):
                await c.close()

    asyncio.run(main())
    log = (server.root / "logs" / "ferry.log").read_text()
    assert "result=revoked: the key" in log


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("del", "alice"), "your account was deleted"),
        (("mod", "alice", "--disable"), "your account was disabled"),
        (("mod", "alice", "--no-exec"), "your right to run programs was changed"),
        (("mod", "alice", "--allow", "ls"), "your right to run programs was changed"),
    ],
)
def test_account_changes_end_sessions(
    server: ServerThread, tmp_path: Path, keys: KeySet, ferry_env: dict[str, str], change: tuple[str, ...], why: str
) -> None:
    async def main() -> None:
        a1 = await connect(server, tmp_path, key=keys.ed25519.path)
        a2 = await connect(server, tmp_path, password=PASSWORD)
        b = await connect(server, tmp_path, "bob", password=PASSWORD)
        proc = await a1.start(["sleep", "30"])  # a running command is ended with its session
        try:
            await asyncio.to_thread(user_cmd, server, ferry_env, *change)
            for c in (a1, a2):
                reason = await ended(c)
                assert reason is not None and why in reason, reason
            assert await alive(b)  # another user is not touched
        finally:
            for c in (a1, a2, b):
                await c.close()
        assert proc is not None

    asyncio.run(main())


def test_quota_change_keeps_the_session_and_applies(
    server: ServerThread, tmp_path: Path, ferry_env: dict[str, str]
) -> None:
    async def main() -> None:
        c = await connect(server, tmp_path, password=PASSWORD)
        try:
            assert (await c.df()).quota is None
            await asyncio.to_thread(user_cmd, server, ferry_env, "mod", "alice", "--quota", "1M")
            deadline = time.monotonic() + WITHIN
            while (await c.df()).quota != 1 << 20 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert (await c.df()).quota == 1 << 20
            assert await alive(c)
        finally:
            await c.close()

    asyncio.run(main())


def test_session_of_an_expiring_token_ends_at_expiry(server: ServerThread, tmp_path: Path) -> None:
    with Accounts(server.root, hasher=CHEAP_HASHER) as acc:
        _, token = Credentials(acc).add_token("bob", expires=int(time.time()) + 2)

    async def main() -> None:
        c = await connect(server, tmp_path, "bob", token=token)
        try:
            reason = await ended(c, within=WITHIN + 2)
            assert reason is not None and "expired" in reason
        finally:
            await c.close()
        with pytest.raises(AuthError):
            await connect(server, tmp_path, "bob", token=token)

    asyncio.run(main())
