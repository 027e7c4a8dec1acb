"""Float fields on the wire are finite and bounded: decoding refuses inf, NaN and out-of-range times
as a malformed message naming the field (an mtime of inf or NaN reached ``os.utime`` and answered
"internal server error (OverflowError/ValueError)"); senders clamp times read from disk.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ferry.hashing import small_digest
from ferry.wire import MalformedMessage
from ferry.wire import messages as m
from ferry_server import ServerThread
from transfer_support import RawClient, connect, home, running_server

BAD = [math.inf, -math.inf, math.nan, 1e300, -1e300, m.MAX_TIME + 1, m.MIN_TIME - 1]

#: Every message that carries a time, built with ``t`` in it, and where the decoder finds it.
CARRIERS: list[tuple[str, Callable[[float], m.Message]]] = [
    ("$.mtime", lambda t: m.PutFile(id=1, path="f", size=0, mtime=t)),
    ("$.mtime", lambda t: m.FileInfo(id=1, size=0, mtime=t, mode=0o644)),
    ("$.entry.mtime", lambda t: m.StatReply(id=1, entry=m.Entry(name="f", kind="file", mtime=t))),
    ("$.entries[0].mtime", lambda t: m.ListReply(id=1, entries=[m.Entry(name="f", kind="file", mtime=t)])),
    ("$.items[0].mtime", lambda t: m.TreeItems(id=1, items=[m.TreeItem(path="f", kind="file", mtime=t)])),
    ("$.errors[0].mtime", lambda t: m.TreeAck(id=1, files=0, bytes=0, errors=[m.TreeItem(path="f", kind="error", mtime=t)])),
]


def encode_unchecked(msg: m.Message) -> bytes:
    """What a hostile or buggy peer can send: msgspec validates on decode only."""
    return msgspec.msgpack.encode(msg)


@pytest.mark.parametrize(("where", "build"), CARRIERS, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("value", BAD, ids=repr)
def test_a_time_that_is_not_a_finite_date_is_refused_naming_the_field(
    where: str, build: Callable[[float], m.Message], value: float
) -> None:
    with pytest.raises(MalformedMessage) as info:
        m.MessageCodec().decode(encode_unchecked(build(value)))
    assert where in str(info.value)


@pytest.mark.parametrize(("where", "build"), CARRIERS, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("value", [m.MIN_TIME, m.MAX_TIME, 0.0, -1.5, 1_700_000_000.123456])
def test_every_time_from_year_1_to_9999_is_carried_exactly(
    where: str, build: Callable[[float], m.Message], value: float
) -> None:
    msg = build(value)
    assert m.MessageCodec().decode(encode_unchecked(msg)) == msg


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 0.0, -1.0, m.MAX_TIMEOUT * 2])
def test_an_exec_timeout_must_be_positive_and_finite(value: float) -> None:
    with pytest.raises(MalformedMessage) as info:
        m.MessageCodec().decode(encode_unchecked(m.Exec(id=1, command="true", timeout=value)))
    assert "$.timeout" in str(info.value)
    ok = m.Exec(id=1, command="true", timeout=0.5)
    assert m.MessageCodec().decode(encode_unchecked(ok)) == ok


def test_wire_time_clamps_what_a_disk_may_hold() -> None:
    assert m.wire_time(1e15) == m.MAX_TIME and m.wire_time(-1e15) == m.MIN_TIME
    assert m.wire_time(math.inf) == m.MAX_TIME and m.wire_time(-math.inf) == m.MIN_TIME
    assert m.wire_time(math.nan) == 0.0
    assert m.wire_time(1_700_000_000.25) == 1_700_000_000.25


def _floats(t: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every float type reachable in msgspec type info ``t`` (through structs, unions, lists)."""
    if isinstance(t, msgspec.inspect.FloatType):
        yield where, t
    elif isinstance(t, msgspec.inspect.StructType):
        for f in t.fields:
            yield from _floats(f.type, f"{where}.{f.name}")
    elif isinstance(t, msgspec.inspect.UnionType):
        for u in t.types:
            yield from _floats(u, where)
    elif isinstance(t, msgspec.inspect.ListType | msgspec.inspect.DictType):
        item = t.item_type if isinstance(t, msgspec.inspect.ListType) else t.value_type
        yield from _floats(item, f"{where}[]")


def test_every_float_field_of_every_message_is_bounded_on_both_sides() -> None:
    """A new float field without bounds would let inf and NaN in again (msgspec accepts both)."""
    found = []
    for cls in m.ALL_MESSAGES:
        for where, t in _floats(msgspec.inspect.type_info(cls), cls.__name__):
            found.append(where)
            assert (t.ge is not None or t.gt is not None) and (t.le is not None or t.lt is not None), where
    assert "PutFile.mtime" in found and "Exec.timeout" in found


