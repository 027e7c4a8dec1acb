"""Regression tests for server bugs found in review: each one failed before its fix."""

from __future__ import annotations

import gc
import os

import pytest

from ferry.hashing import ChunkHasher
from ferry.wire import Data
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    SMALL_CHUNK,
    MiB,
    RawClient,
    SessionRecorder,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    no_sessions,
    on_server,
    wait_until,
)

pytestmark = [pytest.mark.usefixtures("no_logged_errors"), pytest.mark.cell(transport="plain")]


@pytest.mark.timeout(60)
def test_upload_without_overwrite_does_not_replace_a_file_created_meanwhile(server: ServerThread) -> None:
    """``overwrite=False`` is checked when the upload starts; a file that appears while the data is
    on its way must not be silently replaced at commit (the jail's commit can refuse atomically)."""
    data = os.urandom(MiB + 123)
    hasher = ChunkHasher("blake3", SMALL_CHUNK)
    hasher.update(data)
    hashes, digest = hasher.finish()
    target = home(server) / "f.bin"
    raw = RawClient(server.port)
    try:
        raw.login()
        raw.send(
            m.PutFile(id=1, path="f.bin", size=len(data), mtime=0.0, chunk_size=SMALL_CHUNK, token="t1", overwrite=False)
        )
        assert isinstance(raw.reply(1), m.PutReady)
        raw.send(m.PutFrom(id=1, offset=0))
        raw.send_raw(raw.conn.send_data(1, m.STDIN, data))
        target.write_bytes(b"someone else's file")  # created by another client meanwhile
        raw.send(m.FileEnd(id=1, size=len(data), chunk_hashes=hashes, digest=digest))
        reply = raw.reply(1)
        assert isinstance(reply, m.Error) and reply.code == "exists", reply
        assert target.read_bytes() == b"someone else's file"
        raw.send(m.Stat(id=2, path=""))
        assert isinstance(raw.reply(2), m.StatReply)  # the session goes on
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_recursive_listing_of_long_names_stays_below_the_frame_limit(server: ServerThread) -> None:
    """A page of 1000 entries is not "far below" the 1 MiB message limit when the relative names
    of a recursive listing are a few KiB long: pages must be bounded by bytes too, or the client's
    decoder refuses the frame and the connection is lost."""
    deep = home(server) / "d"
    parts = ["d"]
    for i in range(13):  # 13 folders of 250-character names: ~3.3 KB relative paths
        deep = deep / (f"{i:02d}" + "x" * 248)
        parts.append(deep.name)
    deep.mkdir(parents=True)
    files = 400
    for i in range(files):
        (deep / (f"{i:03d}" + "y" * 200)).touch()
    raw = RawClient(server.port)
    try:
        raw.login()
        raw.send(m.ListDir(id=1, path="d", recursive=True))
        entries: list[m.Entry] = []
        for _ in range(files + 20):
            page = raw.reply(1)
            assert isinstance(page, m.ListReply), page
            entries += page.entries
            if not page.more:
                break
        assert len(entries) == 13 + files
        assert sum(e.kind == "file" for e in entries) == files
    finally:
        raw.close()


@pytest.mark.timeout(60)
def test_a_file_shrinking_under_sendfile_is_padded_without_a_block_sized_buffer(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a file shrinks during a plain-TCP download the rest of the 64 MiB sendfile frame is
    padded with zeros; that padding must go out under backpressure, not as one 64 MiB write into
    the transport's buffer (a user truncating files under many downloads would exhaust memory)."""
    recorder = SessionRecorder(monkeypatch)
    path = home(server) / "f.bin"
    with open(path, "wb") as f:
        for _ in range(80):
            f.write(b"\xff" * MiB)
    raw = RawClient(server.port, rcvbuf=1 << 16)
    try:
        raw.login()
        [session] = recorder.sessions
        raw.send(m.GetFile(id=1, path="f.bin"))
        assert isinstance(raw.next_event(), m.FileInfo)
        os.truncate(path, 0)
        got = 0
        for _ in range(100_000):  # read until the padding (zeros) arrives
            ev = raw.next_event()
            assert isinstance(ev, Data), ev
            got += len(ev.data)
            if b"\x00" in ev.data:
                break
        else:
            pytest.fail("no padding received")
        assert got < 64 * MiB

        def buffered() -> int:
            return int(session.writer.transport.get_write_buffer_size())

        assert not wait_until(lambda: on_server(server, buffered) > 8 * MiB, timeout=1.0)
    finally:
        raw.close()
    assert wait_until(lambda: no_sessions(server))


@pytest.mark.timeout(60)
def test_the_failed_hash_job_of_an_ended_download_is_retrieved(server: ServerThread) -> None:
    """The chunk hashes of a download are computed in a thread while it streams; when the file
    shrinks that job fails, and if the download then ends early (the client left) nobody awaits it.
    Its exception must still be retrieved, or asyncio logs an error whenever the future is
    collected, in whatever code happens to run then."""
    path = home(server) / "f.bin"
    with open(path, "wb") as f:
        for _ in range(80):
            f.write(b"\xff" * MiB)
    raw = RawClient(server.port, rcvbuf=1 << 16)
    try:
        raw.login()
        raw.send(m.GetFile(id=1, path="f.bin"))
        assert isinstance(raw.next_event(), m.FileInfo)
        os.truncate(path, 0)
        assert isinstance(raw.next_event(), Data)
    finally:
        raw.close()
    assert wait_until(lambda: no_sessions(server))
    on_server(server, gc.collect)  # no_logged_errors sees an unretrieved exception now
    gc.collect()
