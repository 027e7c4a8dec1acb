"""The server KINDs as sans-IO protocol handlers: bytes in, bytes out, plus a "close" decision.

Every concurrency model (iterative, thread, fork, prefork, select, asyncio) drives the same
handlers, so the protocol logic of ``greet`` exists exactly once and the models only move bytes.
A handler never touches a socket, a clock or a thread, which is why it can be unit-tested with
plain byte strings and why a bug in one client's handler can only ever affect that client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KINDS: Final = ("hello", "greet", "upper", "echo")

#: Longest line the line-based kinds buffer before acting on it. Without a cap, a client that
#: never sends a newline could make the server buffer without bound.
MAX_LINE: Final = 64 * 1024

HELLO: Final = b"Hello world\n"
WELCOME: Final = b"Welcome!\n"
NOT_UTF8: Final = b"error: line is not valid UTF-8; closing\n"
TOO_LONG: Final = b"error: line too long; closing\n"


@dataclass(frozen=True, slots=True)
class Step:
    """What a handler wants done next: send ``out``, then (if ``close``) end the connection."""

    out: bytes = b""
    close: bool = False


_NOTHING: Final = Step()


class StreamHandler:
    """One connection's protocol state. Subclasses override the three events they care about.

    The driver calls :meth:`start` once after accepting, :meth:`feed` for every chunk received
    (chunk boundaries are arbitrary: TCP is a byte stream) and :meth:`eof` when the peer has
    finished sending. Once a step asks to close, the driver stops calling the handler.
    """

    def start(self) -> Step:
        """Bytes to send as soon as the client connects (a banner), and whether to close then."""
        return _NOTHING

    def feed(self, data: bytes) -> Step:
        """Consume received bytes; return the reply for them."""
        return _NOTHING

    def eof(self) -> Step:
        """The peer half-closed: return any final reply. The driver closes afterwards."""
        return Step(close=True)


class HelloHandler(StreamHandler):
    """``hello``: send one line and close, whatever the client does."""

    def start(self) -> Step:
        """Greet and close at once."""
        return Step(HELLO, close=True)


class EchoHandler(StreamHandler):
    """``echo``: reply with exactly the bytes received, chunk by chunk.

    Nothing is buffered here: the reply for a chunk is the chunk itself, so memory per client is
    bounded by the driver's read size and output high-water mark, not by the message size.
    """

    def feed(self, data: bytes) -> Step:
        """Return the very same bytes (no copy)."""
        return Step(data)


class LineHandler(StreamHandler):
    """Base for line-based kinds: splits the stream into ``\\n``-terminated lines.

    A partial line is kept until its newline arrives; at EOF a trailing partial line is handled
    as a last line, so ``printf 'abc' | nc`` still gets an answer.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def on_line(self, line: bytes) -> Step:
        """Handle one complete line (including its ``\\n``, absent only for a final partial line)."""
        raise NotImplementedError

    def on_overlong(self, part: bytes) -> Step:
        """A line exceeded :data:`MAX_LINE` without a newline. Default: refuse and close."""
        return Step(TOO_LONG, close=True)

    def feed(self, data: bytes) -> Step:
        """Split into lines and concatenate their replies, stopping at the first close."""
        self._buf += data
        out: list[bytes] = []
        start = 0
        buf = self._buf
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            step = self.on_line(bytes(buf[start : nl + 1]))
            start = nl + 1
            out.append(step.out)
            if step.close:
                # Anything pipelined after the closing line is deliberately ignored.
                self._buf.clear()
                return Step(b"".join(out), close=True)
        del buf[:start]
        if len(buf) > MAX_LINE:
            part = bytes(buf)
            buf.clear()
            step = self.on_overlong(part)
            out.append(step.out)
            return Step(b"".join(out), close=step.close)
        return Step(b"".join(out)) if out else _NOTHING

    def eof(self) -> Step:
        """Treat a trailing partial line as the last line, then close."""
        if not self._buf:
            return Step(close=True)
        step = self.on_line(bytes(self._buf))
        self._buf.clear()
        return Step(step.out, close=True)


def _strip_eol(line: bytes) -> bytes:
    # Accept both "\n" and "\r\n" (telnet and Windows clients send CRLF).
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line


def _greet_text(line: bytes) -> str | None:
    """The name in a greet line (end of line stripped), or None if it is not UTF-8."""
    try:
        return _strip_eol(line).decode("utf-8")
    except UnicodeDecodeError:
        return None


def greeting(line: bytes) -> Step:
    """The stream ``greet`` answer to one line.

    ``exit`` closes without a reply; non-UTF-8 input gets an error line and closes: the
    offending client is dropped (the server and its other clients carry on).
    """
    text = _greet_text(line)
    if text is None:
        return Step(NOT_UTF8, close=True)
    if text.strip() == "exit":
        return Step(close=True)
    return Step(f"Hello, {text}!\n".encode())


class GreetHandler(LineHandler):
    """``greet``: ``Welcome!``, then ``Hello, X!`` per line ``X``; ``exit`` closes this client."""

    def start(self) -> Step:
        """Send the welcome line."""
        return Step(WELCOME)

    def on_line(self, line: bytes) -> Step:
        """Answer one line (see :func:`greeting`)."""
        return greeting(line)


class UpperHandler(LineHandler):
    """``upper``: each line upper-cased, ASCII-wise on bytes, so any binary input is safe.

    Replies are per line (deterministic, unlike per-``recv``-chunk replies); a line longer than
    :data:`MAX_LINE` is answered in :data:`MAX_LINE`-sized parts instead of being buffered whole.
    """

    def on_line(self, line: bytes) -> Step:
        """``bytes.upper`` only maps a-z, so non-ASCII bytes pass through unchanged."""
        return Step(line.upper())

    def on_overlong(self, part: bytes) -> Step:
        """Flush the part so far: upper-casing is per byte, so splitting the line is harmless."""
        return Step(part.upper())


_STREAM: Final[dict[str, type[StreamHandler]]] = {
    "hello": HelloHandler,
    "greet": GreetHandler,
    "upper": UpperHandler,
    "echo": EchoHandler,
}


def stream_handler(kind: str) -> StreamHandler:
    """A fresh handler for one connection of ``kind`` (one of :data:`KINDS`)."""
    return _STREAM[kind]()


def datagram_reply(kind: str, data: bytes) -> bytes:
    """The reply to one datagram of ``kind``.

    UDP has no connection, so each datagram is answered on its own, always with exactly one
    datagram, so a client can pair requests and replies: ``hello`` answers anything, ``greet``
    answers the datagram as one line (``exit`` is just a name here: there is no session to end;
    non-UTF-8 gets the error line), ``upper`` and ``echo`` transform the whole datagram.
    """
    if kind == "hello":
        return HELLO
    if kind == "greet":
        text = _greet_text(data)
        return NOT_UTF8 if text is None else f"Hello, {text}!\n".encode()
    if kind == "upper":
        return data.upper()
    if kind == "echo":
        return data
    raise ValueError(f"unknown kind {kind!r}")