# --- over a real connection --------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "request_",
    [
        m.PutFile(id=1, path="inline.txt", size=2, mtime=math.inf, data=b"hi"),
        m.PutFile(id=1, path="big.bin", size=1 << 20, mtime=math.nan, token="t1"),
        m.Exec(id=1, command="true", timeout=math.inf),
    ],
    ids=["inline-put-inf", "put-nan", "exec-timeout-inf"],
)
def test_a_request_with_an_infinite_or_nan_float_is_refused_as_malformed(
    tmp_path: Path, request_: m.Message, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a real socket: the server answers ``protocol`` naming the field (before: "internal
    server error (OverflowError)" / "(ValueError)" once the value reached the file system), keeps
    nothing, and goes on serving other connections."""
    with running_server(tmp_path / "root", plain=True) as srv:
        raw = RawClient(srv.port)
        try:
            raw.login()
            raw.send(request_)
            events = raw.until_closed()
        finally:
            raw.close()
        [error] = [e for e in events if isinstance(e, m.Error)]
        assert error.code == "protocol", error
        field = "$.timeout" if isinstance(request_, m.Exec) else "$.mtime"
        assert field in error.message, error
        assert list(home(srv).iterdir()) == []  # no file, no partial
        other = RawClient(srv.port)
        try:
            other.login()
            other.send(m.Stat(id=1, path=""))
            assert isinstance(other.reply(1), m.StatReply)
        finally:
            other.close()
    assert not [r for r in caplog.records if "internal" in r.getMessage()]


@pytest.mark.cell(transport="plain")
@pytest.mark.timeout(60)
def test_a_tree_upload_record_with_a_nan_mtime_is_refused_as_malformed(server: ServerThread, tmp_path: Path) -> None:
    srv = server
    raw = RawClient(srv.port)
    try:
        raw.login()
        raw.send(m.PutTree(id=1, path="up"))
        data = b"data"
        item = m.TreeItem(
            path="f", kind="file", size=4, mtime=math.nan, data=data, digest=small_digest("blake3", data)
        )
        raw.send(m.TreeItems(id=1, items=[item], end=True))
        events = raw.until_closed()
    finally:
        raw.close()
    [error] = [e for e in events if isinstance(e, m.Error)]
    assert error.code == "protocol" and "$.items[0].mtime" in error.message, error
    assert not (home(srv) / "up" / "f").exists()


@pytest.fixture
def shm_root() -> Iterator[Path]:
    """A server root on a tmpfs, which (unlike ext4) keeps any 64-bit file time."""
    if not os.path.isdir("/dev/shm"):
        pytest.fail("this test needs a tmpfs at /dev/shm (it keeps file times ext4 clamps)")
    root = Path(tempfile.mkdtemp(prefix="ferry-test-times-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_file_time_beyond_year_9999_on_disk_is_sent_clamped(shm_root: Path, tmp_path: Path) -> None:
    """The server clamps what it reads from disk: a receiver refuses times outside years 1-9999,
    so an unclamped one would cost the whole listing, tree or download."""
    with running_server(shm_root / "root", plain=True) as srv:
        folder = home(srv) / "t"
        folder.mkdir()
        for name, t in (("future", 1e15), ("past", -1e15)):
            (folder / name).write_bytes(b"x")
            os.utime(folder / name, (t, t))

        async def main() -> None:
            async with await connect(srv, tmp_path) as c:
                listed = {e.name: e.mtime for e in await c.listdir("t", recursive=True)}
                assert listed == {"future": m.MAX_TIME, "past": m.MIN_TIME}
                assert (await c.stat("t/future")).mtime == m.MAX_TIME
                await c.get("t/future", tmp_path / "future")  # FileInfo carries the time too
                await c.get_tree("t", tmp_path / "tree")

        asyncio.run(main())
        assert (tmp_path / "future").read_bytes() == b"x"
        assert (tmp_path / "tree" / "past").read_bytes() == b"x"


@pytest.mark.timeout(60)
@pytest.mark.cell(transport="plain")
def test_a_command_without_a_real_timeout_still_runs(server: ServerThread, tmp_path: Path) -> None:
    """``ferry exec --timeout inf`` means no timeout: the client leaves the field out rather than
    send a value the server must refuse."""
    srv = server

    async def main() -> Any:
        async with await connect(srv, tmp_path) as c:
            return await c.run(["echo", "still here"], timeout=math.inf)

    result = asyncio.run(main())
    assert result.exit_code == 0 and result.stdout == b"still here\n" and not result.timed_out
