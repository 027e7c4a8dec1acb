"""The ferry connection as a pure state machine (sans-IO, in the style of h11).

Feed received bytes with :meth:`Connection.receive_data`, pull events with
:meth:`Connection.next_event`; :meth:`Connection.send` and :meth:`Connection.send_data` return the
bytes to write. No sockets, no asyncio: the same object drives the asyncio server, the sync and
async clients and the in-memory tests.

Which message may be sent by whom in which state is one readable table, :data:`ALLOWED`. A message
outside the table is a :class:`LocalProtocolError` when *we* try to send it and an
:class:`UnexpectedMessage` (a :class:`RemoteProtocolError`) when the peer sends it.
"""

from __future__ import annotations

import enum
from typing import Final

from ferry.wire import messages as m
from ferry.wire.errors import LocalProtocolError, UnexpectedMessage, VersionMismatch
from ferry.wire.frames import (
    DEFAULT_MAX_DATA,
    DEFAULT_MAX_MESSAGE,
    NEED_DATA,
    Data,
    FrameDecoder,
    RawMessage,
    _NeedData,
    data_header,
    message_header,
)


class Role(enum.Enum):
    """Which end of the connection this object is."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Connection phases: handshake, authentication, open for requests, closed."""

    HELLO = "hello"
    AUTH = "auth"
    OPEN = "open"
    CLOSED = "closed"


class ConnectionEnded:
    """Event: the peer closed the connection cleanly (at a frame boundary)."""

    def __repr__(self) -> str:
        return "ConnectionEnded()"


CONNECTION_ENDED: Final = ConnectionEnded()


def _types(*types: type[m.Message]) -> frozenset[type[m.Message]]:
    return frozenset(types)


_ALWAYS: Final = _types(m.Ping, m.Pong, m.Goodbye)

#: Requests the client sends once the connection is open; each is answered with the same ``id``.
CLIENT_REQUESTS: Final = _types(
    *(m.Stat, m.ListDir, m.Mkdir, m.Remove, m.Rename, m.Df, m.GetFile, m.PutFile, m.PutFrom, m.Cancel),
    *(m.Exec, m.Window, m.Eof, m.Signal, m.Resize, m.FileEnd),
    *(m.GetTree, m.PutTree, m.TreeItems),
    *(m.ScanTree, m.GetFiles, m.GetChunks, m.Chunks, m.DeltaPut, m.DeltaGet, m.DeltaData),
    *(m.RemoveMany, m.SetAttrs),
)
#: Replies and stream messages the server sends once the connection is open.
SERVER_REPLIES: Final = _types(
    *(m.Ok, m.Error, m.StatReply, m.ListReply, m.DfReply, m.FileInfo, m.FileEnd, m.PutReady),
    *(m.ExecStarted, m.Window, m.Eof, m.ExitStatus),
    *(m.TreeItems, m.TreeAck),
    *(m.ScanItems, m.Chunks, m.DeltaData, m.BatchReply),
)

#: (sender role, state) -> message types that sender may send in that state.
ALLOWED: Final[dict[tuple[Role, State], frozenset[type[m.Message]]]] = {
    (Role.CLIENT, State.HELLO): _types(m.Hello) | _ALWAYS,
    (Role.SERVER, State.HELLO): _types(m.Welcome, m.Error) | _ALWAYS,
    (Role.CLIENT, State.AUTH): _types(m.Auth, m.AuthKey, m.AuthToken) | _ALWAYS,
    (Role.SERVER, State.AUTH): _types(m.AuthOk, m.AuthKeyOk, m.Error) | _ALWAYS,
    (Role.CLIENT, State.OPEN): CLIENT_REQUESTS | _ALWAYS,
    (Role.SERVER, State.OPEN): SERVER_REPLIES | _ALWAYS,
    (Role.CLIENT, State.CLOSED): _types(),
    (Role.SERVER, State.CLOSED): _types(),
}

#: State changes caused by a message, whoever sends it: (state, message type) -> new state.
TRANSITIONS: Final[dict[tuple[State, type[m.Message]], State]] = {
    (State.HELLO, m.Welcome): State.AUTH,
    (State.AUTH, m.AuthOk): State.OPEN,
}


