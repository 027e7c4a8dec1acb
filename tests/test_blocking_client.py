"""The blocking API (``ferry.connect`` / ``Client``) against a real in-process server."""

from __future__ import annotations

import _thread
import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import ferry
from conformance import Cell, open_client
from ferry.client import blocking
from ferry.client.known_hosts import KnownHosts
from ferry.errors import AuthError, ConnectionBroken, HostKeyMismatch
from ferry_server import PASSWORD, ServerThread


async def pending_tasks() -> int:
    """Tasks on the running loop other than the caller and the client's reader."""
    me = asyncio.current_task()
    return sum(1 for t in asyncio.all_tasks() if t is not me and "_read_loop" not in repr(t.get_coro()))


def loop_threads() -> int:
    return sum(t.name == "ferry-client-loop" for t in threading.enumerate())


@pytest.mark.timeout(60)
@pytest.mark.cell(client="sync")
def test_lifecycle_threads_and_forwarding(client: ferry.Client, tmp_path: Path) -> None:
    c = client
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


@pytest.mark.timeout(60)
@pytest.mark.cell(client="sync")
def test_connect_errors(cell: Cell, server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = server
    with pytest.raises(AuthError):
        open_client(cell, srv, tmp_path, password="wrong")
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
@pytest.mark.cell(client="sync", loop="asyncio")
def test_ctrl_c_while_a_call_is_handed_to_the_loop_cancels_it(
    client: ferry.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On asyncio's loop the hand-over writes to a socket, so the call can start on the loop (and
    Ctrl-C arrive) before ``run_coroutine_threadsafe`` returns; that Ctrl-C must cancel the call too
    (found by the conformance matrix: the call ran on, about one run in six)."""
    c = client
    running = threading.Event()
    real_submit = asyncio.run_coroutine_threadsafe

    async def long_call() -> None:
        running.set()
        await asyncio.sleep(30)

    def submit_then_ctrl_c(coro: Any, loop: asyncio.AbstractEventLoop) -> Any:
        real_submit(coro, loop)
        assert running.wait(10)  # the call runs on the loop...
        raise KeyboardInterrupt  # ...when Ctrl-C lands, before the hand-over has returned

    monkeypatch.setattr(blocking.asyncio, "run_coroutine_threadsafe", submit_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        c.call(long_call())
    monkeypatch.undo()
    assert c.call(pending_tasks()) == 0 and c.ping() < 5
