"""Length-prefixed frames and an incremental, bounded decoder (sans-IO).

TCP is a byte stream: one ``send`` may arrive as many ``recv`` results and many sends as one (the
"sticky packet" problem). Every unit on a ferry connection is therefore a frame with a fixed-size
header that says what follows and how long it is::

    +------+--------+-----------+-----------+---------------+
    | kind | stream |  channel  |  length   |  payload ...  |
    |  u8  |   u8   | u32 (BE)  | u32 (BE)  | length bytes  |
    +------+--------+-----------+-----------+---------------+

``kind`` is :attr:`FrameKind.MESSAGE` (a msgpack-encoded typed message; ``stream`` and ``channel``
must be 0) or :attr:`FrameKind.DATA` (raw bytes belonging to ``channel`` — a transfer or a command —
and ``stream`` — e.g. stdout or stderr).

Message frames must be complete before they can be decoded, so they are capped by
``max_message`` (small). Data frames are *streamed*: the decoder hands out the payload piece by piece
as bytes arrive, so a large ``max_data`` costs no memory and lets the sender use ``sendfile`` for big
blocks. The decoder never holds more than one message frame plus what the caller fed it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from ferry.wire.errors import BadFrameHeader, FrameTooLarge, NotFerryPeer, TruncatedStream

HEADER: Final = struct.Struct("!BBII")
HEADER_SIZE: Final = HEADER.size  # 10 bytes

DEFAULT_MAX_MESSAGE: Final = 1 << 20  # 1 MiB: the largest message (directory listings are paged below it)
DEFAULT_MAX_DATA: Final = 1 << 26  # 64 MiB: data frames are streamed, so this bounds nothing in memory
ABSOLUTE_MAX_FRAME: Final = (1 << 32) - 1


class FrameKind(enum.IntEnum):
    """What a frame carries."""

    MESSAGE = 1
    DATA = 2


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A complete, still-encoded message frame payload (decoded to a typed message by the caller)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Data:
    """A piece of a data frame's payload; ``end`` is True on the last piece of the frame."""

    channel: int
    stream: int
    data: bytes
    end: bool


