"""ferry's sans-IO wire protocol: frames, typed messages and the connection state machine.

Nothing here touches a socket or an event loop; see :class:`ferry.wire.connection.Connection`.
"""

from ferry.wire.connection import CONNECTION_ENDED, Connection, ConnectionEnded, Role, State, choose_version
from ferry.wire.errors import (
    BadFrameHeader,
    FrameTooLarge,
    LocalProtocolError,
    MalformedMessage,
    NotFerryPeer,
    ProtocolError,
    RemoteProtocolError,
    TruncatedStream,
    UnexpectedMessage,
    VersionMismatch,
)
from ferry.wire.frames import NEED_DATA, Data, FrameDecoder, RawMessage

__all__ = [
    "CONNECTION_ENDED",
    "NEED_DATA",
    "BadFrameHeader",
    "Connection",
    "ConnectionEnded",
    "Data",
    "FrameDecoder",
    "FrameTooLarge",
    "LocalProtocolError",
    "MalformedMessage",
    "NotFerryPeer",
    "ProtocolError",
    "RawMessage",
    "RemoteProtocolError",
    "Role",
    "State",
    "TruncatedStream",
    "UnexpectedMessage",
    "VersionMismatch",
    "choose_version",
]
