"""Sans-IO handlers and config validation of ``ferry net serve``: no sockets, just bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.errors import UsageError
from ferry.net.serve import ServeConfig
from ferry.net.serve.handlers import (
    HELLO,
    MAX_LINE,
    NOT_UTF8,
    TOO_LONG,
    WELCOME,
    Step,
    datagram_reply,
    stream_handler,
)


def run(kind: str, chunks: list[bytes], eof: bool = True) -> tuple[bytes, bool]:
    """Drive a handler like a server would: (all output, whether it asked to close)."""
    h = stream_handler(kind)
    step = h.start()
    out = [step.out]
    if step.close:
        return b"".join(out), True
    for chunk in chunks:
        step = h.feed(chunk)
        out.append(step.out)
        if step.close:
            return b"".join(out), True
    if eof:
        step = h.eof()
        out.append(step.out)
        return b"".join(out), step.close
    return b"".join(out), False


def test_hello_greets_and_closes_at_once() -> None:
    assert run("hello", [b"ignored\n"]) == (HELLO, True)
    assert HELLO == b"Hello world\n"


def test_greet_lines_crlf_and_exit() -> None:
    out, closed = run("greet", [b"Ann\nBo", b"b\r\n", "Zoë\n".encode(), b"exit\nnot answered\n"])
    assert out == WELCOME + b"Hello, Ann!\nHello, Bob!\n" + "Hello, Zoë!\n".encode()
    assert closed


def test_greet_non_utf8_drops_only_after_error_line() -> None:
    out, closed = run("greet", [b"ok\n\xff\xfe\nnever\n"], eof=False)
    assert out == WELCOME + b"Hello, ok!\n" + NOT_UTF8
    assert closed


def test_greet_partial_line_at_eof_is_answered() -> None:
    assert run("greet", [b"tail"]) == (WELCOME + b"Hello, tail!\n", True)


def test_greet_overlong_line_is_refused() -> None:
    out, closed = run("greet", [b"x" * (MAX_LINE + 1)], eof=False)
    assert out == WELCOME + TOO_LONG and closed


def test_upper_is_ascii_only_and_binary_safe() -> None:
    data = bytes(range(256)) + b"\n"
    out, closed = run("upper", [data])
    assert out == data.upper() and closed
    assert out[0x80:0x100] == bytes(range(0x80, 0x100))  # non-ASCII bytes untouched


def test_upper_replies_per_line_not_per_chunk() -> None:
    h = stream_handler("upper")
    assert h.feed(b"ab") == Step()  # nothing until the newline
    assert h.feed(b"c\nd") == Step(b"ABC\n")
    assert h.eof() == Step(b"D", close=True)


def test_upper_overlong_line_is_flushed_not_buffered() -> None:
    h = stream_handler("upper")
    step = h.feed(b"a" * (MAX_LINE + 10))
    assert step == Step(b"A" * (MAX_LINE + 10))


def test_echo_returns_the_same_object() -> None:
    h = stream_handler("echo")
    data = b"\x00\xffabc"
    assert h.feed(data).out is data  # no copy: echo streams


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["greet", "upper", "echo"]),
    data=st.binary(max_size=400),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_chunk_boundaries_do_not_change_the_replies(kind: str, data: bytes, cuts: list[int]) -> None:
    # TCP may split a stream anywhere; the reply to a stream must not depend on where.
    points = sorted({c for c in cuts if c <= len(data)})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert run(kind, chunks) == run(kind, [data])


def test_datagram_replies() -> None:
    assert datagram_reply("hello", b"anything") == HELLO
    assert datagram_reply("greet", b"Ann\n") == b"Hello, Ann!\n"
    assert datagram_reply("greet", b"Ann") == b"Hello, Ann!\n"
    assert datagram_reply("greet", b"exit") == b"Hello, exit!\n"  # no session to end over UDP
    assert datagram_reply("greet", b"\xff") == NOT_UTF8
    assert datagram_reply("upper", b"a\xffb") == b"A\xffB"
    assert datagram_reply("echo", b"\x00") == b"\x00"
    with pytest.raises(ValueError):
        datagram_reply("nope", b"")


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "nope"}, "unknown kind 'nope'"),
        ({"kind": "echo", "model": "gevent"}, "unknown model 'gevent'"),
        ({"kind": "echo", "proto": "sctp"}, "unknown protocol 'sctp'"),
        ({"kind": "echo", "port": 70000}, "port 70000 is out of range"),
        ({"kind": "echo", "port": -1}, "port -1 is out of range"),
        ({"kind": "echo", "proto": "udp", "model": "thread"}, "needs connections"),
        ({"kind": "echo", "proto": "udp", "model": "fork"}, "needs connections"),
        ({"kind": "echo", "proto": "unix"}, "needs --path"),
        ({"kind": "echo", "path": "/nonexistent-ferry-dir/s.sock"}, "socket directory does not exist"),
        ({"kind": "echo", "path": "/tmp/" + "x" * 200}, "socket path too long"),
        ({"kind": "echo", "path": "/tmp/s.sock", "port": 1}, "do not apply to --proto unix"),
        ({"kind": "echo", "proto": "tcp", "path": "/tmp/s.sock"}, "--path is for --proto unix"),
        ({"kind": "echo", "idle_timeout": 0.0}, "idle timeout must be"),
        ({"kind": "echo", "idle_timeout": float("nan")}, "idle timeout must be"),
        ({"kind": "echo", "workers": 2}, "--workers applies only to --model prefork"),
        ({"kind": "echo", "model": "prefork", "workers": 0}, "workers must be between"),
    ],
)
def test_bad_options_are_one_line_usage_errors(options: dict[str, object], message: str) -> None:
    kind = options.pop("kind")
    assert isinstance(kind, str)
    with pytest.raises(UsageError, match=message) as info:
        ServeConfig.from_options(kind, **options)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_defaults_and_inference(tmp_path: Path) -> None:
    c = ServeConfig.from_options("greet")
    assert (c.proto, c.model, c.host, c.port, c.idle_timeout, c.workers) == (
        "tcp",
        "asyncio",
        "127.0.0.1",
        9000,
        300.0,
        1,
    )
    assert ServeConfig.from_options("greet", path=str(tmp_path / "s")).proto == "unix"
    assert ServeConfig.from_options("greet", model="prefork").workers >= 1
    assert ServeConfig.from_options("greet", model="prefork", workers=3).workers == 3
