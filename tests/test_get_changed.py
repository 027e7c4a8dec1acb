"""A file that shrinks on the server while it is being downloaded: the download ends with ``changed``
(try again), never with an internal error, and the server logs no error."""

from __future__ import annotations

import os

import pytest

from ferry.wire import CONNECTION_ENDED, Data
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    RawClient,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    )

pytestmark = [pytest.mark.usefixtures("no_logged_errors"), pytest.mark.transports]

BIG = 256 << 20  # sparse: no disk, but hashing it takes long enough to shrink it meanwhile


@pytest.mark.timeout(60)
def test_a_file_that_shrinks_during_a_download_is_reported_changed(server: ServerThread) -> None:
    f = home(server) / "big.bin"
    with open(f, "wb") as out:
        out.truncate(BIG)
    raw = RawClient(server.port, tls=not server.config.plain)
    try:
        raw.login()
        raw.send(m.GetFile(id=1, path="big.bin", chunk_size=1 << 20))
        info = raw.reply(1)
        assert isinstance(info, m.FileInfo) and info.size == BIG
        os.truncate(f, 1 << 20)  # while its chunk hashes are being computed
        while True:
            ev = raw.next_event(30)
            assert ev is not CONNECTION_ENDED
            if isinstance(ev, Data):
                continue
            if getattr(ev, "id", None) == 1:
                break
        assert isinstance(ev, m.Error), ev
        assert ev.code == "changed", ev
    finally:
        raw.close()
