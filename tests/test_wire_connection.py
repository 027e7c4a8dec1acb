"""The connection state machine: handshake, version negotiation, the state table, messages."""

from __future__ import annotations

import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.wire import (
    CONNECTION_ENDED,
    NEED_DATA,
    Connection,
    Data,
    LocalProtocolError,
    MalformedMessage,
    Role,
    State,
    TruncatedStream,
    UnexpectedMessage,
    VersionMismatch,
    choose_version,
)
from ferry.wire import messages as m
from ferry.wire.frames import message_header
from wire_strategies import chunkings, open_messages


def events(conn: Connection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if ev is CONNECTION_ENDED:
            break
    return out


def open_pair() -> tuple[Connection, Connection]:
    """A client and a server driven through hello + auth in memory."""
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(m.Hello(min_version=1, max_version=1)))
    hello = s.next_event()
    assert isinstance(hello, m.Hello)
    c.receive_data(s.send(m.Welcome(version=choose_version(hello))))
    assert isinstance(c.next_event(), m.Welcome)
    s.receive_data(c.send(m.Auth(user="u", password="p")))
    assert isinstance(s.next_event(), m.Auth)
    c.receive_data(s.send(m.AuthOk(user="u")))
    assert isinstance(c.next_event(), m.AuthOk)
    return c, s


def test_handshake_reaches_open_on_both_sides() -> None:
    c, s = open_pair()
    assert c.state is s.state is State.OPEN
    assert c.version == 1


def test_requests_before_auth_are_refused_both_ways() -> None:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError, match="may not send Stat in state hello"):
        c.send(m.Stat(id=1, path="x"))
    # A hostile client that skips the handshake: the server names the violation.
    codec = m.MessageCodec()
    payload = codec.encode(m.Stat(id=1, path="x"))
    s.receive_data(message_header(len(payload)) + payload)
    with pytest.raises(UnexpectedMessage, match="peer"):
        s.next_event()


def test_wrong_password_keeps_auth_state_for_a_retry() -> None:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    s.receive_data(c.send(m.Hello(min_version=1, max_version=1)))
    s.next_event()
    c.receive_data(s.send(m.Welcome(version=1)))
    c.next_event()
    s.receive_data(c.send(m.Auth(user="u", password="bad")))
    s.next_event()
    c.receive_data(s.send(m.Error(id=0, code="auth", message="wrong user name or password")))
    assert isinstance(c.next_event(), m.Error)
    assert c.state is State.AUTH
    with pytest.raises(LocalProtocolError):
        c.send(m.GetFile(id=1, path="f"))


def test_client_may_not_send_server_replies() -> None:
    c, _ = open_pair()
    with pytest.raises(LocalProtocolError):
        c.send(m.FileInfo(id=1, size=1, mtime=0, mode=0))


def test_data_before_open_is_a_peer_error() -> None:
    c, s = Connection(Role.CLIENT), Connection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        c.send_data(1, 0, b"x")
    from ferry.wire.frames import data_header

    s.receive_data(data_header(1, 0, 1) + b"x")
    with pytest.raises(UnexpectedMessage, match="data frame"):
        s.next_event()


def test_version_negotiation() -> None:
    assert choose_version(m.Hello(min_version=1, max_version=9)) == m.PROTOCOL_VERSION
    with pytest.raises(VersionMismatch, match="upgrade"):
        choose_version(m.Hello(min_version=50, max_version=60))


def test_bad_field_type_is_a_named_malformed_message() -> None:
    import msgspec

    _, s = open_pair()
    payload = msgspec.msgpack.encode({"t": "stat", "id": "seven", "path": "x"})
    s.receive_data(message_header(len(payload)) + payload)
    with pytest.raises(MalformedMessage, match=r"\$\.id"):
        s.next_event()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"t": "no-such-type", "id": 1}, r"unknown message type 'no-such-type' - at `\$\.t`"),
        ({"id": 1, "path": "x"}, r"unknown message type ''"),  # no tag at all
        ({"t": 7, "id": 1}, r"\$\.t"),  # a tag that is not a string
        ([1, 2, 3], "invalid message"),  # not a map
        ({"t": "stat", "id": 1, "path": "x", "extra": [1, {"y": b"z"}]}, None),  # unknown fields: ignored
    ],
)
def test_the_tag_decides_the_type(payload: object, match: str | None) -> None:
    """Messages are decoded by their tag first, then as that one type (a decoder made on first
    use): a missing, unknown or ill-typed tag is a MalformedMessage like any other bad field."""
    import msgspec

    _, s = open_pair()
    raw = msgspec.msgpack.encode(payload)
    s.receive_data(message_header(len(raw)) + raw)
    if match is None:
        assert s.next_event() == m.Stat(id=1, path="x")
    else:
        with pytest.raises(MalformedMessage, match=match):
            s.next_event()


def test_oversized_path_is_refused() -> None:
    import msgspec

    _, s = open_pair()
    payload = msgspec.msgpack.encode({"t": "stat", "id": 1, "path": "a" * 5000})
    s.receive_data(message_header(len(payload)) + payload)
    with pytest.raises(MalformedMessage):
        s.next_event()


def test_clean_eof_ends_and_eof_mid_frame_is_broken() -> None:
    c, s = open_pair()
    s.receive_data(b"")
    assert s.next_event() is CONNECTION_ENDED
    assert s.state is State.CLOSED
    frame = c.send(m.Stat(id=1, path="x"))
    _c2, s2 = open_pair()
    s2.receive_data(frame[:5])
    s2.receive_data(b"")
    with pytest.raises(TruncatedStream):
        s2.next_event()


def test_goodbye_closes() -> None:
    c, s = open_pair()
    s.receive_data(c.send(m.Goodbye(reason="done")))
    assert isinstance(s.next_event(), m.Goodbye)
    assert s.state is c.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        c.send(m.Ping(nonce=1))


@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(open_messages, max_size=15), data=st.data())
def test_any_message_sequence_round_trips_under_any_chunking(
    msgs: list[m.Message], data: st.DataObject
) -> None:
    c, s = open_pair()
    # Send each message from the side that may send it, all in one stream per direction.
    to_server = [x for x in msgs if type(x) in {t for t in m.ALL_MESSAGES} and _client_may(x)]
    blob = b"".join(c.send(x) for x in to_server)
    for piece in data.draw(chunkings(blob)):
        s.receive_data(piece)
    got = [e for e in events(s) if not isinstance(e, Data)]
    assert got == to_server


def _client_may(msg: m.Message) -> bool:
    from ferry.wire.connection import ALLOWED

    return type(msg) in ALLOWED[(Role.CLIENT, State.OPEN)]


def test_over_a_real_socketpair_with_a_slow_writer() -> None:
    """The same machine over a kernel socket: 2,000 messages written in odd-sized slices."""
    a, b = socket.socketpair()
    c, s = open_pair()
    msgs = [m.Stat(id=i, path=f"dir/{i}") for i in range(2000)]
    blob = b"".join(c.send(x) for x in msgs) + c.send_data(5, 0, b"\x00" * 100_000)

    def writer() -> None:
        for i in range(0, len(blob), 997):
            a.sendall(blob[i : i + 997])
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=writer)
    t.start()
    got: list[object] = []
    data = 0
    while True:
        chunk = b.recv(65536)
        s.receive_data(chunk)
        for ev in events(s):
            if isinstance(ev, Data):
                data += len(ev.data)
            elif ev is not CONNECTION_ENDED:
                got.append(ev)
        if not chunk:
            break
    t.join()
    a.close()
    b.close()
    assert got == msgs
    assert data == 100_000
