"""Fuzzing the decoder: arbitrary bytes either decode or raise ProtocolError — nothing else.

CI runs a brief pass; set FERRY_FUZZ_EXAMPLES for a longer one, or drive ``fuzz_one_input`` from
atheris (see fuzz/fuzz_wire.py).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.wire import NEED_DATA, Connection, ProtocolError, Role
from ferry.wire import messages as m
from ferry.wire.frames import message_header
from wire_strategies import open_messages

EXAMPLES = int(os.environ.get("FERRY_FUZZ_EXAMPLES", "400"))


def feed_all(role: Role, blob: bytes, *, opened: bool) -> None:
    conn = Connection(role, max_message=4096, max_data=1 << 16)
    if opened:  # skip the handshake so message bodies get exercised, not just the state table
        conn.state = conn.state.__class__.OPEN
    conn.receive_data(blob)
    conn.receive_data(b"")
    try:
        for _ in range(10_000):
            if conn.next_event() in (NEED_DATA,) or conn.state.value == "closed":
                break
    except ProtocolError:
        pass


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(blob=st.binary(max_size=2048), opened=st.booleans(), server=st.booleans())
def test_arbitrary_bytes_decode_or_raise_protocol_error(blob: bytes, opened: bool, server: bool) -> None:
    feed_all(Role.SERVER if server else Role.CLIENT, blob, opened=opened)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(msg=open_messages, flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4))
def test_mutated_valid_frames_decode_or_raise_protocol_error(
    msg: m.Message, flips: list[tuple[int, int]]
) -> None:
    payload = bytearray(m.MessageCodec().encode(msg))
    for pos, val in flips:
        if payload:
            payload[pos % len(payload)] = val
    feed_all(Role.SERVER, message_header(len(payload)) + bytes(payload), opened=True)
