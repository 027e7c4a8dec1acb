"""Errors of the wire layer.

Split as in h11/wsproto: :class:`LocalProtocolError` means *we* tried to break the protocol (a bug in
the calling code), :class:`RemoteProtocolError` means the *peer* did (bad bytes, wrong message at
the wrong time). Every malformed input raises a subclass of :class:`ProtocolError` that names what
was wrong — never an ``IndexError`` or ``struct.error``.
"""

from __future__ import annotations

from ferry.errors import ExitCode, FerryError


class ProtocolError(FerryError):
    """Base of every wire-level protocol violation."""

    exit_code = ExitCode.CONNECTION


class LocalProtocolError(ProtocolError):
    """We attempted something the protocol forbids in the current state (a programming error)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that violate the protocol; the connection must be dropped."""


class NotFerryPeer(RemoteProtocolError):
    """The first bytes received are not a ferry frame (e.g. an HTTP or TLS client on a plain port)."""


class FrameTooLarge(RemoteProtocolError):
    """A frame header announced more bytes than the configured maximum for its kind."""


class BadFrameHeader(RemoteProtocolError):
    """A frame header is malformed (unknown kind, or fields that must be zero are not)."""


class MalformedMessage(RemoteProtocolError):
    """A message frame could not be decoded or failed validation (wrong field type, missing field)."""


class UnexpectedMessage(RemoteProtocolError):
    """A well-formed message arrived in a state where the protocol does not allow it."""


class TruncatedStream(RemoteProtocolError):
    """The peer closed the connection in the middle of a frame."""


class VersionMismatch(ProtocolError):
    """The two sides share no protocol version."""
