"""Tree transfers (GetTree / PutTree): real loopback sockets, real files, hostile peers.

The streaming tree protocol (the only way folders move: one protocol version): round trips,
integrity, hostile names, symlinks, quota, vanished and stalled clients, cancel, and the wire
messages themselves.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from conformance import BY_TRANSPORT, OBJECT, Cell
from fake_server import FakeServer
from ferry.client import tree as ctree
from ferry.errors import ConnectionBroken, DiskFull, IntegrityError, PathRefused, TransferError
from ferry.hashing import ChunkHasher, small_digest
from ferry.server import tree as stree
from ferry.server.jail import Jail, TreeDir, TreeFailure, TreeFile
from ferry.wire import Connection, Role
from ferry.wire import messages as m
from ferry.wire.connection import ALLOWED, State
from ferry.wire.errors import LocalProtocolError, MalformedMessage, UnexpectedMessage
from ferry_server import ServerThread
from transfer_support import (
    Interrupt,
    MiB,
    RawClient,
    SessionRecorder,
    await_until,
    connect,
    fd_count,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    no_sessions,
    on_server,
    running_server,
    wait_until,
)
from wire_strategies import tree_messages

pytestmark = pytest.mark.usefixtures("no_logged_errors")
INLINE = m.TREE_INLINE_MAX


def make_tree(root: Path) -> dict[str, bytes]:
    """Nested folders, empty ones, a deep chain (deeper than the descriptor caches), and files of
    0 bytes, small sizes, exactly the inline limit, and above it."""
    files: dict[str, bytes] = {}
    for i in range(120):
        files[f"d{i % 5}/s{i % 3}/f{i}.bin"] = os.urandom(i * 37 % 9000)
    files["empty.txt"] = b""
    files["d0/zero"] = b""
    files["edge/inline-max.bin"] = os.urandom(INLINE)
    files["edge/just-over.bin"] = os.urandom(INLINE + 1)
    files["edge/big.bin"] = os.urandom(5 * MiB + 3)
    deep = "/".join(f"n{i}" for i in range(80))
    files[f"{deep}/leaf.txt"] = b"deep"
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "exec.sh").write_bytes(b"#!/bin/sh\n")
    files["exec.sh"] = b"#!/bin/sh\n"
    os.chmod(root / "exec.sh", 0o750)
    os.utime(root / "exec.sh", (1_500_000_000, 1_500_000_000))
    for d in ("empty-dir", "d1/empty-sub", "nested/empty/deeper"):
        (root / d).mkdir(parents=True, exist_ok=True)
    return files


def folders(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir()}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".ferry-part" in p.name]


def check_copy(src: Path, dst: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data, rel
    assert folders(dst) == folders(src)
    st = (dst / "exec.sh").stat()
    assert (stat.S_IMODE(st.st_mode), int(st.st_mtime)) == (0o750, 1_500_000_000)
    assert leftovers(dst) == []


#: TLS and plain TCP on either backend (the transport changes how large files of a tree travel).
TRANSPORTS_AND_BACKENDS = [*BY_TRANSPORT, OBJECT, Cell("plain", backend="object")]


async def upload(c: Any, files: dict[str, bytes], remote: str, tmp_path: Path) -> None:
    """Make ``files`` (relative path -> bytes; a path ending in ``/`` is an empty folder) under
    ``remote`` through the client: how a test sets up the server's side on either backend."""
    src = tmp_path / f"upload-{time.monotonic_ns()}"
    src.mkdir()
    for rel, data in files.items():
        if rel.endswith("/"):
            (src / rel).mkdir(parents=True, exist_ok=True)
            continue
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    await c.put_tree(src, remote)
    shutil.rmtree(src)


