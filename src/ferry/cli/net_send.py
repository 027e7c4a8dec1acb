"""``ferry net send``: a netcat-like client for TCP, UDP and Unix-socket servers."""

from __future__ import annotations

import os
import sys

import click


@click.command()
@click.argument("target")
@click.argument("messages", nargs=-1)
@click.option(
    "--proto",
    type=click.Choice(["tcp", "udp", "unix"]),
    default="tcp",
    show_default=True,
    help="Transport; for unix, TARGET is the socket's path.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds to wait for connecting and, with messages, for each reply; udp without messages: "
    "for replies after the end of stdin.",
)
def send(target: str, messages: tuple[str, ...], proto: str, timeout: float) -> None:
    """Send MESSAGES (each plus a newline) to TARGET and print the replies.

    TARGET is HOST:PORT ([::1]:PORT for IPv6) or, with --proto unix, a socket path.
    tcp/unix: after the messages the write side is closed and everything received is printed
    until the server closes. udp: one datagram per message, one reply awaited per datagram.
    Without MESSAGES, stdin is piped to the socket and the socket to stdout
    (binary-safe; at the end of stdin the write side is closed).
    Exit status: 0 on success, 2 for a malformed target, 6 for network errors and timeouts.
    """
    # Imported here so `ferry --help` does not pay for the toolkit.
    from ferry.net.send import Proto
    from ferry.net.send import send as run_send

    proto_: Proto = "udp" if proto == "udp" else "unix" if proto == "unix" else "tcp"
    # Arguments arrive as str; give the bytes the user typed back (surrogateescape keeps any
    # undecodable bytes from the command line intact).
    payloads = [os.fsencode(m) for m in messages]
    run_send(target, payloads, proto=proto_, timeout=timeout, inp=sys.stdin.buffer, out=sys.stdout.buffer)
