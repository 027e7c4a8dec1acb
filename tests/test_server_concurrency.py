"""Many clients at once, and clients that stop reading: every transfer stays correct, a stalled
reader costs the server bounded memory, and the others are still served promptly."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from ferry.errors import AuthError, DiskFull, TransferError
from ferry.server.context import Limits
from ferry.wire import Data
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    SMALL_CHUNK,
    MiB,
    RawClient,
    SessionRecorder,
    connect,
    fd_count,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    no_sessions,
    on_server,
    partials,
    random_bytes,
    rss_bytes,
    running_server,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")

CLIENTS = 50


@pytest.mark.timeout(120)
@pytest.mark.parametrize("plain", [False, True], ids=["tls", "plain"])
def test_fifty_clients_upload_and_download_at_once(tmp_path: Path, plain: bool) -> None:
    local = tmp_path / "local"
    local.mkdir()
    # All clients log in at once from one address: allow that many logins in progress from it.
    limits = Limits(max_pending_logins_per_address=CLIENTS + 2)
    with running_server(tmp_path / "root", plain=plain, users=("alice", "bob"), limits=limits) as srv:
        homes = {u: home(srv, u) for u in ("alice", "bob")}
        sizes = [MiB + (i * 20011) % MiB for i in range(CLIENTS)]  # 1-2 MiB, all different
        ups = {}
        for i, size in enumerate(sizes):
            ups[i] = random_bytes(size, 1000 + i)
            (local / f"up{i}").write_bytes(ups[i])
            user = "alice" if i % 2 else "bob"
            (homes[user] / f"down{i}").write_bytes(random_bytes(size, 2000 + i))
        baseline = fd_count()

        async def one(i: int) -> float:
            user = "alice" if i % 2 else "bob"
            t0 = time.monotonic()
            async with await connect(srv, tmp_path, user=user) as c:
                put, got = await asyncio.gather(
                    c.put(local / f"up{i}", f"up{i}", chunk_size=1 << 18),
                    c.get(f"down{i}", local / f"down{i}", chunk_size=1 << 18),
                )
                assert put.size == got.size == sizes[i]
                await c.get(f"up{i}", local / f"back{i}")
                assert (await c.stat(f"up{i}")).size == sizes[i]
            return time.monotonic() - t0

        async def intruder() -> None:
            with pytest.raises(AuthError):
                await connect(srv, tmp_path, user="alice", password="wrong")

        async def main() -> list[float]:
            results = await asyncio.gather(*(one(i) for i in range(CLIENTS)), intruder(), intruder())
            return [r for r in results if isinstance(r, float)]

        t0 = time.monotonic()
        durations = asyncio.run(main())
        elapsed = time.monotonic() - t0
        assert len(durations) == CLIENTS
        for i in range(CLIENTS):
            user = "alice" if i % 2 else "bob"
            assert (homes[user] / f"up{i}").read_bytes() == ups[i], i
            assert (local / f"back{i}").read_bytes() == ups[i], i
            assert (local / f"down{i}").read_bytes() == (homes[user] / f"down{i}").read_bytes(), i
        for h in homes.values():
            assert partials(h) == []
        assert wait_until(lambda: no_sessions(srv), 15)
        assert wait_until(lambda: fd_count() <= baseline + 4), (fd_count(), baseline)
        print(f"{CLIENTS} clients, {sum(sizes) * 3 / MiB:.0f} MiB moved in {elapsed:.1f} s")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("plain", [False, True], ids=["tls", "plain"])
def test_a_stopped_reader_costs_bounded_memory_and_others_are_served(
    tmp_path: Path, plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SessionRecorder(monkeypatch)
    with running_server(tmp_path / "root", plain=plain) as srv:
        h = home(srv)
        with open(h / "huge.bin", "wb") as f:  # 200 MiB, sparse: cheap to create and to read
            f.truncate(200 * MiB)
        small = os.urandom(100_000)
        (h / "small.bin").write_bytes(small)
        medium = os.urandom(3 * MiB)
        (h / "medium.bin").write_bytes(medium)
        baseline_fds = fd_count()
        baseline_rss = rss_bytes()

        stalled = RawClient(srv.port, tls=not plain, rcvbuf=64 * 1024)
        try:
            stalled.login()
            stalled.send(m.GetFile(id=1, path="huge.bin"))
            assert isinstance(stalled.reply(1), m.FileInfo)
            first = stalled.next_event()
            assert isinstance(first, Data)
            # From now on the client reads nothing.
            port = stalled.sock.getsockname()[1]
            [session] = [s for s in recorder.sessions if s.peer.endswith(f":{port}")]

            def buffered() -> int:
                return session.writer.transport.get_write_buffer_size() + session._out._size

            samples: list[int] = []
            peak_rss = 0
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                samples.append(on_server(srv, buffered))
                peak_rss = max(peak_rss, rss_bytes())
                time.sleep(0.05)

            async def others() -> None:
                t0 = time.monotonic()
                async with await connect(srv, tmp_path) as c:
                    names = sorted(e.name for e in await c.listdir(""))
                    assert names == ["huge.bin", "medium.bin", "small.bin"]
                    await c.get("small.bin", tmp_path / "small.bin")
                    await c.get("medium.bin", tmp_path / "medium.bin")
                assert time.monotonic() - t0 < 5

            asyncio.run(others())
            samples.append(on_server(srv, buffered))
            assert max(samples) <= 4 * MiB, samples
            assert peak_rss - baseline_rss < 30 * MiB, (peak_rss - baseline_rss) / MiB
            assert (tmp_path / "small.bin").read_bytes() == small
            assert (tmp_path / "medium.bin").read_bytes() == medium
        finally:
            stalled.close()
        # The stalled session notices the reset and releases everything.
        assert wait_until(lambda: no_sessions(srv), 15)
        assert wait_until(lambda: fd_count() <= baseline_fds + 4), (fd_count(), baseline_fds)


@pytest.mark.timeout(60)
def test_parallel_uploads_cannot_exceed_the_quota_together(tmp_path: Path) -> None:
    """Each upload is checked against the quota when it starts; uploads running at the same time
    (several clients, or one client pipelining a tree) must not each count on the same free space."""
    quota = 10 * MiB
    size = 3 * MiB
    with running_server(tmp_path / "root", users=()) as srv:
        h = srv.add_user("carol", quota=quota)
        for i in range(8):
            (tmp_path / f"f{i}").write_bytes(random_bytes(size, 3000 + i))

        async def one(i: int) -> bool:
            async with await connect(srv, tmp_path, user="carol") as c:
                try:
                    await c.put(tmp_path / f"f{i}", f"f{i}", chunk_size=1 << 18)
                except DiskFull as exc:
                    assert exc.code == "quota"
                    return False
                return True

        async def main() -> list[bool]:
            return await asyncio.gather(*(one(i) for i in range(8)))

        ok = asyncio.run(main())
        stored = sum(p.stat().st_size for p in h.iterdir())
        assert stored <= quota, f"{stored / MiB:.0f} MiB stored with a {quota / MiB:.0f} MiB quota"
        assert 1 <= sum(ok) <= quota // size
        assert partials(h) == []


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_two_downloads_to_the_same_local_file_at_once(server: ServerThread, tmp_path: Path) -> None:
    """Both would write the same hidden partial: the second one's resume truncates it under the
    first, which could then verify its own stream and rename a file with a hole. Only one may run;
    the other is refused, and a success always means the file is exact."""
    srv = server
    data = random_bytes(16 * MiB, 77)
    (home(srv) / "big.bin").write_bytes(data)
    dest = tmp_path / "big.bin"

    async def main() -> None:
        async with await connect(srv, tmp_path) as a, await connect(srv, tmp_path) as b:
            halfway = asyncio.Event()

            def progress(done: int, total: int) -> None:
                if done >= total // 4:
                    halfway.set()

            first = asyncio.create_task(a.get("big.bin", dest, chunk_size=SMALL_CHUNK, progress=progress))
            await asyncio.wait_for(halfway.wait(), 20)
            with pytest.raises(TransferError, match="in progress"):
                await b.get("big.bin", dest, chunk_size=SMALL_CHUNK)
            r = await first
            assert r.size == len(data)
            assert dest.read_bytes() == data
            # Once the first one is done, the name is free again.
            await b.get("big.bin", dest)

    asyncio.run(main())
    assert dest.read_bytes() == data


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plain", [False, True], ids=["tls", "plain"])
def test_a_peer_that_never_reads_again_is_dropped_after_the_stall_timeout(tmp_path: Path, plain: bool) -> None:
    limits = Limits(stall_timeout=1.0)
    with running_server(tmp_path / "root", plain=plain, limits=limits) as srv:
        with open(home(srv) / "huge.bin", "wb") as f:
            f.truncate(200 * MiB)
        stalled = RawClient(srv.port, tls=not plain, rcvbuf=64 * 1024)
        try:
            stalled.login()
            stalled.send(m.GetFile(id=1, path="huge.bin"))
            assert isinstance(stalled.reply(1), m.FileInfo)
            t0 = time.monotonic()
            # The client reads nothing more; the server must give up on it by itself.
            assert wait_until(lambda: no_sessions(srv), 15)
            assert time.monotonic() - t0 >= 1.0
        finally:
            stalled.close()
