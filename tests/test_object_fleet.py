"""What N servers on the object backend guarantee (issue 14, "What N servers must guarantee"), shown
end to end: three real ``ferry serve --store s3://... --db postgresql://... --cert --key`` processes
behind a real HAProxy, over the real SeaweedFS and PostgreSQL, clients through the proxy and straight
to a named server where a test needs "server A" and "server B".

The three servers are started once for the module (each start costs about a second); the tests do
not interfere because each works as its own user. Tests that kill a server start one of their own
beside the fleet (same database and bucket), and those that take the database or the store away
start servers that reach them through relays they stop and start again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from components import HAProxy, Weed, dsn_with, run_sql, start_haproxy
from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.errors import AlreadyExists, StoreUnavailable
from ferry.server.accounts import Accounts
from ferry.server.tls import generate_certificate
from ferry.store.api import CHUNK_SIZE
from ferry.store.objects import ObjectStorage
from serve_process import ServeProcess
from store_support import object_keys, open_storage, put_file, run

pytestmark = [pytest.mark.timeout(120)]

#: Short enough that the sweeper test waits seconds, long enough for the small-file window (a chunk
#: claimed before it is referenced) on a loaded machine; every fleet server sweeps this often.
CHUNK_GRACE = 2.0
SWEEP_INTERVAL = 0.5
MiB = 1 << 20


@dataclass
class Fleet:
    """Three ``ferry serve`` processes on one database schema and one bucket prefix, behind HAProxy."""

    tmp: Path
    weed: Weed
    dsn: str
    prefix: str
    cert: Path
    key: Path
    env: dict[str, str]
    servers: list[ServeProcess]
    proxy: HAProxy | None = None
    extra: list[ServeProcess] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)

    @property
    def store_url(self) -> str:
        return f"s3://{self.weed.bucket}/{self.prefix}"

    def serve_args(self, *, dsn: str | None = None, endpoint: str | None = None) -> list[str]:
        """``ferry serve`` options of a server of this fleet (``dsn``/``endpoint``: reach the database
        or the store another way, e.g. through a relay)."""
        args = [
            "--db",
            dsn or self.dsn,
            "--store",
            self.store_url,
            "--cert",
            str(self.cert),
            "--key",
            str(self.key),
        ]
        args += ["--chunk-grace", str(CHUNK_GRACE), "--sweep-interval", str(SWEEP_INTERVAL)]
        if endpoint is not None:
            args += ["--s3-endpoint", endpoint]
        return args

    def start_server(self, name: str, **kw: Any) -> ServeProcess:
        """One more server on the same database and bucket (stopped at the end of the module)."""
        s = ServeProcess(
            self.tmp / f"root-{name}-{secrets.token_hex(3)}", self.env, args=self.serve_args(**kw)
        )
        self.extra.append(s)
        return s.start()

    def stop_server(self, s: ServeProcess, sig: int = signal.SIGTERM) -> None:
        """Stop one server, keeping what it logged while it served (see :meth:`check_logs`)."""
        if s.proc is not None and s.proc.poll() is None:
            self.logs[s.root.name] = (s.root.parent / f"serve-{s.root.name}.err").read_text(errors="replace")
        s.stop(sig)

    def check_logs(self) -> None:
        """No server logged a traceback while it served: that is a bug even when every client got a
        clear error. (Read before each stop: what a server prints while it exits is not checked.)"""
        for name, log in self.logs.items():
            assert "Traceback" not in log, f"{name}: {log[-4000:]}"

    def add_user(self, *, quota: int | None = None) -> tuple[str, str]:
        """A fresh account in the shared database: (name, password)."""
        name, password = f"u{secrets.token_hex(4)}", secrets.token_urlsafe(12)
        with Accounts(None, db=self.dsn) as accounts:
            accounts.add(name, password, quota=quota)
        return name, password

    async def connect(self, port: int, user: tuple[str, str]) -> AsyncClient:
        """A client of ``user`` on ``port`` (one certificate everywhere: one pin per port file)."""
        c = await AsyncClient.connect(
            "127.0.0.1", port, user=user[0], password=user[1], known_hosts=KnownHosts(self.tmp / f"kh-{port}")
        )
        c.read_timeout = 30.0
        return c

    @contextlib.asynccontextmanager
    async def clients(self, user: tuple[str, str], *ports: int) -> AsyncIterator[list[AsyncClient]]:
        """Clients of ``user`` on each of ``ports``, closed at the end."""
        out: list[AsyncClient] = []
        try:
            for p in ports:
                out.append(await self.connect(p, user))
            yield out
        finally:
            for c in out:
                with contextlib.suppress(Exception):
                    await c.close()

    @contextlib.asynccontextmanager
    async def storage(self) -> AsyncIterator[ObjectStorage]:
        """The store as a server sees it (to count and damage chunk objects, never to serve)."""
        st = await open_storage(self.weed, self.prefix, self.dsn)
        try:
            yield st
        finally:
            await st.close()

    def ports(self) -> list[int]:
        """The ports of servers A, B and C."""
        return [s.port for s in self.servers]

    @property
    def proxy_port(self) -> int:
        """The one address of the fleet (HAProxy's port)."""
        assert self.proxy is not None
        return self.proxy.port

    def ferry_env(self, user: tuple[str, str]) -> dict[str, str]:
        """Environment of a ``ferry`` client process of ``user``."""
        home = self.tmp / f"home-{user[0]}"
        home.mkdir(exist_ok=True)
        return {**os.environ, "FERRY_HOME": str(home), "FERRY_PASSWORD": user[1], "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, weed: Weed, pg_database: str) -> Iterator[Fleet]:
    """Three servers of one namespace behind HAProxy, for the whole module."""
    tmp = tmp_path_factory.mktemp("fleet")
    schema = f"t_{secrets.token_hex(6)}"
    run_sql(f"CREATE SCHEMA {schema}", pg_database)
    cert_pem, key_pem = generate_certificate()
    (tmp / "cert.pem").write_bytes(cert_pem)
    (tmp / "key.pem").write_bytes(key_pem)
    os.chmod(tmp / "key.pem", 0o600)
    env = {**os.environ, "FERRY_HOME": str(tmp / "ferry-home"), "PYTHONUNBUFFERED": "1", **weed.env()}
    f = Fleet(
        tmp,
        weed,
        dsn_with(pg_database, schema=schema),
        f"fleet/{secrets.token_hex(6)}/",
        tmp / "cert.pem",
        tmp / "key.pem",
        env,
        [],
    )
    try:
        for name in "abc":
            f.servers.append(ServeProcess(tmp / f"root-{name}", env, args=f.serve_args()).start())
        f.proxy = start_haproxy(tmp / "haproxy", [("127.0.0.1", p) for p in f.ports()])
        yield f
    finally:
        if f.proxy is not None:
            f.proxy.stop()
        for s in [*f.servers, *f.extra]:
            if s.proc is not None:
                f.stop_server(s)
        run_sql(f"DROP SCHEMA {schema} CASCADE", pg_database)
    f.check_logs()


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def owner_keys(st: ObjectStorage, user: str) -> set[str]:
    """The chunk objects of ``user`` in the bucket."""
    return await object_keys(st, await st.namespace.owner_id(user))


# --- 2. mv is atomic and copies nothing --------------------------------------------------------


def test_mv_is_atomic_and_copies_no_data(fleet: Fleet) -> None:
    """A renames a 3-chunk file back and forth; B lists the folder in a loop meanwhile: every listing
    (one request, one snapshot) shows exactly one of the two names. The file keeps its chunk records
    and the bucket its objects (nothing written, nothing deleted), and each rename takes a database
    round trip, not the time of moving 12 MiB."""
    user = fleet.add_user()
    a, b, _ = fleet.ports()
    data = os.urandom(3 * CHUNK_SIZE - 1000)

    async def main() -> None:
        async with fleet.storage() as st:
            # Set up through the store (an upload is not what this test is about).
            await st.mkdir(user[0], ("m",), parents=True, exist_ok=True, mode=0o755)
            await put_file(st, user[0], ("m", "one"), data)
            before_keys = await owner_keys(st, user[0])
            before_refs = (await st.open_file(user[0], ("m", "one"))).chunks
            assert len(before_keys) == 3
            async with fleet.clients(user, a, b) as (on_a, on_b):
                stop = asyncio.Event()
                seen: list[tuple[str, ...]] = []

                async def reader() -> None:
                    while not stop.is_set() and len(seen) < 5000:
                        seen.append(tuple(sorted(e.name for e in await on_b.listdir("m"))))

                task = asyncio.create_task(reader())
                names = ("one", "two")
                slowest = 0.0
                try:
                    for i in range(40):
                        t0 = time.monotonic()
                        await on_a.rename(f"m/{names[i % 2]}", f"m/{names[(i + 1) % 2]}")
                        slowest = max(slowest, time.monotonic() - t0)
                        await asyncio.sleep(0)  # let the reader in between renames too
                finally:
                    stop.set()
                    await task
                assert len(seen) >= 20, "the reader hardly ran during the renames"
                bad = [s for s in seen if s not in (("one",), ("two",))]
                assert not bad, f"{len(bad)} of {len(seen)} listings saw both names or neither: {bad[:5]}"
                assert {s[0] for s in seen} == {"one", "two"}  # it saw the renames happen
                assert slowest < 2.0, slowest
                assert (await on_b.stat("m/one")).size == len(data)  # 40 renames: back at "one"
            assert await owner_keys(st, user[0]) == before_keys
            after = (await st.open_file(user[0], ("m", "one"))).chunks
            assert [(r.id, r.hash) for r in after] == [(r.id, r.hash) for r in before_refs]

    run(main(), 90)


# --- 3. racing creators ------------------------------------------------------------------------


def test_racing_mkdir_through_two_servers_exactly_one_wins(fleet: Fleet) -> None:
    user = fleet.add_user()
    a, b, _ = fleet.ports()

    async def main() -> None:
        async with fleet.clients(user, a, b) as (on_a, on_b):
            for i in range(15):
                results = await asyncio.gather(
                    on_a.mkdir(f"r{i}"), on_b.mkdir(f"r{i}"), return_exceptions=True
                )
                wins = [r for r in results if r is None]
                losses = [r for r in results if r is not None]
                assert len(wins) == 1, results
                (loss,) = losses
                assert isinstance(loss, AlreadyExists) and loss.code == "exists", repr(loss)
                assert f"r{i}" in str(loss)
            assert sorted(e.name for e in await on_a.listdir("")) == sorted(f"r{i}" for i in range(15))

    run(main(), 60)


# --- 7. the database or the store going away ----------------------------------------------------


@pytest.fixture
def relayed(fleet: Fleet, weed: Weed, haproxy: Any) -> Iterator[tuple[list[ServeProcess], Any, Any, Any]]:
    """Two servers of the fleet's namespace that reach PostgreSQL and the store through relays (TCP
    proxies the test stops and starts again on the same port): (servers, pg relay, s3 relay, restart)."""
    pg = urllib.parse.urlsplit(fleet.dsn)
    pg_target = (pg.hostname or "127.0.0.1", pg.port or 5432)
    s3_target = ("127.0.0.1", int(weed.endpoint.rsplit(":", 1)[1]))
    relays = {"pg": haproxy([pg_target]), "s3": haproxy([s3_target])}
    targets = {"pg": pg_target, "s3": s3_target}

    def restart(which: str) -> None:
        relays[which] = haproxy([targets[which]], port=relays[which].port)

    dsn = urllib.parse.urlunsplit(
        pg._replace(netloc=f"{pg.username or 'postgres'}@127.0.0.1:{relays['pg'].port}")
    )
    endpoint = f"http://127.0.0.1:{relays['s3'].port}"
    servers = [fleet.start_server(n, dsn=dsn, endpoint=endpoint) for n in ("e", "f")]
    try:
        yield servers, (lambda: relays["pg"]), (lambda: relays["s3"]), restart
    finally:
        for s in servers:
            fleet.stop_server(s)
    fleet.check_logs()


async def until_served(c: AsyncClient, path: str, timeout: float = 20.0) -> float:
    """Retry ``stat`` (bounded) until the server serves again; the seconds it took."""
    t0 = time.monotonic()
    while True:
        try:
            await c.stat(path)
            return time.monotonic() - t0
        except StoreUnavailable:
            assert time.monotonic() - t0 < timeout, f"not served again within {timeout} s"
            await asyncio.sleep(0.1)


def test_database_going_away_gives_clear_errors_then_recovers(
    fleet: Fleet, relayed: tuple[list[ServeProcess], Any, Any, Any]
) -> None:
    """With the database unreachable, requests on open sessions fail fast with ``unavailable`` (the
    sessions stay open); once it is back, the same sessions are served again, without a restart,
    and what was acknowledged before is there."""
    (e, f), pg_relay, _, restart = relayed
    user = fleet.add_user()

    async def main() -> None:
        async with fleet.clients(user, e.port, f.port) as (on_e, on_f):
            await on_e.mkdir("kept/inner", parents=True)
            pg_relay().stop()
            for c, op in (
                (on_e, on_e.stat("kept")),
                (on_f, on_f.mkdir("lost")),
                (on_f, on_f.listdir("kept")),
            ):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable) as err:
                    await op
                assert err.value.code == "unavailable" and "database" in str(err.value), err.value
                assert time.monotonic() - t0 < 20
                assert await c.ping() < 5  # the session goes on
            # Long enough for every periodic task (the accounts poll each second, the sweeper) to
            # meet the outage: none may end the sessions or the server.
            await asyncio.sleep(2.5)
            for c in (on_e, on_f):
                assert await c.ping() < 5
            restart("pg")
            for c in (on_e, on_f):
                await until_served(c, "kept/inner")
            assert [x.name for x in await on_f.listdir("kept")] == ["inner"]
            await on_f.mkdir("after")
            assert sorted(x.name for x in await on_e.listdir("")) == ["after", "kept"]  # "lost" never made
        # New logins work too (accounts are in the same database).
        async with fleet.clients(user, e.port) as (again,):
            assert (await again.stat("after")).kind == "dir"

    run(main(), 100)