def choose_version(hello: m.Hello, lo: int = m.MIN_PROTOCOL_VERSION, hi: int = m.PROTOCOL_VERSION) -> int:
    """The highest protocol version both ``hello`` and this code speak; raises VersionMismatch."""
    best = min(hello.max_version, hi)
    if best < max(hello.min_version, lo):
        raise VersionMismatch(
            f"no common protocol version: peer speaks {hello.min_version}-{hello.max_version}, "
            f"we speak {lo}-{hi}; upgrade the older side"
        )
    return best


class Connection:
    """One end of a ferry connection: framing + message codec + the state table.

    Events returned by :meth:`next_event`: a typed :class:`~ferry.wire.messages.Message`, a
    :class:`~ferry.wire.frames.Data` piece, :data:`CONNECTION_ENDED`, or :data:`NEED_DATA`.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_data: int = DEFAULT_MAX_DATA,
    ) -> None:
        self.role = role
        self.peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.state = State.HELLO
        self.version: int | None = None
        self._decoder = FrameDecoder(max_message=max_message, max_data=max_data)
        self._codec = m.MessageCodec()
        self._ended = False

    # --- sending ---------------------------------------------------------------------------

    def send(self, msg: m.Message) -> bytes:
        """Validate ``msg`` against the state table, update state, and return the frame's bytes."""
        self._check(self.role, msg, LocalProtocolError)
        payload = self._codec.encode(msg)
        self._after(msg)
        return message_header(len(payload)) + payload

    def send_data(self, channel: int, stream: int, data: bytes | bytearray | memoryview) -> bytes:
        """Frame ``data`` for ``channel``/``stream`` (allowed only when the connection is open)."""
        return self.data_header(channel, stream, len(data)) + bytes(data)

    def data_header(self, channel: int, stream: int, length: int) -> bytes:
        """Just the header of a data frame, for callers that send the payload themselves (sendfile)."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send data in state {self.state.value}")
        return data_header(channel, stream, length)

    # --- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the peer; ``b""`` means the peer closed its side."""
        self._decoder.feed(data)

    def next_event(self) -> m.Message | Data | ConnectionEnded | _NeedData:
        """The next event, or NEED_DATA. Raises RemoteProtocolError subclasses on bad input."""
        if self._ended:
            return CONNECTION_ENDED
        event = self._decoder.next_event()
        if isinstance(event, RawMessage):
            msg = self._codec.decode(event.payload)
            self._check(self.peer_role, msg, UnexpectedMessage)
            self._after(msg)
            return msg
        if isinstance(event, Data):
            if self.state is not State.OPEN:
                raise UnexpectedMessage(f"data frame received in state {self.state.value}")
            return event
        if self._decoder.eof and self._decoder.at_frame_boundary:
            self._ended = True
            self.state = State.CLOSED
            return CONNECTION_ENDED
        return NEED_DATA

    # --- state table -----------------------------------------------------------------------

    def _check(self, sender: Role, msg: m.Message, error: type[Exception]) -> None:
        if type(msg) not in ALLOWED[(sender, self.state)]:
            who = "we" if sender is self.role else "the peer"
            raise error(
                f"{who} ({sender.value}) may not send {type(msg).__name__} in state {self.state.value}"
            )

    def _after(self, msg: m.Message) -> None:
        if isinstance(msg, m.Goodbye):
            self.state = State.CLOSED
            return
        if isinstance(msg, m.Welcome):
            self.version = msg.version
        new = TRANSITIONS.get((self.state, type(msg)))
        if new is not None:
            self.state = new

    @property
    def data_remaining(self) -> int:
        """Payload bytes of the current data frame still to be received (0 between frames); see
        :attr:`FrameDecoder.data_remaining`."""
        return self._decoder.data_remaining

    @property
    def data_channel(self) -> int | None:
        """Channel of the data frame being received, or None between frames."""
        return self._decoder.data_channel

    def skip_data(self, n: int) -> None:
        """The caller took ``n`` payload bytes of the current data frame off the transport itself;
        see :meth:`FrameDecoder.skip_data`."""
        self._decoder.skip_data(n)

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events."""
        return self._decoder.buffered
