"""The cache of recently verified passwords (ferry.server.pwcache): repeated logins of one account
skip argon2, and nothing else gets cheaper or weaker (wrong passwords, changed passwords, disabled
accounts). Real server, real TLS logins."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ferry.errors import AuthError
from ferry.server.accounts import Accounts, User
from ferry.server.context import Limits
from ferry.server.pwcache import VerifiedPasswords
from ferry.wire import messages as m
from ferry_server import CHEAP_HASHER, PASSWORD, ServerThread
from test_admission import send_login, slow_checks
from transfer_support import connect, running_server, wait_until


def login(srv: ServerThread, tmp_path: Path, password: str = PASSWORD) -> None:
    async def main() -> None:
        async with await connect(srv, tmp_path, password=password) as c:
            await c.stat("")

    asyncio.run(main())


def checks(srv: ServerThread) -> tuple[int, int]:
    """(argon2 checks started, logins answered from the cache)."""
    ctx = srv.server.ctx
    assert ctx is not None
    return ctx.logins.checks, ctx.auth.verified.hits


def accounts(srv: ServerThread) -> Accounts:
    return Accounts(srv.root, hasher=CHEAP_HASHER)


def test_repeated_logins_of_one_account_pay_argon2_once(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    login(srv, tmp_path)
    assert checks(srv) == (1, 0)
    for _ in range(3):
        login(srv, tmp_path)
    assert checks(srv) == (1, 3)


def test_a_wrong_password_still_goes_through_argon2_and_fails(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    login(srv, tmp_path)
    with pytest.raises(AuthError):
        login(srv, tmp_path, password="not the password")
    assert checks(srv) == (2, 0)


def test_a_changed_password_makes_the_cached_one_useless(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    login(srv, tmp_path)
    acc = accounts(srv)
    try:
        acc.set_password("alice", "a new password")
    finally:
        acc.close()
    with pytest.raises(AuthError):
        login(srv, tmp_path)  # the old password, still in the cache under the old generation
    login(srv, tmp_path, password="a new password")
    assert checks(srv) == (3, 0)


def test_a_disabled_account_is_refused_although_its_password_is_cached(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    login(srv, tmp_path)
    acc = accounts(srv)
    try:
        acc.modify("alice", disabled=True)
    finally:
        acc.close()
    with pytest.raises(AuthError):
        login(srv, tmp_path)
    assert checks(srv)[1] == 0


def test_password_cache_zero_checks_every_login(tmp_path: Path) -> None:
    with running_server(tmp_path / "srv", limits=Limits(password_cache=0)) as srv:
        for _ in range(3):
            login(srv, tmp_path)
        assert checks(srv) == (3, 0)


def user(name: str = "alice", pw_gen: int = 0) -> User:
    return User(name, Path("/nonexistent"), None, False, None, pw_gen=pw_gen)


def test_entries_expire_and_stay_bounded() -> None:
    now = [0.0]
    cache = VerifiedPasswords(10.0, max_entries=2, clock=lambda: now[0])
    cache.remember(user(), "pw")
    assert cache.matches(user(), "pw")
    assert not cache.matches(user(), "other")
    assert not cache.matches(user("bob"), "pw")  # the name is part of the MAC
    now[0] = 10.0
    assert not cache.matches(user(), "pw")
    for name in ("a", "b", "c"):
        cache.remember(user(name), "pw")
    assert not cache.matches(user("a"), "pw")  # the oldest entry made room
    assert cache.matches(user("c"), "pw")
    off = VerifiedPasswords(0.0)
    off.remember(user(), "pw")
    assert not off.matches(user(), "pw")


@pytest.mark.timeout(90)
def test_logins_arriving_together_share_one_check(tmp_path: Path) -> None:
    """Four logins of one account with one password, sent while the first is being checked (one
    login thread, ~0.5 s a check): one argon2 check answers them all. A wrong password sent at the
    same time gets its own check, and fails."""
    with slow_checks(tmp_path, password_cache=600) as srv:
        ctx = srv.server.ctx
        assert ctx is not None
        clients = [send_login(srv.port) for _ in range(4)]
        wrong = send_login(srv.port, password="wrong")
        for c in clients:
            assert isinstance(c.next_event(timeout=30), m.AuthOk)
        ev = wrong.next_event(timeout=30)
        assert isinstance(ev, m.Error) and ev.code == "auth", ev
        for c in [*clients, wrong]:
            c.close()
        assert ctx.logins.checks == 2


@pytest.mark.timeout(90)
def test_a_shared_check_whose_client_left_is_done_for_the_next(tmp_path: Path) -> None:
    """The login that would have led a shared check leaves while it waits for a thread: the
    check is not spent on it, and the login that followed it gets a check of its own."""
    with slow_checks(tmp_path, password_cache=600) as srv:
        ctx = srv.server.ctx
        assert ctx is not None
        busy = send_login(srv.port, user="nobody", password="x")  # holds the only login thread
        assert wait_until(lambda: ctx.logins.checks == 1, 10)
        leader = send_login(srv.port)
        assert wait_until(lambda: ctx.logins.waiting == 1, 10)
        follower = send_login(srv.port)
        time.sleep(0.2)  # the follower has joined the leader's check (nothing to wait on: no event)
        leader.close()
        assert isinstance(follower.next_event(timeout=30), m.AuthOk)
        follower.close()
        busy.close()
        assert (ctx.logins.checks, ctx.logins.skipped) == (2, 1)
