"""A session that ends while one of its thread jobs runs (client gone, server shutdown).

The thread cannot be stopped: what it opens must still be closed when it returns, and the jail's
home descriptor must stay open until it is done (closed earlier, its number could be reused for an
unrelated file under the thread's feet).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from ferry.server.jail import Jail
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    RawClient,
    SessionRecorder,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    no_sessions,
    running_server,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("no_logged_errors")


def open_into(folder: Path) -> list[str]:
    """What this process's descriptors inside ``folder`` point at (the jail and its threads are the
    only ones that open anything there)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if target == str(folder) or target.startswith(f"{folder}/"):
            found.append(target)
    return found


class Gate:
    """Wraps a Jail method: the real call runs, then the thread blocks until :meth:`open` is called
    and records whether its jail was closed meanwhile."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.jail_closed: list[bool] = []
        original = getattr(Jail, name)
        gate = self

        def gated(jail: Jail, *args: Any, **kw: Any) -> Any:
            result = original(jail, *args, **kw)  # descriptors opened, as a real slow call would
            gate.entered.set()
            gate.released.wait(20)
            gate.jail_closed.append(jail.closed)
            return result

        monkeypatch.setattr(Jail, name, gated)

    def open(self) -> None:
        self.released.set()


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_client_vanishing_during_a_thread_job_leaks_nothing(server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch, "scan_tree")
    sessions = SessionRecorder(monkeypatch)
    srv = server
    (home(srv) / "t" / "sub").mkdir(parents=True)
    (home(srv) / "t" / "sub" / "f").write_bytes(b"x")
    raw = RawClient(srv.port)
    try:
        raw.login()
        raw.send(m.GetTree(id=1, path="t"))
        assert gate.entered.wait(10)
    finally:
        raw.close()  # gone while the scan is in its thread (its folders are open)
    session = sessions.sessions[-1]
    # The session has noticed: its worker (running the GetTree) is cancelled and the
    # connection is being closed. Only then may the thread go on.
    assert wait_until(lambda: session._worker_task is not None and session._worker_task.done(), 10)
    assert wait_until(lambda: session.writer.is_closing(), 10)
    gate.open()
    assert wait_until(lambda: no_sessions(srv) and len(gate.jail_closed) == 1, 15)
    assert wait_until(lambda: not open_into(home(srv))), open_into(home(srv))
    assert gate.jail_closed == [False]  # the home descriptor outlived the thread using it


@pytest.mark.timeout(60)
def test_a_server_shutdown_during_a_thread_job_leaks_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(monkeypatch, "tree_dirs")
    sessions = SessionRecorder(monkeypatch)
    srv_cm = running_server(tmp_path / "root", plain=True)
    srv = srv_cm.__enter__()
    stopper = threading.Thread(target=srv_cm.__exit__, args=(None, None, None))
    raw = RawClient(srv.port)
    try:
        raw.login()
        raw.send(m.PutTree(id=1, path="deep/er/dst"))  # the reader opens (creates) the folders in a thread
        assert gate.entered.wait(10)
        stopper.start()  # shutdown cancels the session while the thread holds the folders
        session = sessions.sessions[-1]
        assert wait_until(lambda: session.writer.is_closing(), 10)
    finally:
        gate.open()
        if stopper.is_alive() or not stopper.ident:
            stopper.join(20)
        raw.close()
    assert not stopper.is_alive()
    assert wait_until(lambda: not open_into(home(srv))), open_into(home(srv))
    assert gate.jail_closed == [False]
    assert (home(srv) / "deep" / "er" / "dst").is_dir()


# --- request ids in use ----------------------------------------------------------------------

DUPLICATES = {
    "get-tree twice": (m.GetTree(id=1, path="t"), m.GetTree(id=1, path="t")),
    "get-file then get-tree": (m.GetFile(id=1, path="t/big"), m.GetTree(id=1, path="t")),
    "put-tree then get-file": (m.PutTree(id=1, path="up"), m.GetFile(id=1, path="t/big")),
    "get-tree then put-tree": (m.GetTree(id=1, path="t"), m.PutTree(id=1, path="up")),
}


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
@pytest.mark.parametrize("pair", DUPLICATES.values(), ids=list(DUPLICATES))
def test_a_transfer_request_reusing_an_id_in_use_is_a_protocol_error(
    server: ServerThread,
    tmp_path: Path, pair: tuple[m.Message, m.Message]
) -> None:
    # Two transfers under one id would share their cancel state (the first to finish clearing the
    # second's) and their replies: refused, like an upload reusing an id already is.
    srv = server
    (home(srv) / "t").mkdir()
    (home(srv) / "t" / "big").write_bytes(os.urandom(4 << 20))  # streamed, not inline
    raw = RawClient(srv.port, rcvbuf=64 * 1024)
    try:
        raw.login()
        first, second = pair
        # One write: the reader takes both before the first can finish (a queued request is
        # in use as much as a running one).
        raw.send_raw(raw.conn.send(first) + raw.conn.send(second))
        events = raw.until_closed(20)
    finally:
        raw.close()
    errors = [e for e in events if isinstance(e, m.Error)]
    assert errors and errors[-1].code == "protocol", events
    assert "request id 1 is already in use" in errors[-1].message
