"""Issue 10, break 3 (the per-user part): one user cannot use up the server's descriptors with
open transfers.

The attack of the report: one user with 8 connections held 989 streamed uploads open without
sending a byte, and the server (1,024 descriptors) refused every new login. Here a real
``ferry serve`` process runs with a soft and hard ``RLIMIT_NOFILE`` of 1,024 (so raising the soft
limit gains nothing) and the same attack runs against it.
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
from ferry.client.mux import Route
from ferry.client.transfer import upload_token
from ferry.errors import RemoteError, RemoteTransferError, ServerBusy
from ferry.hashing import DEFAULT_CHUNK, ChunkHasher, small_digest
from ferry.server.accounts import Accounts
from ferry.server.context import Limits
from ferry.wire import messages as m
from ferry_server import PASSWORD as CHEAP_PASSWORD
from serve_process import ServeProcess
from transfer_support import RawClient, running_server

PASSWORD = "a long and honest password"
NOFILE = 1024  # the common service limit of the report
CONNECTIONS = 8
PER_CONNECTION = 128  # what each connection tries to hold open: 1,024 in all, the report's attack
MiB = 1 << 20


def service_descriptor_limit() -> None:
    """preexec_fn: soft and hard limit 1,024, as a service started with the common default."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start(tmp_path: Path, args: list[str] | None = None) -> ServeProcess:
    env = dict(os.environ, FERRY_HOME=str(tmp_path / "client-home"), PYTHONUNBUFFERED="1")
    root = tmp_path / "root"
    acc = Accounts(root)
    try:
        acc.add("mallory", PASSWORD)
        acc.add("bob", PASSWORD)
    finally:
        acc.close()
    return ServeProcess(root, env, args=args, preexec_fn=service_descriptor_limit).start()


async def login(port: int, tmp_path: Path, user: str, password: str = PASSWORD) -> AsyncClient:
    return await AsyncClient.connect(
        "127.0.0.1", port, user=user, password=password, known_hosts=KnownHosts(tmp_path / "known_hosts")
    )


def streamed(req_id: int, path: str) -> m.PutFile:
    """A streamed upload (size unknown, as from a pipe): the server opens its partial at once."""
    return m.PutFile(id=req_id, path=path, size=0, mtime=0.0, mode=0o644, streamed=True)


async def hold_uploads(c: AsyncClient, prefix: str, count: int) -> tuple[list[int], list[RemoteError]]:
    """Open ``count`` streamed uploads on one connection (pipelined) and send no data: the ids the
    server opened, and its refusals."""
    routes: list[tuple[int, Route]] = [c.mux.open() for _ in range(count)]
    for i, (req_id, _route) in enumerate(routes):
        await c.mux.send(streamed(req_id, f"{prefix}-{i}"))
    held: list[int] = []
    refused: list[RemoteError] = []
    for req_id, route in routes:
        try:
            await c.mux.expect(route, m.PutReady)
            held.append(req_id)
        except RemoteError as exc:
            refused.append(exc)
    return held, refused


