"""Issue 10 break 5: hard links, the partial-upload namespace, and commits that move the inode they
verified. Every test runs a real server on loopback and attacks it the way the attack suite did.

The hard link to an outside file stands for one a de-duplication tool made inside a home; the
"local" swaps stand for another process on the server (clients cannot rename in the namespace).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ferry.errors import RemoteError, TransferError
from ferry.fskit import partial_name
from ferry.hashing import ChunkHasher
from ferry.server.jail import PARTIAL_XATTR
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import (
    SMALL_CHUNK,
    RawClient,
    connect,
    home,
    no_logged_errors,  # noqa: F401 (a fixture: see pytestmark)
    partials,
    random_bytes,
    running_server,
)

pytestmark = [pytest.mark.usefixtures("no_logged_errors"), pytest.mark.cell(transport="plain")]

SIZE = 5 * SMALL_CHUNK + 1234  # several chunks: a resume would offer their hashes
TOKEN = "tok-attack"


def outside_file(tmp_path: Path) -> tuple[Path, bytes, os.stat_result]:
    """A file outside every home (the test's temp folder), with its content and status."""
    d = tmp_path / "outside"
    d.mkdir()
    f = d / "secret.bin"
    data = random_bytes(SIZE, 7)
    f.write_bytes(data)
    return f, data, f.stat()


def untouched(f: Path, data: bytes, before: os.stat_result) -> bool:
    st = f.stat()
    return f.read_bytes() == data and (st.st_ino, st.st_size, st.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def hashes_of(data: bytes) -> tuple[list[bytes], bytes]:
    h = ChunkHasher("blake3", SMALL_CHUNK)
    h.update(data)
    return h.finish()


def start_upload(raw: RawClient, req: int, path: str, size: int, token: str = TOKEN) -> m.PutReady:
    raw.send(m.PutFile(id=req, path=path, size=size, mtime=1.0, chunk_size=SMALL_CHUNK, token=token))
    ready = raw.reply(req)
    assert isinstance(ready, m.PutReady), ready
    return ready


def send_data(raw: RawClient, req: int, data: bytes, start: int, end: int, nonce: int) -> None:
    """Send bytes [start, end) of ``data`` and wait until the server has read them (a ping)."""
    for pos in range(start, end, 1 << 16):
        raw.send_raw(raw.conn.send_data(req, m.STDIN, data[pos : min(pos + (1 << 16), end)]))
    raw.send(m.Ping(nonce=nonce))
    assert raw.reply_pong(nonce)


def finish_upload(raw: RawClient, req: int, data: bytes) -> object:
    hashes, digest = hashes_of(data)
    raw.send(m.FileEnd(id=req, size=len(data), chunk_hashes=hashes, digest=digest))
    return raw.reply(req)


def test_hard_link_renamed_to_a_partial_name_is_refused(server: ServerThread, tmp_path: Path) -> None:
    secret, data, before = outside_file(tmp_path)
    h = home(server)
    os.link(secret, h / "dedup.bin")  # made on the server, e.g. by a de-duplication tool

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            with pytest.raises(RemoteError) as info:
                await c.rename("dedup.bin", partial_name("victim.bin", TOKEN))
            assert info.value.code == "reserved-name"
            assert "reserved for ferry's unfinished uploads" in str(info.value)

    asyncio.run(main())
    assert (h / "dedup.bin").exists() and partials(h) == []
    assert untouched(secret, data, before)


def test_resume_never_touches_a_hard_link_under_a_partial_name(server: ServerThread, tmp_path: Path) -> None:
    """The attack's second half, with the link already named like a partial (as before the fix, or
    by a tool on the server): no chunk hashes of the outside file, nothing written to it."""
    secret, data, before = outside_file(tmp_path)
    h = home(server)
    pname = partial_name("victim.bin", TOKEN)
    os.link(secret, h / pname)
    mine = random_bytes(SIZE, 8)
    raw = RawClient(server.port)
    try:
        raw.login()
        ready = start_upload(raw, 1, "victim.bin", SIZE)
        assert ready.chunk_hashes == []  # no content oracle
        raw.send(m.PutFrom(id=1, offset=0))
        send_data(raw, 1, mine, 0, SIZE, 1)
        assert isinstance(finish_upload(raw, 1, mine), m.Ok)
    finally:
        raw.close()
    assert untouched(secret, data, before)
    assert secret.stat().st_nlink == 1  # the link's *name* went to a fresh partial, and was committed
    assert (h / "victim.bin").read_bytes() == mine
    assert partials(h) == []


def test_resume_after_offering_no_hashes_cannot_claim_an_offset(server: ServerThread, tmp_path: Path) -> None:
    secret, data, before = outside_file(tmp_path)
    h = home(server)
    os.link(secret, h / partial_name("victim.bin", TOKEN))
    raw = RawClient(server.port)
    try:
        raw.login()
        assert start_upload(raw, 1, "victim.bin", SIZE).chunk_hashes == []
        # A client that claims the server holds the first chunk: refused, the connection ends.
        raw.send(m.PutFrom(id=1, offset=SMALL_CHUNK))
        events = raw.until_closed()
        assert any(isinstance(e, m.Error) and e.code == "protocol" for e in events), events
    finally:
        raw.close()
    assert untouched(secret, data, before)


def test_a_file_the_server_did_not_create_is_not_resumed(server: ServerThread, tmp_path: Path) -> None:
    """One link, but no mark: someone else's file (or one renamed from another partial's name)."""
    h = home(server)
    pname = partial_name("f.bin", TOKEN)
    foreign = random_bytes(SIZE, 9)
    (h / pname).write_bytes(foreign)
    raw = RawClient(server.port)
    try:
        raw.login()
        assert start_upload(raw, 1, "f.bin", SIZE).chunk_hashes == []
    finally:
        raw.close()


def test_genuine_partials_still_resume_after_a_restart(tmp_path: Path) -> None:
    data = random_bytes(SIZE, 10)
    with running_server(tmp_path / "root", plain=True) as srv:
        raw = RawClient(srv.port)
        raw.login()
        start_upload(raw, 1, "big.bin", SIZE)
        raw.send(m.PutFrom(id=1, offset=0))
        send_data(raw, 1, data, 0, 3 * SMALL_CHUNK + 10, 1)
        raw.close()
    h = tmp_path / "root" / "homes" / "alice"
    [part] = partials(h)
    assert os.getxattr(h / part, PARTIAL_XATTR) == part.encode()
    # A new server process (a restart): the mark on the inode says the partial is genuine.
    with running_server(tmp_path / "root", plain=True, users=()) as srv:
        raw = RawClient(srv.port)
        try:
            raw.login()
            ready = start_upload(raw, 1, "big.bin", SIZE)
            assert ready.chunk_hashes == hashes_of(data[: 3 * SMALL_CHUNK])[0]
            raw.send(m.PutFrom(id=1, offset=3 * SMALL_CHUNK))
            send_data(raw, 1, data, 3 * SMALL_CHUNK, SIZE, 2)
            assert isinstance(finish_upload(raw, 1, data), m.Ok)
        finally:
            raw.close()
    assert (h / "big.bin").read_bytes() == data
    with pytest.raises(OSError):  # a complete file carries no partial mark
        os.getxattr(h / "big.bin", PARTIAL_XATTR)


@pytest.mark.parametrize(
    "what",
    ["put-inline", "put-stream", "mkdir", "mkdir-parents", "put-tree", "rename-from", "rename-to"],
)
def test_clients_cannot_create_or_move_partial_names(server: ServerThread, tmp_path: Path, what: str) -> None:
    h = home(server)
    reserved = partial_name("x", "t1")
    (h / "plain.txt").write_bytes(b"plain")
    src = tmp_path / "src"
    src.mkdir()
    (src / "small").write_bytes(b"s")
    (src / "big").write_bytes(random_bytes(300_000, 1))
    tree = tmp_path / "tree"
    (tree / reserved).mkdir(parents=True)
    (tree / reserved / "f").write_bytes(b"f")

    async def main() -> None:
        async with await connect(server, tmp_path) as c:
            with pytest.raises(RemoteError) as info:
                if what == "put-inline":
                    await c.put(src / "small", reserved)
                elif what == "put-stream":
                    await c.put(src / "big", reserved)
                elif what == "mkdir":
                    await c.mkdir(reserved)
                elif what == "mkdir-parents":
                    await c.mkdir(f"a/{reserved}/b", parents=True)
                elif what == "put-tree":
                    try:
                        await c.put_tree(tree, "t")
                    except TransferError as exc:  # a tree reports its failed records together
                        assert "reserved for ferry's unfinished uploads" in str(exc)
                        raise RemoteError("reserved-name", str(exc)) from exc
                elif what == "rename-to":
                    await c.rename("plain.txt", reserved)
                else:
                    # A partial the server made (an interrupted upload) cannot be moved out either.
                    (h / reserved).write_bytes(b"part")
                    await c.rename(reserved, "visible.txt")
            assert info.value.code == "reserved-name", info.value

    asyncio.run(main())
    assert not (h / "visible.txt").exists()
    assert not (h / "a" / reserved).exists()
    assert not (h / "t" / reserved).exists()


def test_rename_onto_an_in_progress_partial_is_refused(server: ServerThread, tmp_path: Path) -> None:
    """The race of the attack suite: a second session of the same user renames its own file onto
    the name of the first session's partial before that upload commits."""
    h = home(server)
    mine = random_bytes(SIZE, 11)
    evil = random_bytes(SIZE, 12)
    (h / "evil.bin").write_bytes(evil)
    a = RawClient(server.port)
    try:
        a.login()
        start_upload(a, 1, "target.bin", SIZE)
        a.send(m.PutFrom(id=1, offset=0))
        send_data(a, 1, mine, 0, SIZE // 2, 1)

        async def second_session() -> None:
            async with await connect(server, tmp_path) as b:
                with pytest.raises(RemoteError) as info:
                    await b.rename("evil.bin", partial_name("target.bin", TOKEN))
                assert info.value.code == "reserved-name"

        asyncio.run(second_session())
        send_data(a, 1, mine, SIZE // 2, SIZE, 2)
        assert isinstance(finish_upload(a, 1, mine), m.Ok)
    finally:
        a.close()
    assert (h / "target.bin").read_bytes() == mine
    assert (h / "evil.bin").read_bytes() == evil


def test_commit_moves_the_inode_it_verified_not_the_name(server: ServerThread, tmp_path: Path) -> None:
    """The same swap done by a process on the server (which the namespace rule cannot stop): the
    commit notices that the partial's name now carries another inode and publishes nothing."""
    h = home(server)
    mine = random_bytes(SIZE, 13)
    evil = random_bytes(SIZE, 14)
    pname = partial_name("target.bin", TOKEN)
    a = RawClient(server.port)
    try:
        a.login()
        start_upload(a, 1, "target.bin", SIZE)
        a.send(m.PutFrom(id=1, offset=0))
        send_data(a, 1, mine, 0, SIZE, 1)
        (h / "evil.bin").write_bytes(evil)
        os.rename(h / "evil.bin", h / pname)  # a local process swaps the partial's name
        reply = finish_upload(a, 1, mine)
        assert isinstance(reply, m.Error) and reply.code == "changed", reply
        assert "nothing was kept" in reply.message
    finally:
        a.close()
    assert not (h / "target.bin").exists()
    assert (h / pname).read_bytes() == evil  # put back where it was, untouched
