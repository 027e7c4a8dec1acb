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
import json
import os
import secrets
import signal
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import obstore
import pytest

from components import HAProxy, Weed, dsn_with, run_sql, start_haproxy
from conftest import FERRY
from ferry.client.aclient import AsyncClient
from ferry.client.known_hosts import KnownHosts
from ferry.client.transfer import partial_path
from ferry.errors import AlreadyExists, ChunkDamaged, DiskFull, FerryError, NotFound, StoreUnavailable
from ferry.server.accounts import Accounts
from ferry.server.tls import generate_certificate
from ferry.store.api import CHUNK_SIZE
from ferry.store.chunks import open_store
from ferry.store.objects import ObjectStorage
from serve_process import ServeProcess
from store_support import object_keys, open_storage, put_file, run, s3_config

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


# --- 1. visible everywhere at once --------------------------------------------------------------


def test_put_through_a_is_listed_and_read_through_b_at_once(fleet: Fleet, tmp_path: Path) -> None:
    """A small (inline) and a chunked file put through A: B lists and stats them with the first
    request after A's reply, and B and the proxy serve them byte-identical with the same digest."""
    user = fleet.add_user()
    a, b, _ = fleet.ports()
    small = random_file(tmp_path / "small", 100_000)
    big = random_file(tmp_path / "big", 2 * CHUNK_SIZE + 12345)

    async def main() -> None:
        async with fleet.clients(user, a, b, fleet.proxy_port) as (on_a, on_b, via_proxy):
            for name, data in (("small", small), ("big", big)):
                await on_a.mkdir("d", parents=True)
                put = await on_a.put(tmp_path / name, f"d/{name}.bin")
                st = await on_b.stat(f"d/{name}.bin")  # at once: no wait, no retry
                assert (st.kind, st.size) == ("file", len(data))
                assert f"{name}.bin" in [e.name for e in await on_b.listdir("d")]
                for i, c in enumerate((on_b, via_proxy)):
                    dest = tmp_path / f"{name}-{i}.out"
                    got = await c.get(f"d/{name}.bin", dest)
                    assert dest.read_bytes() == data
                    assert got.digest == put.digest and got.size == len(data)

    run(main(), 90)


# --- 2. mv is atomic and copies nothing --------------------------------------------------------


def test_mv_is_atomic_and_copies_no_data(fleet: Fleet) -> None:
    """A renames a 3-chunk file back and forth; B lists the folder in a loop meanwhile: every listing
    (one request, one snapshot) shows exactly one of the two names; C stats both names in a loop:
    each is the whole file or not there, never a file being filled. The file keeps its chunk records
    and the bucket its objects (nothing written, nothing deleted), and each rename takes a database
    round trip, not the time of moving 12 MiB."""
    user = fleet.add_user()
    a, b, c = fleet.ports()
    data = os.urandom(3 * CHUNK_SIZE - 1000)

    async def main() -> None:
        async with fleet.storage() as st:
            # Set up through the store (an upload is not what this test is about).
            await st.mkdir(user[0], ("m",), parents=True, exist_ok=True, mode=0o755)
            await put_file(st, user[0], ("m", "one"), data)
            before_keys = await owner_keys(st, user[0])
            before_refs = (await st.open_file(user[0], ("m", "one"))).chunks
            assert len(before_keys) == 3
            async with fleet.clients(user, a, b, c) as (on_a, on_b, on_c):
                stop = asyncio.Event()
                seen: list[tuple[str, ...]] = []
                stats: list[tuple[str, int | None]] = []
                names = ("one", "two")

                async def reader() -> None:
                    while not stop.is_set() and len(seen) < 5000:
                        seen.append(tuple(sorted(e.name for e in await on_b.listdir("m"))))

                async def stat_reader() -> None:
                    while not stop.is_set() and len(stats) < 5000:
                        for n in names:
                            try:
                                e = await on_c.stat(f"m/{n}")
                                stats.append((n, e.size if e.kind == "file" else -1))
                            except NotFound:
                                stats.append((n, None))

                task = asyncio.gather(reader(), stat_reader())
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
                assert {size for _, size in stats} <= {len(data), None}, stats
                assert {n for n, size in stats if size == len(data)} == {"one", "two"}
                assert slowest < 5.0, slowest  # a database round trip (generous: a loaded machine)
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