@pytest.mark.timeout(180)
def test_one_user_cannot_hold_the_servers_descriptors_with_open_uploads(tmp_path: Path) -> None:
    srv = start(tmp_path)
    assert srv.proc is not None
    pid = srv.proc.pid
    assert resource.prlimit(pid, resource.RLIMIT_NOFILE) == (NOFILE, NOFILE)
    cap = Limits().max_uploads_per_user
    payload = os.urandom(MiB)  # large enough to be a real (non-inline) upload holding a partial
    (tmp_path / "payload").write_bytes(payload)
    try:

        async def main() -> None:
            attack = [await login(srv.port, tmp_path, "mallory") for _ in range(CONNECTIONS)]
            try:
                before = open_fds(pid)
                results = await asyncio.gather(
                    *(hold_uploads(c, f"hold{k}", PER_CONNECTION) for k, c in enumerate(attack))
                )
                held = sum(len(h) for h, _ in results)
                refusals = [e for _, r in results for e in r]
                fds = open_fds(pid)
                print(f"attack: {held} uploads held, {len(refusals)} refused; descriptors {before} -> {fds}")
                assert held == cap, held  # the per-user cap, over all 8 connections
                assert len(refusals) == CONNECTIONS * PER_CONNECTION - cap
                assert all(isinstance(e, ServerBusy) and e.code == "busy" for e in refusals)
                per_user = [e for e in refusals if "all connections" in str(e)]
                assert per_user, refusals[:3]  # the per-user cap refused some, and says which it is
                assert f"allows {cap} at once" in str(per_user[0]) and "mallory" in str(per_user[0])
                assert fds < NOFILE // 4, fds  # well below the limit: 1,023 before the fix
                for c in attack:  # busy failed the requests, not the connections
                    assert (await c.stat("")).kind == "dir"

                t0 = time.monotonic()
                async with await login(srv.port, tmp_path, "bob") as bob:
                    t_login = time.monotonic() - t0
                    await bob.put(tmp_path / "payload", "p")
                    t_put = time.monotonic() - t0 - t_login
                    await bob.get("p", tmp_path / "back")
                    t_all = time.monotonic() - t0
                print(f"second user: login {t_login:.3f} s, +put {t_put:.3f} s, login+put+get {t_all:.3f} s")
                assert (tmp_path / "back").read_bytes() == payload
                assert t_all < 1.0, t_all

                # Closing uploads gives their places back: the attacker may open as many again.
                await attack[0].close()
                deadline = time.monotonic() + 10
                while True:
                    held_again, _ = await hold_uploads(attack[1], "again", 1)
                    if held_again:
                        break
                    assert time.monotonic() < deadline, "the closed connection's uploads were never released"
                    await asyncio.sleep(0.1)
            finally:
                for c in attack:
                    await c.close()

        asyncio.run(main())
    finally:
        assert srv.stop(signal.SIGTERM) == 0


async def stalled_get(c: AsyncClient, path: str) -> tuple[int, Route]:
    """Ask for ``path`` and never read it: once the route's one-event queue is full the client stops
    reading its socket, and the server's download waits on the full connection with its file open."""
    req_id, route = c.mux.open(1)
    await c.mux.send(m.GetFile(id=req_id, path=path))
    return req_id, route


@pytest.mark.timeout(120)
def test_downloads_held_open_are_capped_per_user(tmp_path: Path) -> None:
    cap = 2
    with running_server(
        tmp_path / "root", limits=Limits(max_downloads_per_user=cap), users=("mallory", "bob")
    ) as srv:
        with open(srv.root / "homes" / "mallory" / "big", "wb") as f:
            f.truncate(256 * MiB)  # sparse: far more than the socket buffers and the 1 MiB write buffer
        (srv.root / "homes" / "mallory" / "small").write_bytes(b"x" * 1000)
        (srv.root / "homes" / "bob" / "own").write_bytes(b"b" * 1000)

        async def main() -> None:
            stalled = [await login(srv.port, tmp_path, "mallory", CHEAP_PASSWORD) for _ in range(cap)]
            other = await login(srv.port, tmp_path, "mallory", CHEAP_PASSWORD)
            try:
                for c in stalled:
                    _, route = await stalled_get(c, "big")
                    assert isinstance(await c.mux.recv(route, timeout=10), m.FileInfo)  # it is running
                t0 = time.monotonic()
                with pytest.raises(ServerBusy, match="too many open downloads") as info:
                    await other.get("small", tmp_path / "small")
                assert time.monotonic() - t0 < 1.0
                assert f"allows {cap} at once" in str(info.value)
                assert (await other.stat("")).kind == "dir"  # the request failed, not the connection
                async with await login(srv.port, tmp_path, "bob", CHEAP_PASSWORD) as bob:
                    await bob.get("own", tmp_path / "own")  # another user's downloads: not capped
                await stalled.pop(0).close()  # the stalled download ends with its connection
                deadline = time.monotonic() + 10
                while True:
                    try:
                        await other.get("small", tmp_path / "small")
                        break
                    except ServerBusy:
                        assert time.monotonic() < deadline, "the closed connection's download was never released"
                        await asyncio.sleep(0.1)
                assert (tmp_path / "small").read_bytes() == b"x" * 1000
            finally:
                for c in [*stalled, other]:
                    await c.close()

        asyncio.run(main())


