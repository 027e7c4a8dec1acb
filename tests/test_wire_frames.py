"""The frame decoder: sticky packets, limits, and typed errors on malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.wire import messages as m
from ferry.wire.errors import BadFrameHeader, FrameTooLarge, NotFerryPeer, TruncatedStream
from ferry.wire.frames import (
    HEADER_SIZE,
    NEED_DATA,
    Data,
    FrameDecoder,
    RawMessage,
    data_header,
    message_header,
)
from wire_strategies import chunkings


def drain(dec: FrameDecoder) -> list[RawMessage | Data]:
    out: list[RawMessage | Data] = []
    while (ev := dec.next_event()) is not NEED_DATA:
        assert isinstance(ev, RawMessage | Data)
        out.append(ev)
    return out


def msg_frame(payload: bytes) -> bytes:
    return message_header(len(payload)) + payload


def test_two_frames_in_one_chunk_and_one_frame_byte_by_byte() -> None:
    blob = msg_frame(b"abc") + data_header(7, 1, 4) + b"wxyz" + msg_frame(b"")
    dec = FrameDecoder()
    dec.feed(blob)
    assert drain(dec) == [RawMessage(b"abc"), Data(7, 1, b"wxyz", True), RawMessage(b"")]
    dec = FrameDecoder()
    events: list[RawMessage | Data] = []
    for i in range(len(blob)):
        dec.feed(blob[i : i + 1])
        events += drain(dec)
    data = b"".join(e.data for e in events if isinstance(e, Data))
    assert [e for e in events if isinstance(e, RawMessage)] == [RawMessage(b"abc"), RawMessage(b"")]
    assert data == b"wxyz"
    assert [e.end for e in events if isinstance(e, Data)][-1] is True


def test_data_frames_stream_without_waiting_for_the_whole_frame() -> None:
    dec = FrameDecoder(max_data=1 << 30)
    dec.feed(data_header(1, 1, 1 << 30) + b"x" * 1000)
    ev = dec.next_event()
    assert ev == Data(1, 1, b"x" * 1000, False)
    assert dec.buffered == 0  # nothing held back: a 1 GiB frame costs no memory


def test_zero_length_data_frame() -> None:
    dec = FrameDecoder()
    dec.feed(data_header(3, 2, 0))
    assert dec.next_event() == Data(3, 2, b"", True)
    assert dec.next_event() is NEED_DATA


def test_message_over_the_limit_is_refused_before_buffering() -> None:
    dec = FrameDecoder(max_message=100)
    dec.feed(message_header(101))
    with pytest.raises(FrameTooLarge, match="101 bytes exceeds the limit of 100"):
        dec.next_event()


def test_data_over_the_limit_is_refused() -> None:
    dec = FrameDecoder(max_data=10)
    dec.feed(data_header(1, 1, 11))
    with pytest.raises(FrameTooLarge):
        dec.next_event()


def test_unknown_kind_after_a_good_frame() -> None:
    dec = FrameDecoder()
    dec.feed(msg_frame(b"x") + bytes([9]) + bytes(HEADER_SIZE - 1))
    assert dec.next_event() == RawMessage(b"x")
    with pytest.raises(BadFrameHeader, match="unknown frame kind 9"):
        dec.next_event()


def test_http_client_on_a_ferry_port_is_named() -> None:
    dec = FrameDecoder()
    dec.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(NotFerryPeer, match="does not speak the ferry protocol"):
        dec.next_event()


def test_message_frame_with_channel_is_malformed() -> None:
    dec = FrameDecoder()
    dec.feed(bytes([1, 0, 0, 0, 0, 5, 0, 0, 0, 0]))
    with pytest.raises(BadFrameHeader):
        dec.next_event()


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 2])
def test_eof_inside_a_frame_is_truncation(cut: int) -> None:
    blob = msg_frame(b"hello")
    dec = FrameDecoder()
    dec.feed(blob[:cut])
    dec.feed(b"")
    with pytest.raises(TruncatedStream):
        drain(dec)


def test_eof_inside_a_data_frame_is_truncation() -> None:
    dec = FrameDecoder()
    dec.feed(data_header(1, 1, 10) + b"12345")
    assert dec.next_event() == Data(1, 1, b"12345", False)
    dec.feed(b"")
    with pytest.raises(TruncatedStream):
        dec.next_event()


def test_buffer_is_compacted_under_a_long_stream_of_small_frames() -> None:
    dec = FrameDecoder()
    frame = msg_frame(b"z" * 50)
    for _ in range(2000):
        dec.feed(frame)
        assert dec.next_event() == RawMessage(b"z" * 50)
    assert len(dec._buf) < 10 * len(frame)


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=200).map(lambda p: ("m", p)),
            st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=300)).map(
                lambda t: ("d", t)
            ),
        ),
        max_size=20,
    ),
    data=st.data(),
)
def test_any_frames_under_any_chunking_round_trip(
    frames: list[tuple[str, object]], data: st.DataObject
) -> None:
    blob = b""
    for kind, val in frames:
        if kind == "m":
            assert isinstance(val, bytes)
            blob += msg_frame(val)
        else:
            ch, stream, payload = val  # type: ignore[misc]
            blob += data_header(ch, stream, len(payload)) + payload
    dec = FrameDecoder()
    got: list[tuple[str, object]] = []
    pending: dict[tuple[int, int], bytes] = {}
    for piece in [*data.draw(chunkings(blob)), b""]:
        dec.feed(piece)
        for ev in drain(dec):
            if isinstance(ev, RawMessage):
                got.append(("m", ev.payload))
            else:
                key = (ev.channel, ev.stream)
                pending[key] = pending.get(key, b"") + ev.data
                if ev.end:
                    got.append(("d", (ev.channel, ev.stream, pending.pop(key))))
    assert got == frames
    assert not pending


def test_message_frames_decode_to_typed_messages() -> None:
    codec = m.MessageCodec()
    payload = codec.encode(m.Stat(id=3, path="a/b"))
    dec = FrameDecoder()
    dec.feed(msg_frame(payload))
    ev = dec.next_event()
    assert isinstance(ev, RawMessage)
    assert codec.decode(ev.payload) == m.Stat(id=3, path="a/b")


def test_skip_data_lets_the_caller_take_a_frames_payload_itself() -> None:
    dec = FrameDecoder(max_data=1 << 30)
    dec.feed(data_header(5, 1, 100) + b"a" * 10)
    assert dec.next_event() == Data(5, 1, b"a" * 10, False)
    assert (dec.data_remaining, dec.data_channel) == (90, 5)
    assert dec.next_event() is NEED_DATA
    dec.skip_data(60)  # taken off the socket by the caller (e.g. spliced into a file)
    assert dec.data_remaining == 30
    with pytest.raises(ValueError):
        dec.skip_data(31)  # past the frame's end
    dec.feed(b"b" * 30 + msg_frame(b"next"))
    with pytest.raises(ValueError):
        dec.skip_data(1)  # fed bytes come first
    assert drain(dec) == [Data(5, 1, b"b" * 30, True), RawMessage(b"next")]
    assert (dec.data_remaining, dec.data_channel) == (0, None)


def test_skip_data_to_the_frames_end_resumes_at_the_next_header() -> None:
    dec = FrameDecoder()
    dec.feed(data_header(2, 1, 50))
    assert dec.next_event() is NEED_DATA
    assert dec.data_remaining == 50
    dec.skip_data(50)
    assert dec.at_frame_boundary
    dec.feed(msg_frame(b"x"))
    assert drain(dec) == [RawMessage(b"x")]
    with pytest.raises(ValueError):
        dec.skip_data(1)  # not inside a data frame
