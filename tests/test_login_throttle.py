"""The failed-login slowdown: a storm of wrong passwords from one address is slowed (bounded, logged)
while the real user logs in from another address without delay."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

from ferry.client.tls import client_ssl_context
from ferry.server.context import Limits
from ferry.server.throttle import Throttle, ThrottlePolicy
from ferry.wire import CONNECTION_ENDED, NEED_DATA, Connection, Role
from ferry.wire import messages as m
from ferry.wire.codes import ErrorCode
from ferry_server import PASSWORD, ServerThread


async def raw_login(port: int, user: str, password: str, source: str, timeout: float = 20.0) -> m.Message | None:
    """One password login from ``source`` (a loopback address); the server's answer, None if it closed."""
    conn = Connection(Role.CLIENT)
    try:  # a refusal beyond admission's budget is a reset, even during the TLS handshake
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ssl_context(), server_hostname="127.0.0.1", local_addr=(source, 0)
        )
    except (ConnectionError, ssl.SSLError):
        return None

    async def next_message() -> m.Message | None:
        while True:
            ev = conn.next_event()
            if ev is CONNECTION_ENDED:
                return None
            if ev is NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            assert isinstance(ev, m.Message)
            return ev

    try:
        async with asyncio.timeout(timeout):
            writer.write(conn.send(m.Hello(min_version=1, max_version=m.PROTOCOL_VERSION)))
            welcome = await next_message()
            if not isinstance(welcome, m.Welcome):  # e.g. refused: admission's per-address limit
                return welcome
            writer.write(conn.send(m.Auth(user=user, password=password)))
            return await next_message()
    except (ConnectionError, TimeoutError):
        return None
    finally:
        writer.close()


def test_password_storm_is_slowed_while_the_real_user_logs_in(tmp_path: Path) -> None:
    policy = ThrottlePolicy(free_per_address=3, free_per_user=3, base=0.25, max_address_delay=2.0, max_user_delay=1.0)
    srv = ServerThread(tmp_path / "root", limits=Limits(auth_fail_delay=0.05))
    srv.add_user("alice")
    srv.start()
    assert srv.server.ctx is not None
    srv.server.ctx.throttle.policy = policy  # the same code with shorter bounds, so the test is quick
    storm_seconds = 5.0

    async def main() -> tuple[dict[str, int], list[float], list[float], float]:
        # The real user logged in from 127.0.0.1 before: a known place for alice.
        assert isinstance(await raw_login(srv.port, "alice", PASSWORD, "127.0.0.1"), m.AuthOk)
        outcomes = {"checked": 0, "refused": 0, "busy": 0, "other": 0}  # busy: refused by admission
        start = time.monotonic()
        stop = start + storm_seconds
        checked_at: list[float] = []

        async def attacker(n: int) -> None:
            while time.monotonic() < stop:  # bounded in time; each login is bounded too
                reply = await raw_login(srv.port, "alice", f"guess {n}", "127.0.0.2")
                if isinstance(reply, m.Error) and "too many failed logins" in reply.message:
                    outcomes["refused"] += 1
                elif isinstance(reply, m.Error) and reply.code == ErrorCode.REFUSED:
                    outcomes["busy"] += 1  # admission refused the connection before any login
                elif isinstance(reply, m.Error) and reply.code == "auth":
                    outcomes["checked"] += 1
                    checked_at.append(time.monotonic() - start)
                else:
                    outcomes["other"] += 1

        storm = [asyncio.create_task(attacker(n)) for n in range(20)]
        await asyncio.sleep(1.0)  # the storm is under way
        real: list[float] = []
        for _ in range(5):
            t0 = time.monotonic()
            assert isinstance(await raw_login(srv.port, "alice", PASSWORD, "127.0.0.1"), m.AuthOk)
            real.append(time.monotonic() - t0)
            await asyncio.sleep(0.3)
        # From an address alice never used: slowed by at most the bounded per-user delay.
        t0 = time.monotonic()
        assert isinstance(await raw_login(srv.port, "alice", PASSWORD, "127.0.0.3"), m.AuthOk)
        new_place = time.monotonic() - t0
        await asyncio.gather(*storm)
        return outcomes, checked_at, real, new_place

    try:
        outcomes, checked_at, real, new_place = asyncio.run(main())
    finally:
        srv.stop()
    # The first wave of 20 connections is checked before any failure is known (admission limits
    # how many connections one address may open). After that, 20 connections for 5 s with a
    # 0.05 s failure delay would be hundreds of guesses; spaced by at most 2 s, a handful.
    late = [t for t in checked_at if t > 2.0]
    assert len(late) <= 4, (outcomes, checked_at)
    assert outcomes["refused"] > 0, outcomes
    assert max(real) < 1.0, real  # generous: on this shared machine a login takes ~20-100 ms
    assert new_place < policy.max_user_delay + 1.0, new_place
    log = (tmp_path / "root" / "logs" / "ferry.log").read_text()
    assert "auth failed method=password user=alice peer=127.0.0.2:" in log
    assert "auth refused (too many failures) method=password user=alice peer=127.0.0.2:" in log
    assert "next_attempt_delay=2.0" in log


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_policy_grows_is_bounded_and_forgets() -> None:
    clock = Clock()
    p = ThrottlePolicy(free_per_address=2, free_per_user=100, base=1.0, max_address_delay=4.0, forget_after=60.0)
    t = Throttle(p, clock)
    assert t.reserve("a", "u", password=True) == 0.0
    spacings = [t.failed("a", "u") for _ in range(6)]
    assert spacings == [0.0, 1.0, 2.0, 4.0, 4.0, 4.0]  # doubling, then bounded
    waits = [t.reserve("a", "u", password=True) for _ in range(3)]
    assert waits == [0.0, 4.0, None]  # a turn further away than the bound is refused, not queued
    assert t.reserve("b", "u", password=True) == 0.0  # another address is not slowed
    clock.now += 120.0  # quiet for longer than forget_after
    assert t.failures("a") == 0 and t.reserve("a", "u", password=True) == 0.0


def test_per_user_pacing_spares_known_addresses_and_keys() -> None:
    clock = Clock()
    p = ThrottlePolicy(free_per_address=1000, free_per_user=2, base=1.0, max_user_delay=3.0)
    t = Throttle(p, clock)
    t.succeeded("home", "ann")
    for n in range(10):  # a distributed storm against ann: each address fails once
        t.failed(f"bot{n}", "ann")
    assert t.reserve("home", "ann", password=True) == 0.0  # the real user's usual place
    assert t.reserve("elsewhere", "ann", password=False) == 0.0  # keys and tokens are not paced by name
    waits = [t.reserve(f"new{n}", "ann", password=True) for n in range(5)]
    assert waits[0] == 0.0 and all(w is not None and w <= p.max_user_delay for w in waits)
    assert max(w for w in waits if w is not None) == p.max_user_delay  # bounded, never a lock-out