@pytest.mark.timeout(120)
def test_an_idle_upload_is_closed_its_partial_kept_and_a_slow_one_is_not(tmp_path: Path) -> None:
    """``--upload-idle-timeout``: an upload that receives nothing is closed (its place and its
    descriptor given back, its partial kept for a resume, the client told why); one that receives
    a little at a time is not."""
    timeout = 1.0
    srv = start(tmp_path, ["--upload-idle-timeout", str(timeout), "--max-uploads-per-user", "1"])
    assert srv.proc is not None
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * DEFAULT_CHUNK))
    st = os.stat(src)
    data = src.read_bytes()
    try:

        async def main() -> None:
            async with await login(srv.port, tmp_path, "mallory") as c:
                c.read_timeout = 3 * timeout + 5  # without the fix: no answer at all
                req_id, route = c.mux.open()
                await c.mux.send(
                    m.PutFile(
                        id=req_id,
                        path="f",
                        size=len(data),
                        mtime=m.wire_time(st.st_mtime),
                        mode=0o644,
                        token=upload_token("f", st),
                        chunk_size=DEFAULT_CHUNK,
                    )
                )
                await c.mux.expect(route, m.PutReady)
                await c.mux.send(m.PutFrom(id=req_id, offset=0))
                for i in range(2):  # two whole chunks, then silence (a client that hangs)
                    await c.mux.send_data(req_id, m.STDIN, data[i * DEFAULT_CHUNK : (i + 1) * DEFAULT_CHUNK])
                with pytest.raises(ServerBusy):  # the idle upload holds the user's only place
                    await c.put(src, "other")
                t0 = time.monotonic()
                with pytest.raises(RemoteTransferError) as info:
                    await c.mux.expect(route, m.Ok)
                closed_after = time.monotonic() - t0
                c.mux.close_route(req_id)
                print(f"idle upload closed {closed_after:.2f} s after its last data (timeout {timeout} s): {info.value}")
                assert info.value.code == "cancelled"
                assert f"no data for {timeout:g} s" in str(info.value) and "partial file is kept" in str(info.value)
                assert closed_after < timeout + 3
                home = srv.root / "homes" / "mallory"
                partials = [p for p in home.iterdir() if ".ferry-part-" in p.name]
                assert len(partials) == 1 and partials[0].stat().st_size >= 2 * DEFAULT_CHUNK, partials
                # The place is free again, and the same put resumes after the two chunks it sent.
                result = await c.put(src, "f")
                assert result.resumed_from == 2 * DEFAULT_CHUNK, result
                assert (home / "f").read_bytes() == data

                # A slow upload is not an idle one: 512 KiB in 64 KiB pieces over ~3 s.
                slow = os.urandom(8 * 65536)
                hasher = ChunkHasher("blake3", DEFAULT_CHUNK)
                hasher.update(slow)
                hashes, digest = hasher.finish()
                req_id, route = c.mux.open()
                await c.mux.send(
                    m.PutFile(id=req_id, path="slow", size=len(slow), mtime=0.0, mode=0o644, token="slowtoken")
                )
                await c.mux.expect(route, m.PutReady)
                await c.mux.send(m.PutFrom(id=req_id, offset=0))
                for i in range(8):
                    await asyncio.sleep(timeout * 0.4)
                    await c.mux.send_data(req_id, m.STDIN, slow[i * 65536 : (i + 1) * 65536])
                await c.mux.send(m.FileEnd(id=req_id, size=len(slow), chunk_hashes=hashes, digest=digest))
                await c.mux.expect(route, m.Ok)
                c.mux.close_route(req_id)
                assert (home / "slow").read_bytes() == slow

        asyncio.run(main())
    finally:
        assert srv.stop(signal.SIGTERM) == 0