class _NeedData:
    """Sentinel type: the decoder needs more bytes before it can produce another event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


def message_header(length: int) -> bytes:
    """Header of a message frame carrying ``length`` payload bytes."""
    return HEADER.pack(FrameKind.MESSAGE, 0, 0, length)


def data_header(channel: int, stream: int, length: int) -> bytes:
    """Header of a data frame; the caller sends ``length`` payload bytes after it (e.g. via sendfile)."""
    if not 0 <= length <= ABSOLUTE_MAX_FRAME:
        raise ValueError(f"data frame length {length} out of range")
    return HEADER.pack(FrameKind.DATA, stream, channel, length)


class FrameDecoder:
    """Turns an arbitrary split of received bytes into :class:`RawMessage` and :class:`Data` events.

    Feed bytes with :meth:`feed` (``b""`` signals EOF) and pull events with :meth:`next_event` until it
    returns :data:`NEED_DATA`. Invalid input raises a :class:`~ferry.wire.errors.RemoteProtocolError`
    subclass; after that the decoder is unusable (the connection must be dropped).
    """

    def __init__(self, *, max_message: int = DEFAULT_MAX_MESSAGE, max_data: int = DEFAULT_MAX_DATA) -> None:
        self.max_message = max_message
        self.max_data = max_data
        self._buf = bytearray()
        self._pos = 0  # read position in _buf; compacted lazily to avoid O(n^2) memmoves
        # Bytes fed while nothing was buffered and a data frame was being streamed: handed out
        # without copying them through _buf (the bulk path of every transfer).
        self._direct: bytes | None = None
        self._eof = False
        self._seen_frame = False
        # Current data frame being streamed: (channel, stream, bytes still to come).
        self._data: tuple[int, int, int] | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet turned into events."""
        return len(self._buf) - self._pos + (len(self._direct) if self._direct is not None else 0)

    @property
    def eof(self) -> bool:
        """True once :meth:`feed` was given ``b""`` (the peer closed its side)."""
        return self._eof

    @property
    def at_frame_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for the peer to stop)."""
        return self._data is None and self.buffered == 0

    @property
    def data_remaining(self) -> int:
        """Payload bytes of the current data frame not yet fed (0 outside a data frame).

        Only meaningful when :attr:`buffered` is 0: bytes already fed are handed out first.
        """
        if self._data is None:
            return 0
        return max(0, self._data[2] - self.buffered)

    @property
    def data_channel(self) -> int | None:
        """Channel of the data frame being streamed, or None between frames."""
        return None if self._data is None else self._data[0]

    def skip_data(self, n: int) -> None:
        """Account for ``n`` payload bytes of the current data frame that the caller received
        itself, bypassing :meth:`feed` (e.g. spliced from the socket straight into a file).

        Allowed only when nothing is buffered (those bytes come first) and ``n`` does not run past
        the frame. The frame ends silently: no final :class:`Data` event is produced for it.
        """
        if n < 0 or self.buffered or self._data is None or n > self._data[2]:
            raise ValueError(f"cannot skip {n} bytes here (buffered {self.buffered}, frame {self._data})")
        channel, stream, remaining = self._data
        remaining -= n
        self._data = None if remaining == 0 else (channel, stream, remaining)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; an empty ``data`` means the peer closed its sending side."""
        if not data:
            self._eof = True
            return
        if self._direct is not None:  # keep order: the direct bytes come first
            self._buf += self._direct
            self._direct = None
        if self._data is not None and self._pos == len(self._buf) and isinstance(data, bytes):
            self._direct = data
            return
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> RawMessage | Data | _NeedData:
        """The next complete event, or :data:`NEED_DATA`. Raises on malformed input or early EOF."""
        if self._data is not None:
            return self._next_data_piece()
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return self._need_more(avail)
        kind, stream, channel, length = HEADER.unpack_from(self._buf, self._pos)
        if kind == FrameKind.MESSAGE:
            if stream or channel:
                raise BadFrameHeader(f"message frame with non-zero stream/channel ({stream}/{channel})")
            if length > self.max_message:
                raise FrameTooLarge(
                    f"message frame of {length} bytes exceeds the limit of {self.max_message}"
                )
            if avail < HEADER_SIZE + length:
                return self._need_more(avail)
            start = self._pos + HEADER_SIZE
            payload = bytes(self._buf[start : start + length])
            self._pos = start + length
            self._seen_frame = True
            return RawMessage(payload)
        if kind == FrameKind.DATA:
            if length > self.max_data:
                raise FrameTooLarge(f"data frame of {length} bytes exceeds the limit of {self.max_data}")
            self._pos += HEADER_SIZE
            self._seen_frame = True
            self._data = (channel, stream, length)
            return self._next_data_piece()
        if not self._seen_frame:
            head = bytes(self._buf[self._pos : self._pos + 8])
            raise NotFerryPeer(f"the peer does not speak the ferry protocol (it sent {head!r})")
        raise BadFrameHeader(f"unknown frame kind {kind}")

    def _next_data_piece(self) -> Data | _NeedData:
        assert self._data is not None
        channel, stream, remaining = self._data
        direct = self._direct
        if direct is not None and self._pos == len(self._buf):
            take = min(len(direct), remaining)
            piece = direct if take == len(direct) else direct[:take]
            self._direct = None
            if take < len(direct):
                self._buf.clear()
                self._pos = 0
                self._buf += memoryview(direct)[take:]
            remaining -= take
            self._data = None if remaining == 0 else (channel, stream, remaining)
            return Data(channel, stream, piece, remaining == 0)
        avail = len(self._buf) - self._pos
        if remaining == 0:  # a zero-length data frame: one empty, final piece
            self._data = None
            return Data(channel, stream, b"", True)
        if avail == 0:
            return self._need_more(0)
        take = min(avail, remaining)
        piece = bytes(self._buf[self._pos : self._pos + take])
        self._pos += take
        remaining -= take
        self._data = None if remaining == 0 else (channel, stream, remaining)
        if self._pos == len(self._buf):  # everything consumed: reset cheaply
            self._buf.clear()
            self._pos = 0
        return Data(channel, stream, piece, remaining == 0)

    def _need_more(self, avail: int) -> _NeedData:
        if self._eof and (avail or self._data is not None):
            raise TruncatedStream("the peer closed the connection in the middle of a frame")
        return NEED_DATA