@pytest.mark.parametrize("size", [1000, CHUNK_SIZE + 5000], ids=["inline", "chunked"])
def test_racing_put_without_overwrite_exactly_one_wins(fleet: Fleet, tmp_path: Path, size: int) -> None:
    """Two clients put different bytes to one new path through A and B with ``overwrite=False``:
    one wins, the other gets ``exists``, and the file holds the winner's bytes, whole."""
    user = fleet.add_user()
    a, b, _ = fleet.ports()

    async def main() -> None:
        async with fleet.clients(user, a, b) as (on_a, on_b):
            for i in range(4):
                srcs = [tmp_path / f"src{i}{side}" for side in "ab"]
                contents = [random_file(p, size) for p in srcs]
                results = await asyncio.gather(
                    on_a.put(srcs[0], f"p{i}", overwrite=False),
                    on_b.put(srcs[1], f"p{i}", overwrite=False),
                    return_exceptions=True,
                )
                won = [k for k, r in enumerate(results) if not isinstance(r, BaseException)]
                assert len(won) == 1, results
                loss = results[1 - won[0]]
                assert isinstance(loss, AlreadyExists) and loss.code == "exists", repr(loss)
                dest = tmp_path / f"got{i}"
                await on_a.get(f"p{i}", dest)
                assert dest.read_bytes() == contents[won[0]]

    run(main(), 90)


# --- 4. quota across servers -------------------------------------------------------------------


def test_quota_holds_across_servers(fleet: Fleet, tmp_path: Path) -> None:
    """Uploads through A, B and C at once that together exceed the user's quota: what is stored
    never exceeds it, the refused ones get ``quota``, and the usage matches the files."""
    quota = 20 * MiB
    user = fleet.add_user(quota=quota)
    size = 8 * MiB  # three of them: 24 MiB > 20 MiB, two fit

    async def main() -> None:
        async with fleet.clients(user, *fleet.ports()) as clients:
            srcs = [tmp_path / f"q{i}" for i in range(3)]
            for p in srcs:
                random_file(p, size)
            results = await asyncio.gather(
                *(c.put(p, p.name) for c, p in zip(clients, srcs, strict=True)), return_exceptions=True
            )
            refused = [r for r in results if isinstance(r, BaseException)]
            assert refused, f"all three uploads were stored: {results}"
            assert all(isinstance(r, DiskFull) and r.code == "quota" for r in refused), refused
            listed = await clients[2].listdir("")
            stored = sum(e.size for e in listed)
            assert stored <= quota
            assert len(listed) == 3 - len(refused)
            usage = await clients[1].df()
            assert usage.used == stored and usage.quota == quota
            assert usage.partial == 0  # the refused uploads hold no reservation afterwards

    run(main(), 90)


# --- 5. interrupted uploads resume elsewhere ---------------------------------------------------


async def wait_for_objects(
    st: ObjectStorage, user: str, count: int, unless: Any, timeout: float = 30.0
) -> set[str]:
    """Poll the bucket (bounded) until ``user`` has ``count`` chunk objects; fail if ``unless()``."""
    deadline = time.monotonic() + timeout
    while True:
        keys = await owner_keys(st, user)
        if len(keys) >= count:
            return keys
        assert not unless(), "the upload ended before it could be interrupted"
        assert time.monotonic() < deadline, f"only {len(keys)} chunk objects after {timeout} s"
        await asyncio.sleep(0.05)