def process_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(60)
def test_a_tree_upload_waiting_for_its_next_batch_keeps_one_folder_open(tmp_path: Path) -> None:
    """A tree upload counts once against the user's open uploads, so what it holds while its client
    is silent must be small: it used to keep up to 32 of the tree's folders open between batches."""
    with running_server(tmp_path / "root", plain=True) as srv:
        raw = RawClient(srv.port)
        raw.login("alice")
        try:
            before = process_fds()  # the server runs in this process: its descriptors are ours
            raw.send(m.PutTree(id=1, path="up"))
            raw.send(m.TreeItems(id=1, items=[tree_file(f"d{i}/f", b"one") for i in range(40)], end=False))
            ack = raw.reply(1)
            assert isinstance(ack, m.TreeAck) and ack.files == 40, ack
            held = process_fds() - before
            print(f"a tree upload between batches holds {held} descriptor(s)")
            assert held <= 2, held  # the tree's root (before the fix: 33, the root and 32 folders)
            raw.send(m.TreeItems(id=1, items=[tree_file(f"d{i}/g", b"two") for i in range(40)], end=True))
            ack = raw.reply(1)
            assert isinstance(ack, m.TreeAck) and ack.files == 80 and ack.errors == [], ack
            assert (srv.root / "homes" / "alice" / "up" / "d39" / "g").read_bytes() == b"two"
        finally:
            raw.close()


def tree_file(path: str, data: bytes) -> m.TreeItem:
    return m.TreeItem(path=path, kind="file", size=len(data), data=data, digest=small_digest("blake3", data))


@pytest.mark.timeout(60)
def test_idle_tree_and_delta_uploads_are_closed_too(tmp_path: Path) -> None:
    """Tree and delta uploads hold files too (folders, a partial and its basis): one whose client
    sends nothing more is closed like a file upload, and its place is given back."""
    limits = Limits(upload_idle_timeout=0.5, max_uploads_per_user=1)
    with running_server(tmp_path / "root", plain=True, limits=limits) as srv:
        raw = RawClient(srv.port)
        raw.login("alice")
        try:
            raw.send(m.PutTree(id=1, path="up"))
            raw.send(m.TreeItems(id=1, items=[tree_file("a/f", b"one")], end=False))
            assert isinstance(raw.reply(1), m.TreeAck)
            raw.send(m.DeltaPut(id=2, path="d", size=10, mtime=0.0, token="t1"))
            busy = raw.reply(2)  # the tree holds the user's only place
            assert isinstance(busy, m.Error) and busy.code == "busy", busy
            t0 = time.monotonic()
            err = raw.reply(1)
            assert isinstance(err, m.Error) and err.code == "cancelled", err
            assert "no data for 0.5 s" in err.message and "files stored so far stay" in err.message, err
            assert time.monotonic() - t0 < 3
            assert (srv.root / "homes" / "alice" / "up" / "a" / "f").read_bytes() == b"one"
            raw.send(m.TreeItems(id=1, items=[tree_file("a/g", b"late")], end=True))  # dropped
            raw.send(m.DeltaPut(id=3, path="d", size=10, mtime=0.0, token="t2"))  # the place is free
            err = raw.reply(3)
            assert isinstance(err, m.Error) and err.code == "cancelled", err
            assert "delta upload; nothing was kept" in err.message, err
            assert not (srv.root / "homes" / "alice" / "up" / "a" / "g").exists()
            raw.send(m.Stat(id=4, path="up"))  # the connection goes on
            assert isinstance(raw.reply(4), m.StatReply)
        finally:
            raw.close()
