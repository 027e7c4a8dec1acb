"""The blocking API (``ferry.connect`` / ``Client``) against a real in-process server."""

from __future__ import annotations

import _thread
import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import ferry
from ferry.client.blocking import AsyncProxy
from ferry.client.known_hosts import KnownHosts
from ferry.errors import AuthError, ConnectionBroken, HostKeyMismatch, NotFound, PathRefused
from ferry_server import PASSWORD, ServerThread


@pytest.fixture(params=["tls", "plain"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerThread]:
    srv = ServerThread(tmp_path / "root", plain=request.param == "plain")
    srv.add_user("alice")
    srv.start()
    yield srv
    srv.stop()


async def pending_tasks() -> int:
    """Tasks on the running loop other than the caller and the client's reader."""
    me = asyncio.current_task()
    return sum(1 for t in asyncio.all_tasks() if t is not me and "_read_loop" not in repr(t.get_coro()))


def loop_threads() -> int:
    return sum(t.name == "ferry-client-loop" for t in threading.enumerate())


def connect(srv: ServerThread, tmp_path: Path, **kw: object) -> ferry.Client:
    return ferry.connect(
        f"alice@127.0.0.1:{srv.port}",
        password=kw.pop("password", PASSWORD),  # type: ignore[arg-type]
        plain=srv.config.plain,
        known_hosts=KnownHosts(tmp_path / "known_hosts"),
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.timeout(60)
def test_every_method_blocking(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "x.txt").write_text("x")
    calls: list[tuple[int, int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((threading.get_ident(), done, total))

    with connect(server, tmp_path) as c:
        assert c.info is not None and c.info.tls is not server.config.plain
        if not server.config.plain:
            assert c.info.pin_status == "new"
        assert c.ping() < 5
        c.mkdir("a/b", parents=True)
        r = c.put(src, "a/b/src.bin", progress=progress)
        assert r.size == src.stat().st_size and r.resumed_from == 0
        assert c.stat("a/b/src.bin").size == r.size
        assert [e.name for e in c.listdir("a", recursive=True)] == ["b", "b/src.bin"]
        g = c.get("a/b/src.bin", tmp_path / "back.bin", progress=progress)
        assert g.digest == r.digest and (tmp_path / "back.bin").read_bytes() == src.read_bytes()
        c.rename("a/b/src.bin", "a/moved.bin")
        with pytest.raises(NotFound):
            c.stat("a/b/src.bin")
        with pytest.raises(PathRefused):
            c.stat("../etc")
        t = c.put_tree(tree, "t")
        assert t.files == 1
        t = c.get_tree("t", tmp_path / "t-back")
        assert (tmp_path / "t-back" / "sub" / "x.txt").read_text() == "x"
        usage = c.df()
        assert usage.used >= r.size and usage.quota is None
        c.remove("a", recursive=True)
        assert sorted(e.name for e in c.listdir("")) == ["t"]
    # Progress callbacks run on the client's loop thread (documented), and end at 100 %.
    assert calls and all(ident != threading.get_ident() for ident, _, _ in calls)
    assert calls[-1][1] == calls[-1][2] == r.size


@pytest.mark.timeout(60)
def test_lifecycle_threads_and_forwarding(tmp_path: Path) -> None:
    srv = ServerThread(tmp_path / "root")
    srv.add_user("alice")
    srv.start()
    try:
        c = connect(srv, tmp_path)
        assert loop_threads() == 1
        # several threads share one connection; their calls are pipelined
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(lambda i: c.mkdir(f"d{i}") is None, range(32)))
        assert len(c.listdir("")) == 32

        # generic forwarding: coroutine methods block, async iterators become iterators
        assert c.send is not None  # an async method of AsyncClient not wrapped by hand

        async def entries(path: str) -> AsyncIterator[str]:
            for e in await c.aclient.listdir(path):
                yield e.name

        c.aclient.names = entries  # type: ignore[attr-defined]
        assert sorted(c.names(""))[:2] == ["d0", "d1"]  # type: ignore[attr-defined]
        with pytest.raises(AttributeError):
            c.no_such_method  # noqa: B018

        # calling the client from its own loop thread (a progress callback) fails loudly
        (tmp_path / "f").write_bytes(b"x" * 10)
        seen: list[BaseException] = []

        def bad_progress(done: int, total: int) -> None:
            try:
                c.ping()
            except RuntimeError as exc:
                seen.append(exc)

        c.put(tmp_path / "f", "f", progress=bad_progress)
        assert seen and "deadlock" in str(seen[0])

        # Ctrl-C while a call waits cancels that call on the loop; the client stays usable
        started = threading.Event()

        async def long_call() -> None:
            started.set()
            await asyncio.sleep(30)

        timer = threading.Thread(target=lambda: (started.wait(10), _thread.interrupt_main()))
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            c.call(long_call())
        timer.join()
        assert time.monotonic() - t0 < 10
        assert c.call(pending_tasks()) == 0 and c.ping() < 5

        c.close()
        c.close()  # idempotent
        assert loop_threads() == 0
        with pytest.raises(RuntimeError, match="closed"):
            c.ping()
    finally:
        srv.stop()


@pytest.mark.timeout(60)
def test_connect_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = ServerThread(tmp_path / "root")
    srv.add_user("alice")
    srv.start()
    try:
        with pytest.raises(AuthError):
            connect(srv, tmp_path, password="wrong")
        monkeypatch.delenv("FERRY_PASSWORD", raising=False)
        with pytest.raises(AuthError, match="FERRY_PASSWORD"):
            ferry.connect(f"alice@127.0.0.1:{srv.port}")
        monkeypatch.setenv("FERRY_PASSWORD", PASSWORD)
        # the password from the environment, the port as an argument, the user from a URL
        with ferry.connect(
            "ferry://alice@127.0.0.1", port=srv.port, known_hosts=KnownHosts(tmp_path / "kh")
        ) as c:
            assert c.ping() < 5
        # a different pinned certificate: HostKeyMismatch, which is not a ConnectionBroken
        kh = KnownHosts(tmp_path / "kh2")
        kh.check("127.0.0.1", srv.port, "SHA256:" + "A" * 43)
        with pytest.raises(HostKeyMismatch):
            ferry.connect(f"alice@127.0.0.1:{srv.port}", known_hosts=kh)
        with pytest.raises(ConnectionBroken):
            ferry.connect("alice@127.0.0.1:1", timeout=5)
        assert loop_threads() == 0  # failed connects leave no loop thread behind
    finally:
        srv.stop()


def test_import_ferry_stays_cheap() -> None:
    code = (
        "import sys, ferry; print(sorted(m for m in sys.modules if m.startswith('ferry') or m == 'asyncio'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "['ferry']"
    code = "import ferry; print(ferry.connect.__module__, ferry.Client.__name__, ferry.AsyncClient.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == ["ferry.client.blocking", "Client", "AsyncClient"]


@pytest.mark.timeout(60)
def test_remote_commands_through_the_generic_forwarding(tmp_path: Path) -> None:
    """run/start/stream are not written out in Client: they are forwarded (coroutines block, async
    iterators and context managers come back as blocking proxies)."""
    srv = ServerThread(tmp_path / "root")
    srv.add_user("alice", exec_allowed=True)
    srv.start()
    try:
        with connect(srv, tmp_path) as c:
            r = c.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
            assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
            with c.stream(["sh", "-c", "echo one; echo two"]) as s:
                assert isinstance(s, AsyncProxy)
                chunks = list(s)
            assert b"".join(data for kind, data in chunks if kind == "stdout") == b"one\ntwo\n"
            assert s.exit_code == 0
            with c.start(["cat"]) as proc:
                proc.write(b"through cat")
                proc.close_stdin()
                assert proc.collect() == (b"through cat", b"")
                assert proc.wait() == 0
    finally:
        srv.stop()
