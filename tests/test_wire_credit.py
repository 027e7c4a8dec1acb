"""Flow-control credit (ferry.wire.credit): the one class both sides of a command's streams and the
client's tree uploads count with; and a server that ignores the window it was given."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fake_server import FakeServer
from ferry.errors import FerryError
from ferry.wire import Connection, LocalProtocolError, RemoteProtocolError
from ferry.wire import messages as m
from ferry.wire.credit import MAX_CREDIT, Credit


def test_the_sender_takes_at_most_what_was_granted() -> None:
    c = Credit(None, initial=0)
    assert c.take(10) == 0
    c.grant(6)
    assert (c.take(4), c.take(4), c.take(4)) == (4, 2, 0)
    with pytest.raises(LocalProtocolError):
        c.spend(1)
    for bad in (0, -1):
        with pytest.raises(RemoteProtocolError):
            c.grant(bad)
    c.grant(MAX_CREDIT)
    with pytest.raises(RemoteProtocolError):
        c.grant(1)  # no peer can hand out more than fits a U64


def test_a_fixed_window_refuses_credit_for_what_was_never_sent() -> None:
    c = Credit(2)  # e.g. tree batches: each acknowledgement grants one back
    c.spend(1)
    c.grant(1)
    with pytest.raises(RemoteProtocolError, match="window"):
        c.grant(1)


def test_the_receiver_refuses_an_overrun_and_grants_back_in_half_windows() -> None:
    c = Credit(100)
    c.receive(60)
    assert c.consumed(30) == 0  # less than half a window: no message yet
    assert c.consumed(30) == 60 and c.available == 100
    with pytest.raises(RemoteProtocolError, match="window"):
        c.receive(101)
    zero = Credit(0)  # a window of 0 admits nothing until granted
    with pytest.raises(RemoteProtocolError):
        zero.receive(1)


@given(st.lists(st.tuples(st.integers(1, 5000), st.booleans()), max_size=200), st.integers(1, 10_000))
def test_both_sides_agree_and_the_window_bounds_what_is_in_flight(steps: list[tuple[int, bool]], window: int) -> None:
    """A sender and a receiver each count with a Credit; whatever the order of sends and
    consumptions, the receiver never holds more than the window and never sees an overrun."""
    sender, receiver = Credit(None, initial=window), Credit(window)
    held = 0  # received, not consumed
    for size, consume in steps:
        n = sender.take(size)
        if n:
            receiver.receive(n)
            held += n
        assert held <= window
        if consume and held:
            inc = receiver.consumed(held)
            held = 0
            if inc:
                sender.grant(inc)
        assert sender.available <= receiver.available


class WindowIgnorer(FakeServer):
    """Starts every command, then sends more stdout than the client's window allows."""

    async def answer(self, conn: Connection, writer: asyncio.StreamWriter, ev: m.Message) -> None:
        if isinstance(ev, m.Exec):
            writer.write(conn.send(m.ExecStarted(id=ev.id, pid=1)))
            chunk = bytes(ev.window // 4 or 1)
            for _ in range(8):  # twice the window, never granted
                writer.write(conn.data_header(ev.id, m.STDOUT, len(chunk)) + chunk)


@pytest.mark.timeout(30)
def test_a_server_sending_beyond_the_window_fails_the_command(tmp_path: Path) -> None:
    """Without the check the client would queue whatever such a server sends (memory without bound)."""

    async def main() -> None:
        async with WindowIgnorer([]).running() as fake, await fake.client(tmp_path) as c:
            proc = await c.start(["yes"], window=1 << 16)
            with pytest.raises(FerryError, match="window"):
                await proc.collect()
            await proc.close(grace=1)
            assert await c.ping() < 5  # one command failed; the connection is fine

    asyncio.run(main())