async def remote_names(c: Any, remote: str = "") -> list[str]:
    """Every name under ``remote`` through the client (partial uploads are listed by neither backend)."""
    return sorted(e.name for e in await c.listdir(remote, recursive=True))


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cell", TRANSPORTS_AND_BACKENDS, ids=[c.id for c in TRANSPORTS_AND_BACKENDS])
def test_tree_round_trip(server: ServerThread, cell: Cell, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    srv = server

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            up = await c.put_tree(src, "a/tree")
            assert (up.files, up.bytes) == (len(files), sum(map(len, files.values())))
            down = await c.get_tree("a/tree", tmp_path / "dst")
            assert (down.files, down.bytes) == (up.files, up.bytes)

    asyncio.run(main())
    if not cell.objects:
        check_copy(src, home(srv) / "a" / "tree", files)
    check_copy(src, tmp_path / "dst", files)
    log = (srv.root / "logs" / "ferry.log").read_text()
    # One line per tree, not per file (large files still log their own get/put).
    assert log.count("op=put-tree") == 1 and log.count("op=get-tree") == 1
    assert f"files={len(files) - 2} errors=0" in log  # the 2 files above the inline limit stream
    assert log.count(" op=put ") == 2 and log.count(" op=get ") == 2


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_md5_trees_and_the_home_as_root(server: ServerThread, cell: Cell, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "x" / "a").write_bytes(b"alpha")
    (src / "b").write_bytes(b"")
    srv = server

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            await c.put_tree(src, ".", hash="md5")
            await c.get_tree("", tmp_path / "dst", hash="md5")

    asyncio.run(main())
    if not cell.objects:
        assert (home(srv) / "x" / "a").read_bytes() == b"alpha"
    assert (tmp_path / "dst" / "x" / "a").read_bytes() == b"alpha"
    assert (tmp_path / "dst" / "b").read_bytes() == b""


def test_small_digest_is_the_single_chunk_file_digest() -> None:
    for data in (b"", b"x", os.urandom(70_000)):
        for name in ("blake3", "md5"):
            h = ChunkHasher(name)  # type: ignore[arg-type]
            h.update(data)
            assert small_digest(name, data) == h.finish()[1]  # type: ignore[arg-type]


# --- a hostile or broken server (scripted on the wire) ------------------------------------


def file_item(path: str, data: bytes, *, digest: bytes | None = None) -> m.TreeItem:
    return m.TreeItem(
        path=path,
        kind="file",
        size=len(data),
        mtime=1e9,
        mode=0o644,
        data=data,
        digest=small_digest("blake3", data) if digest is None else digest,
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "name", ["../escape", "/etc/evil", "a/../../b", "a//b", "./a", "", "a\0b", "fine/.."]
)
def test_unsafe_names_from_a_server_are_refused_before_anything_is_written(tmp_path: Path, name: str) -> None:
    fake = FakeServer(
        [
            [m.TreeItem(path="fine", kind="dir"), file_item("fine/ok", b"ok"), file_item(name, b"evil")],
            [file_item("later", b"more")],  # not the end yet: the client must tell the server to stop
        ]
    )

    async def main() -> None:
        async with fake.running(), await fake.client(tmp_path) as c:
            with pytest.raises(TransferError, match="unsafe name"):
                await c.get_tree("x", tmp_path / "out" / "dest")
            assert await c.ping() < 5

    asyncio.run(main())
    assert not (tmp_path / "out").exists()  # the batch was refused as a whole: not even the root
    assert not (tmp_path / "escape").exists() and not Path("/etc/evil").exists()
    assert any(isinstance(x, m.Cancel) for x in fake.received)  # the server was told to stop


@pytest.mark.timeout(30)
def test_a_corrupt_record_is_detected_and_never_appears_under_its_name(tmp_path: Path) -> None:
    good = os.urandom(3000)
    bad = bytearray(os.urandom(3000))
    digest = small_digest("blake3", bytes(bad))
    bad[100] ^= 1  # flipped in transit, after the sender hashed it
    fake = FakeServer([[file_item("good", good)], [file_item("bad", bytes(bad), digest=digest)]])

    async def main() -> None:
        async with fake.running(), await fake.client(tmp_path) as c:
            with pytest.raises(IntegrityError, match="bad"):
                await c.get_tree("x", tmp_path / "dest")

    asyncio.run(main())
    assert (tmp_path / "dest" / "good").read_bytes() == good
    assert not (tmp_path / "dest" / "bad").exists()
    assert leftovers(tmp_path / "dest") == []


@pytest.mark.timeout(30)
def test_a_record_whose_size_disagrees_with_its_data_is_refused(tmp_path: Path) -> None:
    item = file_item("f", b"abc")
    lying = m.TreeItem(path="f", kind="file", size=4, data=b"abc", digest=item.digest)
    fake = FakeServer([[lying]])

    async def main() -> None:
        async with fake.running(), await fake.client(tmp_path) as c:
            with pytest.raises(IntegrityError):
                await c.get_tree("x", tmp_path / "dest")

    asyncio.run(main())
    assert list((tmp_path / "dest").iterdir()) == []


# --- the server's tree: symlinks, per-file errors ------------------------------------------


def outside_secret(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret").write_bytes(b"top secret")
    return out


@pytest.mark.timeout(30)
def test_symlinks_in_the_server_tree_are_not_followed(tmp_path: Path) -> None:
    out = outside_secret(tmp_path)
    with running_server(tmp_path / "root") as srv:
        t = home(srv) / "t"
        (t / "sub").mkdir(parents=True)
        (t / "a.txt").write_bytes(b"a")
        (t / "sub" / "b.txt").write_bytes(b"b")
        os.symlink(out, t / "link-dir")
        os.symlink(out / "secret", t / "sub" / "link-file")

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                r = await c.get_tree("t", tmp_path / "dst")
                assert r.files == 2

        asyncio.run(main())
    got = sorted(str(p.relative_to(tmp_path / "dst")) for p in (tmp_path / "dst").rglob("*"))
    assert got == ["a.txt", "sub", "sub/b.txt"]


@pytest.mark.timeout(30)
def test_a_symlink_swapped_in_mid_tree_is_reported_not_followed(
    server: ServerThread,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = outside_secret(tmp_path)
    (out / "inner").mkdir()
    (out / "inner" / "x").write_bytes(b"outside x")
    srv = server
    d = home(srv) / "t" / "d"
    (d / "sub").mkdir(parents=True)
    (d / "f1").write_bytes(b"one")
    (d / "f2").write_bytes(b"two")
    (d / "f3").write_bytes(b"three")
    (d / "sub" / "x").write_bytes(b"inside x")
    original = Jail.scan_tree

    def swapping(self: Jail, path: str, *, inline_max: int) -> Any:
        scan = original(self, path, inline_max=inline_max)
        inner = scan._gen

        def gen() -> Iterator[Any]:
            for rec in inner:
                yield rec
                if isinstance(rec, TreeFile) and rec.path == "d/f1":
                    # "d" has been listed; its entries are opened one by one from here on.
                    (d / "f2").unlink()
                    os.symlink(out / "secret", d / "f2")
                    shutil.rmtree(d / "sub")
                    os.symlink(out / "inner", d / "sub")

        scan._gen = gen()
        return scan

    monkeypatch.setattr(Jail, "scan_tree", swapping)

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            with pytest.raises(TransferError) as info:
                await c.get_tree("t", tmp_path / "dst")
            msg = str(info.value)
            assert "2 item(s)" in msg and "d/f2" in msg and "d/sub" in msg and "symbolic link" in msg
            assert await c.ping() < 5

    asyncio.run(main())
    dst = tmp_path / "dst" / "d"
    assert (dst / "f1").read_bytes() == b"one" and (dst / "f3").read_bytes() == b"three"
    assert not (dst / "f2").exists() and not (dst / "sub").exists()
    assert all(
        b"outside" not in p.read_bytes() and b"secret" not in p.read_bytes()
        for p in dst.rglob("*")
        if p.is_file()
    )


def test_tree_scan_reports_swaps_and_releases_its_descriptors(tmp_path: Path) -> None:
    out = outside_secret(tmp_path)
    h = tmp_path / "home"
    (h / "t" / "d").mkdir(parents=True)
    for n in ("a", "b"):
        (h / "t" / "d" / n).write_bytes(n.encode())
    (h / "t" / "d" / ".x.ferry-part-abc").write_bytes(b"partial upload: hidden")
    before = fd_count()
    with Jail(h) as jail:
        scan = jail.scan_tree("t", inline_max=1)
        first = next(scan)
        assert first == TreeDir("d")
        assert next(scan) == TreeFile("d/a", 1, (h / "t/d/a").stat().st_mtime, 0o644, b"a")
        (h / "t" / "d" / "b").unlink()
        os.symlink(out / "secret", h / "t" / "d" / "b")
        rest = list(scan)
        assert [type(r) for r in rest] == [TreeFailure]
        assert isinstance(rest[0], TreeFailure) and rest[0].error.code == "symlink"  # type: ignore[attr-defined]
        scan.close()
        half = jail.scan_tree("t", inline_max=1)
        next(half)
        half.close()  # abandoned mid-walk: still releases everything
    assert fd_count() == before


# --- uploads: integrity, quota, per-file refusals -----------------------------------------


#: Plain TCP (raw wire bytes) on either backend.
PLAIN_BACKENDS = [Cell("plain"), Cell("plain", backend="object")]


def names_of(srv: ServerThread, tmp_path: Path, remote: str = "") -> list[str]:
    """:func:`remote_names` through a client of its own."""

    async def main() -> list[str]:
        async with await connect(srv, tmp_path) as c:
            return await remote_names(c, remote)

    return asyncio.run(main())


@pytest.mark.parametrize("cell", PLAIN_BACKENDS, ids=[c.id for c in PLAIN_BACKENDS])
@pytest.mark.timeout(30)
def test_a_corrupt_upload_record_ends_the_tree_and_nothing_is_kept_for_it(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    raw = RawClient(srv.port)
    try:
        raw.login()
        bad = file_item("b", b"bbbb", digest=small_digest("blake3", b"other"))
        raw.send(m.PutTree(id=1, path="t"))
        raw.send(m.TreeItems(id=1, items=[file_item("a", b"aaaa"), bad, file_item("c", b"cc")], end=True))
        err = raw.reply(1)
        assert isinstance(err, m.Error) and "integrity" in err.code, err
        raw.send(m.Ping(nonce=7))
        assert raw.reply_pong(7)
    finally:
        raw.close()
    assert names_of(srv, tmp_path, "t") == ["a"]  # stopped at the bad record
    if not srv.config.store:
        assert sorted(os.listdir(home(srv) / "t")) == ["a"]  # no partial file left


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_quota_exceeded_mid_tree(server: ServerThread, cell: Cell, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i in range(100):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i:03}").write_bytes(os.urandom(4096))
    quota = 300 * 1024
    srv = server
    srv.add_user("bob", quota=quota)

    async def main() -> None:
        async with await connect(srv, tmp_path, user="bob") as c:
            with pytest.raises(DiskFull, match="quota exceeded") as info:
                await c.put_tree(src, "t")
            assert info.value.code == "quota"
            assert await c.ping() < 5  # the session goes on
            usage = await c.df()
            assert usage.used <= quota and usage.partial == 0
            await c.get_tree("t", tmp_path / "back")  # and serves what was stored

    asyncio.run(main())
    back = tmp_path / "back"
    stored = [p for p in back.rglob("*") if p.is_file()]
    assert 0 < len(stored) < 100 and sum(p.stat().st_size for p in stored) <= quota
    for p in stored:  # whatever has its final name is complete
        assert p.read_bytes() == (src / p.relative_to(back)).read_bytes()
    if not cell.objects:
        assert leftovers(home(srv, "bob") / "t") == []
        assert on_server(srv, lambda: srv.server.ctx.usage.reserved("bob")) == 0


@pytest.mark.backends
@pytest.mark.timeout(60)
@pytest.mark.parametrize("df_first", [True, False], ids=["usage-known", "usage-unknown"])
def test_usage_stays_exact_when_a_tree_overwrites_files(server: ServerThread, tmp_path: Path, df_first: bool) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(30):
        (src / "d" / f"f{i}").write_bytes(os.urandom(1000 + i))
    srv = server

    async def main() -> tuple[int, int]:
        async with await connect(srv, tmp_path) as c:
            # (no df before: the folder backend's usage count is not known yet, nor kept up)
            await upload(c, {f"d/f{i}": os.urandom(5000) for i in range(30)}, "t", tmp_path)  # replaced, bigger
            if df_first:
                await c.df()  # usage now tracked incrementally by every upload
            await c.put_tree(src, "t")
            listed = sum(e.size for e in await c.listdir("", recursive=True) if e.kind == "file")
            return (await c.df()).used, listed

    used, listed = asyncio.run(main())
    assert used == listed == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())


@pytest.mark.timeout(30)
def test_refused_entries_are_reported_and_the_rest_is_stored(server: ServerThread, tmp_path: Path) -> None:
    out = outside_secret(tmp_path)
    src = tmp_path / "src"
    (src / "blocked").mkdir(parents=True)
    (src / "blocked" / "x.txt").write_bytes(b"x")
    (src / "ok.txt").write_bytes(b"ok")
    (src / "is-dir").write_bytes(b"a file where the server has a folder")
    srv = server
    t = home(srv) / "t"
    (t / "is-dir").mkdir(parents=True)
    os.symlink(out, t / "blocked")

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            with pytest.raises(TransferError) as info:
                await c.put_tree(src, "t")
            msg = str(info.value)
            assert "blocked" in msg and "is-dir" in msg and "symbolic link" in msg

    asyncio.run(main())
    assert (t / "ok.txt").read_bytes() == b"ok"
    assert sorted(os.listdir(out)) == ["secret"]  # nothing written through the symlink


# --- vanished, stalled and cancelling clients ----------------------------------------------


def big_tree(root: Path, n: int, size: int) -> None:
    block = os.urandom(size)
    for i in range(n):
        d = root / f"d{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05}").write_bytes(block)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plain", [False, True], ids=["tls", "plain"])
def test_a_stopped_reader_keeps_server_memory_bounded(
    tmp_path: Path, plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = SessionRecorder(monkeypatch)
    batches = [0]
    original = stree._Batches.next

    def counting(self: stree._Batches) -> Any:
        batches[0] += 1
        return original(self)

    monkeypatch.setattr(stree._Batches, "next", counting)
    with running_server(tmp_path / "root", plain=plain) as srv:
        big_tree(home(srv) / "t", 1000, 64 * 1024)  # 62.5 MiB in 250 batches
        (home(srv) / "small").write_bytes(b"small")
        baseline_fds = fd_count()
        stalled = RawClient(srv.port, tls=not plain, rcvbuf=64 * 1024)
        try:
            stalled.login()
            stalled.send(m.GetTree(id=1, path="t"))
            assert isinstance(stalled.reply(1), m.TreeItems)
            port = stalled.sock.getsockname()[1]
            [session] = [s for s in recorder.sessions if s.peer.endswith(f":{port}")]

            def buffered() -> int:
                return session.writer.transport.get_write_buffer_size() + session._out._size

            samples = []
            for _ in range(20):
                samples.append(on_server(srv, buffered))
                time.sleep(0.05)

            async def others() -> None:
                async with await connect(srv, tmp_path) as c:
                    await c.get("small", tmp_path / "small")

            asyncio.run(others())
            assert max(samples) <= 4 * MiB, samples
            # Read ahead by one batch at most: nowhere near the 250 batches of the tree.
            assert batches[0] * stree.BATCH_BYTES <= 16 * MiB, batches[0]
        finally:
            stalled.close()
        assert wait_until(lambda: no_sessions(srv), 15)
        assert wait_until(lambda: fd_count() <= baseline_fds + 2), (fd_count(), baseline_fds)


def non_socket_fds() -> int:
    """Open descriptors of this process that are not sockets."""
    out = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            out += not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # closed meanwhile
    return out


def big_remote_tree(srv: ServerThread, tmp_path: Path, remote: str, n: int, size: int) -> None:
    """:func:`big_tree` made on the server through a client (either backend)."""
    src = tmp_path / f"big-{remote}"
    big_tree(src, n, size)

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            await c.put_tree(src, remote)

    asyncio.run(main())
    shutil.rmtree(src)


@pytest.mark.parametrize("cell", PLAIN_BACKENDS, ids=[c.id for c in PLAIN_BACKENDS])
@pytest.mark.timeout(60)
def test_cancel_stops_a_tree_download(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    big_remote_tree(srv, tmp_path, "t", 800, 64 * 1024)
    raw = RawClient(srv.port, rcvbuf=64 * 1024)
    try:
        raw.login()
        raw.send(m.GetTree(id=1, path="t"))
        assert isinstance(raw.reply(1), m.TreeItems)
        raw.send(m.Cancel(id=1))
        seen: list[Any] = []
        while True:
            ev = raw.reply(1)
            seen.append(ev)
            if isinstance(ev, m.Error) or (isinstance(ev, m.TreeItems) and ev.end):
                break
        assert isinstance(seen[-1], m.Error) and seen[-1].code == "cancelled"
        assert sum(isinstance(e, m.TreeItems) for e in seen) < 150  # far from all 200 batches
        raw.send(m.Ping(nonce=3))
        assert raw.reply_pong(3)
    finally:
        raw.close()
    assert wait_until(lambda: no_sessions(srv), 15)
    assert "op=get-tree path=t bytes=" in (srv.root / "logs" / "ferry.log").read_text()


@pytest.mark.backends
@pytest.mark.timeout(60)
@pytest.mark.parametrize("direction", ["get", "put"])
def test_a_client_giving_up_mid_tree_cancels_cleanly(
    server: ServerThread, cell: Cell, tmp_path: Path, direction: str
) -> None:
    src = tmp_path / "src"
    big_tree(src, 400, 16 * 1024)
    srv = server
    if direction == "get":
        big_remote_tree(srv, tmp_path, "t", 400, 16 * 1024)
    calls = [0]

    def progress(done: int, total: int) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise Interrupt("enough")

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            with pytest.raises(Interrupt):
                if direction == "get":
                    await c.get_tree("t", tmp_path / "dst", progress=progress)
                else:
                    await c.put_tree(src, "t", progress=progress)
            # The Cancel was handled before this ping: from here on nothing of the tree is written.
            assert await c.ping() < 5
            if not cell.objects:
                assert leftovers(home(srv)) == []
            before = await remote_names(c)
            await asyncio.sleep(0.2)
            assert await remote_names(c) == before
            await c.put(src / "d0" / "f00000", "after")  # the connection is still usable
            assert (await c.stat("after")).size == 16 * 1024
            assert (await c.df()).partial == 0

    asyncio.run(main())
    assert leftovers(tmp_path) == []
    if not cell.objects:
        assert leftovers(home(srv)) == []
        assert on_server(srv, lambda: srv.server.ctx.usage.reserved("alice")) == 0
    assert wait_until(
        lambda: "op=put-tree" in (srv.root / "logs" / "ferry.log").read_text() or direction == "get"
    )


@pytest.mark.parametrize("cell", PLAIN_BACKENDS, ids=[c.id for c in PLAIN_BACKENDS])
@pytest.mark.timeout(60)
@pytest.mark.parametrize("direction", ["get", "put"])
def test_a_client_vanishing_mid_tree_releases_everything(server: ServerThread, tmp_path: Path, direction: str) -> None:
    srv = server
    big_remote_tree(srv, tmp_path, "src", 600, 64 * 1024)

    # The object backend holds no descriptor per session but sockets in pools that may still grow
    # (database, store): there, the files and pipes it holds are counted.
    count = fd_count if not srv.config.store else non_socket_fds
    baseline_fds = count()
    raw = RawClient(srv.port, rcvbuf=64 * 1024)
    raw.login()
    if direction == "get":
        raw.send(m.GetTree(id=1, path="src"))
        assert isinstance(raw.reply(1), m.TreeItems)
    else:
        raw.send(m.PutTree(id=1, path="dst"))
        items = [file_item(f"f{i}", os.urandom(50_000)) for i in range(5)]
        raw.send(m.TreeItems(id=1, items=items))
        assert isinstance(raw.reply(1), m.TreeAck)
        raw.send(m.TreeItems(id=1, items=[file_item(f"g{i}", os.urandom(50_000)) for i in range(5)]))
    raw.close()  # gone, mid-tree
    assert wait_until(lambda: no_sessions(srv), 15)
    assert wait_until(lambda: count() <= baseline_fds), (count(), baseline_fds)
    if not srv.config.store:
        assert leftovers(home(srv)) == []
        assert on_server(srv, lambda: srv.server.ctx.usage.reserved("alice")) == 0

    async def again() -> None:
        async with await connect(srv, tmp_path) as c:
            await c.get_tree("src/d0", tmp_path / "d0")

    asyncio.run(again())
    assert len(os.listdir(tmp_path / "d0")) == 75


@pytest.mark.parametrize("cell", PLAIN_BACKENDS, ids=[c.id for c in PLAIN_BACKENDS])
@pytest.mark.timeout(30)
def test_tree_items_for_an_unknown_id_are_dropped_and_data_frames_are_refused(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    raw = RawClient(srv.port)
    try:
        raw.login()
        raw.send(m.TreeItems(id=9, items=[file_item("x", b"x")], end=True))  # e.g. after a Cancel
        raw.send(m.Ping(nonce=1))
        assert raw.reply_pong(1)
        raw.send(m.PutTree(id=2, path="t"))
        raw.send_raw(raw.conn.send_data(2, m.STDIN, b"not how trees travel"))
        events = raw.until_closed()
        assert any(isinstance(e, m.Error) and e.code == "protocol" for e in events), events
    finally:
        raw.close()
    assert "x" not in names_of(srv, tmp_path)


# --- the wire messages ---------------------------------------------------------------------


def open_pair() -> tuple[Connection, Connection]:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(m.Hello(min_version=1, max_version=1)))
    s.next_event()
    c.receive_data(s.send(m.Welcome(version=1)))
    c.next_event()
    s.receive_data(c.send(m.Auth(user="u", password="p")))
    s.next_event()
    c.receive_data(s.send(m.AuthOk(user="u")))
    c.next_event()
    return c, s


@settings(max_examples=150, deadline=None)
@given(msg=tree_messages)
def test_tree_messages_round_trip_from_the_side_that_may_send_them(msg: m.Message) -> None:
    c, s = open_pair()
    sent = False
    for sender, receiver, role in ((c, s, Role.CLIENT), (s, c, Role.SERVER)):
        if type(msg) in ALLOWED[(role, State.OPEN)]:
            receiver.receive_data(sender.send(msg))
            assert receiver.next_event() == msg
            sent = True
        else:
            with pytest.raises(LocalProtocolError):
                sender.send(msg)
    assert sent


@pytest.mark.parametrize(
    "sender, msg",
    [
        ("server", m.GetTree(id=1, path="x")),
        ("server", m.PutTree(id=1, path="x")),
        ("client", m.TreeAck(id=1, files=0, bytes=0)),
    ],
)
def test_tree_messages_from_the_wrong_side_are_protocol_errors(sender: str, msg: m.Message) -> None:
    c, s = open_pair()

    receiver = s if sender == "client" else c
    payload = m.MessageCodec().encode(msg)
    from ferry.wire.frames import message_header

    receiver.receive_data(message_header(len(payload)) + payload)
    with pytest.raises(UnexpectedMessage):
        receiver.next_event()


@pytest.mark.parametrize(
    "item",
    [
        {"path": "x", "kind": "link"},
        {"path": "x", "kind": "file", "data": b"\0" * (INLINE + 1)},
        {"path": "x" * 5000, "kind": "dir"},
        {"path": "x", "kind": "file", "size": -1},
    ],
)
def test_malformed_tree_items_are_named(item: dict[str, Any]) -> None:
    import msgspec

    _c, s = open_pair()
    payload = msgspec.msgpack.encode({"t": "tree_items", "id": 1, "items": [item]})
    from ferry.wire.frames import message_header

    s.receive_data(message_header(len(payload)) + payload)
    with pytest.raises(MalformedMessage, match=r"items\[0\]"):
        s.next_event()


# --- review: the local destination must not be escaped through its own symlinks -------------


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_a_download_never_writes_through_symlinks_already_in_the_destination(server: ServerThread, tmp_path: Path) -> None:
    """The destination holds ``sub -> elsewhere`` and ``big-link -> elsewhere``; the server's tree has
    a folder ``sub`` (with a small and a large file) and a large file ``big-link``. Nothing may land in
    ``elsewhere``: the links are reported, the rest of the tree is written. The destination itself
    is given through a link (the user's choice, followed as before)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(dst, tmp_path / "dst-link")
    os.symlink(elsewhere, dst / "sub")
    os.symlink(elsewhere, dst / "big-link")
    srv = server
    files = {
        "sub/small": b"small",
        "sub/large": os.urandom(INLINE + 10),
        "big-link": os.urandom(INLINE + 20),
        "ok": b"ok",
    }

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            await upload(c, files, "t", tmp_path)
            with pytest.raises(TransferError, match="symbolic link") as info:
                await c.get_tree("t", tmp_path / "dst-link")
            assert "sub" in str(info.value) and "big-link" in str(info.value)

    asyncio.run(main())
    assert list(elsewhere.iterdir()) == []
    assert (dst / "ok").read_bytes() == b"ok"
    assert (dst / "sub").is_symlink() and (dst / "big-link").is_symlink()
    assert leftovers(dst) == []


# --- review: every tree message must fit the wire's limits ----------------------------------


@pytest.mark.timeout(60)
def test_names_too_long_for_the_wire_are_reported_and_the_connection_survives(server: ServerThread, tmp_path: Path) -> None:
    """Undecodable names travel escaped (6 characters per byte), so three levels of them exceed a
    wire path (4096 characters) although the path on disk is legal: the server must report them, not
    send a message the client has to reject as a protocol violation (which ends the connection)."""
    srv = server
    t = home(srv) / "t"
    t.mkdir(parents=True)
    (t / "ok").write_bytes(b"ok")
    deep = os.fsencode(t) + b"/" + b"/".join(bytes([0xFF - i]) * 250 for i in range(3))
    os.makedirs(deep)
    with open(deep + b"/leaf", "wb") as f:
        f.write(b"leaf")
    # A valid name chain longer than any wire path (as a rename into a deep folder makes it).
    fd = os.open(t, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(20):
        os.mkdir("l" * 250, dir_fd=fd)
        fd, old = os.open("l" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(old)
    os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            with pytest.raises(TransferError, match="not valid UTF-8") as info:
                await c.get_tree("t", tmp_path / "dst")
            assert "too long to send" in str(info.value)
            assert await c.ping() < 5  # the session is still usable

    asyncio.run(main())
    assert (tmp_path / "dst" / "ok").read_bytes() == b"ok"


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_an_upload_batch_failing_entirely_is_acknowledged_within_the_message_limit(server: ServerThread, tmp_path: Path) -> None:
    """Every record of a full batch fails (the server has a file where the client's folder goes) and
    each error message repeats a long destination path: the TreeAck must still fit in one message."""
    base = "/".join(["b" * 200] * 15)  # 3014 bytes: a legal remote path
    src = tmp_path / "src"
    (src / "f").mkdir(parents=True)
    for i in range(1100):
        (src / "f" / f"{i:04}").write_bytes(b"")
    (src / "z").write_bytes(b"z")
    srv = server

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            await upload(c, {"f": b"a file where the client has a folder"}, base, tmp_path)
            with pytest.raises(TransferError, match="not a folder"):
                await c.put_tree(src, base)
            assert await c.ping() < 5
            assert await remote_names(c, base) == ["f", "z"]
            await c.get_tree(base, tmp_path / "back")

    asyncio.run(main())
    assert (tmp_path / "back" / "z").read_bytes() == b"z"


@pytest.mark.timeout(120)
def test_endless_error_records_from_a_server_keep_client_memory_bounded(tmp_path: Path) -> None:
    """A hostile server streams ~400,000 error records: the client names the first few and counts the
    rest, it does not keep a line per record until the end of the stream."""
    import tracemalloc

    batch = [
        m.TreeItem(path=f"p{i:04}", kind="error", code="io-error", message="x" * 40) for i in range(4096)
    ]
    n = 100
    fake = FakeServer([batch] * n)

    async def main() -> None:
        async with fake.running(), await fake.client(tmp_path) as c:
            tracemalloc.start()
            try:
                with pytest.raises(TransferError) as info:
                    await c.get_tree("x", tmp_path / "dest")
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert f"and {n * 4096 - ctree.SHOWN_ERRORS} more" in str(info.value)
            assert peak < 32 * MiB, peak  # the fake server's batch and both sockets' buffers count too

    asyncio.run(main())


@pytest.mark.parametrize("cell", PLAIN_BACKENDS, ids=[c.id for c in PLAIN_BACKENDS])
@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["/x", "/", "a/", "./x", "a/../x", "x\0y", "a//x", ".."])
def test_a_non_canonical_upload_record_is_refused_like_any_client_path(server: ServerThread, tmp_path: Path, name: str) -> None:
    """A record's path obeys parse_path like every client path: ``/x`` is not a spelling of ``x``."""
    srv = server
    raw = RawClient(srv.port)
    try:
        raw.login()
        raw.send(m.PutTree(id=2, path="t"))
        raw.send(m.TreeItems(id=2, items=[file_item(name, b"evil"), file_item("ok", b"ok")], end=True))
        ack = raw.reply(2)
        assert isinstance(ack, m.TreeAck) and ack.end, ack
        assert [(e.path, e.code) for e in ack.errors] == [
            (name, "outside-home" if name.startswith("/") or ".." in name else "bad-path")
        ]
        assert ack.files == 1
    finally:
        raw.close()
    assert names_of(srv, tmp_path, "t") == ["ok"]


@pytest.mark.backends
@pytest.mark.timeout(60)
def test_an_absolute_tree_upload_target_is_refused_like_any_absolute_path(server: ServerThread, tmp_path: Path) -> None:
    # Stripping the trailing '/' of '/' left '' (the home): the tree landed in the home while every
    # other command refuses absolute paths. 'HOST:/' is refused by ls, get, put and mkdir alike.
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"x")
    srv = server

    async def main() -> None:
        async with await connect(srv, tmp_path) as c:
            for remote in ("/", "//", "/d/"):
                with pytest.raises(PathRefused, match="absolute paths are not allowed"):
                    await c.put_tree(src, remote)
            assert await c.ping() < 5  # the connection survives the refusals
            assert await remote_names(c) == []

    asyncio.run(main())


class AckFlooder(FakeServer):
    """Answers PutTree with ``n`` acknowledgements at once, before any batch was sent."""

    def __init__(self, n: int) -> None:
        super().__init__([])
        self.n = n

    async def answer(self, conn: Connection, writer: asyncio.StreamWriter, ev: m.Message) -> None:
        if isinstance(ev, m.PutTree):
            for _ in range(self.n):
                writer.write(conn.send(m.TreeAck(id=ev.id, files=0, bytes=0)))


@pytest.mark.timeout(60)
def test_a_server_flooding_tree_acks_keeps_the_client_queue_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client expects at most WINDOW acknowledgements (one per batch in flight); a server sending
    # more must neither pile them up in memory while the client reads its disk nor be believed.
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    flood = 2000  # small enough (~60 KB) to sit in the socket buffers whatever the client does
    reading = threading.Event()
    original = ctree._LocalScan.next

    def slow_next(self: Any) -> Any:  # the local disk is slow: the client's reader runs alone meanwhile
        reading.wait(20)
        return original(self)

    monkeypatch.setattr(ctree._LocalScan, "next", slow_next)

    async def main() -> None:
        async with AckFlooder(flood).running() as fake, await fake.client(tmp_path) as c:
            upload = asyncio.create_task(c.put_tree(src, "t"))
            try:
                def route() -> Any:
                    return next(iter(c.mux.routes.values()), None)

                # The reader stops when the queue is full (bounded) or has queued the whole flood.
                assert await await_until(
                    lambda: (r := route()) is not None and (r.queue.full() or r.queue.qsize() == flood), 20
                )
                queued = route().queue.qsize()
            finally:
                reading.set()
            with pytest.raises(ConnectionBroken, match="acknowledged"):
                await upload
            assert queued <= ctree.WINDOW + 2, queued
            assert await c.ping() < 5  # the reader got going again once the upload gave up

    asyncio.run(main())