def test_server_killed_mid_upload_resumes_through_another(fleet: Fleet, tmp_path: Path) -> None:
    """``ferry put`` of 48 MiB to server D (slowed with --bwlimit, so that the kill lands mid-upload
    on a loaded machine too); D is killed with SIGKILL once a few chunks are in the bucket, and the
    put fails. The same put through B resumes: it sends only what was not stored, writes only the
    missing chunk objects, and C serves the whole file with the same digest."""
    user = fleet.add_user()
    _, b, c = fleet.ports()
    data = random_file(tmp_path / "big", 48 * MiB)
    chunks = len(data) // CHUNK_SIZE
    d = fleet.start_server("d")
    argv = [
        *FERRY,
        "put",
        "-q",
        "--bwlimit",
        "16M",
        str(tmp_path / "big"),
        f"ferry://{user[0]}@127.0.0.1:{d.port}/big.bin",
    ]

    async def main() -> None:
        async with fleet.storage() as st:
            proc = subprocess.Popen(
                argv, env=fleet.ferry_env(user), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            try:
                await wait_for_objects(st, user[0], 3, lambda: proc.poll() is not None)
                fleet.stop_server(d, signal.SIGKILL)
                _, err = await asyncio.to_thread(proc.communicate, timeout=30)
            finally:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            assert proc.returncode != 0 and "Traceback" not in err, err
            held = await owner_keys(st, user[0])
            assert 3 <= len(held) < chunks
            async with fleet.clients(user, b, c) as (on_b, on_c):
                r = await on_b.put(tmp_path / "big", "big.bin")  # the same token as the CLI's
                assert r.resumed_from >= CHUNK_SIZE, r
                assert r.sent == len(data) - r.resumed_from, r
                written = await owner_keys(st, user[0]) - held
                assert len(written) == chunks - len(held), (len(written), chunks, len(held))
                got = await on_c.get("big.bin", tmp_path / "out")
                assert got.digest == r.digest
                assert (tmp_path / "out").read_bytes() == data

    run(main(), 100)


def test_client_killed_mid_upload_resumes_through_another_server(fleet: Fleet, tmp_path: Path) -> None:
    """``ferry put`` (a real process, slowed with --bwlimit) to A is killed with SIGKILL after a few
    chunks are stored; ``ferry put`` of the same file through B resumes from there."""
    user = fleet.add_user()
    a, b, _ = fleet.ports()
    data = random_file(tmp_path / "big", 32 * MiB)
    chunks = len(data) // CHUNK_SIZE
    env = fleet.ferry_env(user)

    def put_args(port: int, *more: str) -> list[str]:
        return [*FERRY, "put", *more, str(tmp_path / "big"), f"ferry://{user[0]}@127.0.0.1:{port}/big.bin"]

    async def main() -> None:
        async with fleet.storage() as st:
            proc = subprocess.Popen(
                put_args(a, "--bwlimit", "8M", "-q"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                await wait_for_objects(st, user[0], 3, lambda: proc.poll() is not None)
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.communicate(timeout=10)
            held = await owner_keys(st, user[0])
            assert 3 <= len(held) < chunks
            r = await asyncio.to_thread(
                subprocess.run, put_args(b, "--json"), env=env, capture_output=True, text=True, timeout=60
            )
            assert r.returncode == 0, r.stderr
            rec = json.loads(r.stdout.splitlines()[-1])
            assert rec["resumed_from"] >= CHUNK_SIZE, rec
            assert rec["sent"] == len(data) - rec["resumed_from"], rec
            assert len(await owner_keys(st, user[0]) - held) == chunks - len(held)
            async with fleet.clients(user, fleet.proxy_port) as (c,):
                await c.get("big.bin", tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == data

    run(main(), 100)


# --- 6. damaged or missing chunk objects --------------------------------------------------------


@pytest.mark.parametrize("damage", ["deleted", "damaged"])
def test_missing_or_damaged_chunk_fails_get_clearly_and_keeps_no_file(
    fleet: Fleet, tmp_path: Path, damage: str
) -> None:
    """The middle chunk of a 3-chunk file is deleted from the bucket, or overwritten with other bytes
    of its size: a get through any server fails with ``corrupt``, and the client has no file under
    the final name (and whatever it keeps to resume is a true prefix of the file)."""
    user = fleet.add_user()
    data = random_file(tmp_path / "src", 3 * CHUNK_SIZE - 77)

    async def main() -> None:
        async with fleet.clients(user, *fleet.ports(), fleet.proxy_port) as clients:
            await clients[0].put(tmp_path / "src", "f.bin")
            async with fleet.storage() as st:
                ref = (await st.open_file(user[0], ("f.bin",))).chunks[1]
                raw = open_store(s3_config(fleet.weed, fleet.prefix))
                key = st.chunks.key(ref)
                if damage == "deleted":
                    await obstore.delete_async(raw, key)
                else:
                    await obstore.put_async(raw, key, os.urandom(ref.size))
            for i, c in enumerate(clients):
                dest = tmp_path / f"out{i}.bin"
                with pytest.raises(ChunkDamaged) as err:
                    await c.get("f.bin", dest)
                assert err.value.code == "corrupt"
                assert ("missing" if damage == "deleted" else "does not match") in str(err.value)
                assert not dest.exists()
                part = partial_path(dest)
                if part.exists():
                    kept = part.read_bytes()
                    assert data.startswith(kept), "the client kept bytes that are not the file's"
                await c.ping()  # the session goes on

    run(main(), 90)


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


def test_object_store_going_away_gives_clear_errors_then_recovers(
    fleet: Fleet, relayed: tuple[list[ServeProcess], Any, Any, Any], tmp_path: Path
) -> None:
    """With the store unreachable, gets and puts fail with ``unavailable`` (the client keeps no file,
    the namespace still answers); once it is back, both servers serve again without a restart, and
    the file acknowledged before reads back whole."""
    (e, f), _, s3_relay, restart = relayed
    user = fleet.add_user()
    data = random_file(tmp_path / "kept", 2 * CHUNK_SIZE + 1)
    random_file(tmp_path / "new", CHUNK_SIZE + 1)

    async def main() -> None:
        async with fleet.clients(user, e.port, f.port) as (on_e, on_f):
            await on_e.put(tmp_path / "kept", "kept.bin")
            s3_relay().stop()
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable) as err:
                await on_f.get("kept.bin", tmp_path / "out")
            assert err.value.code == "unavailable" and time.monotonic() - t0 < 25
            assert not (tmp_path / "out").exists()
            with pytest.raises(StoreUnavailable):
                await on_e.put(tmp_path / "new", "new.bin")
            assert (await on_f.stat("kept.bin")).size == len(data)  # the namespace still answers
            with pytest.raises(FerryError):
                await on_f.stat("new.bin")  # the failed put left nothing visible
            restart("s3")
            deadline = time.monotonic() + 20
            for c in (on_f, on_e):
                while True:
                    try:
                        await c.get("kept.bin", tmp_path / "out")
                        break
                    except StoreUnavailable:
                        assert time.monotonic() < deadline, "the store came back but is not served"
                        await asyncio.sleep(0.2)
                assert (tmp_path / "out").read_bytes() == data
                (tmp_path / "out").unlink()
            await on_e.put(tmp_path / "new", "new.bin")
            assert (await on_f.stat("new.bin")).size == CHUNK_SIZE + 1

    run(main(), 100)


# --- 8. the sweeper ----------------------------------------------------------------------------


def test_sweeper_removes_chunks_of_removed_files_and_keeps_shared_ones(fleet: Fleet, tmp_path: Path) -> None:
    """With --chunk-grace 2 s: the chunk objects of a removed file leave the bucket after the grace;
    content the same user keeps under another name keeps its objects (and reads back), and the same
    content held by another user keeps that user's objects (de-duplication is per user)."""
    user, other = fleet.add_user(), fleet.add_user()
    # Every chunk above the size kept inline in the database (the last one too): each is an object.
    kept = random_file(tmp_path / "kept", CHUNK_SIZE + MiB)
    random_file(tmp_path / "gone", 2 * CHUNK_SIZE + MiB)
    a, b, c = fleet.ports()

    async def main() -> None:
        async with (
            fleet.storage() as st,
            fleet.clients(user, a, b) as (on_a, on_b),
            fleet.clients(other, c) as (on_c,),
        ):
            await on_a.put(tmp_path / "kept", "one")
            await on_b.put(tmp_path / "kept", "two")  # same content, same user: no new object
            await on_a.put(tmp_path / "gone", "gone")
            await on_c.put(tmp_path / "gone", "theirs")
            mine = await owner_keys(st, user[0])
            theirs = await owner_keys(st, other[0])
            assert (len(mine), len(theirs)) == (2 + 3, 3)
            gone_refs = (await st.open_file(user[0], ("gone",))).chunks
            gone_keys = {st.chunks.key(r) for r in gone_refs}
            await on_b.remove("gone")
            await on_a.remove("one")
            t0 = time.monotonic()
            while (await owner_keys(st, user[0])) & gone_keys:  # bounded: grace + a few sweeps
                assert time.monotonic() - t0 < CHUNK_GRACE + 15, "chunks of a removed file were not swept"
                await asyncio.sleep(0.2)
            assert time.monotonic() - t0 >= CHUNK_GRACE - 0.5, "swept before the grace ended"
            await asyncio.sleep(2 * SWEEP_INTERVAL)  # more sweeps: what is referenced must stay
            assert await owner_keys(st, user[0]) == mine - gone_keys
            assert await owner_keys(st, other[0]) == theirs
            await on_a.get("two", tmp_path / "two.out")
            assert (tmp_path / "two.out").read_bytes() == kept
            await on_c.get("theirs", tmp_path / "theirs.out")
            assert (tmp_path / "theirs.out").read_bytes() == (tmp_path / "gone").read_bytes()

    run(main(), 90)
