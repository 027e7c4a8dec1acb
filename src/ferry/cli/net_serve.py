"""``ferry net serve KIND``: run one of the seed servers (thin: parse, call ferry.net.serve, print)."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

import click

from ferry.net.serve import (
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MODEL,
    DEFAULT_PORT,
    KINDS,
    MODELS,
    PROTOS,
    ServeConfig,
    Server,
)

# Choices are validated by ServeConfig (one-line UsageError, exit 2) rather than click.Choice,
# whose multi-line usage dump buries the actual problem; the metavars still list them in --help.
_KIND_HELP = "|".join(KINDS)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("kind", metavar=f"{{{_KIND_HELP}}}")
@click.option(
    "--proto",
    metavar="|".join(PROTOS),
    default=None,
    help="Transport (default tcp; unix if --path is given).",
)
@click.option(
    "--model",
    metavar="MODEL",
    default=None,
    help=f"Concurrency model: {', '.join(MODELS)} (default {DEFAULT_MODEL}).",
)
@click.option("--host", default=None, help=f"Address to bind (default {DEFAULT_HOST}).")
@click.option(
    "--port", type=int, default=None, help=f"TCP/UDP port (default {DEFAULT_PORT}; 0 picks a free one)."
)
@click.option("--path", default=None, help="Unix socket path (implies --proto unix).")
@click.option(
    "--idle-timeout",
    type=float,
    default=None,
    metavar="SECONDS",
    help=f"Close clients idle this long (default {DEFAULT_IDLE_TIMEOUT:g}).",
)
@click.option(
    "--workers", type=int, default=None, help="Worker processes for --model prefork (default: CPU count)."
)
@click.option("-v", "--verbose", is_flag=True, help="Log client errors (resets, timeouts) to stderr.")
def serve(
    kind: str,
    proto: str | None,
    model: str | None,
    host: str | None,
    port: int | None,
    path: str | None,
    idle_timeout: float | None,
    workers: int | None,
    verbose: bool,
) -> None:
    """Serve KIND until Ctrl-C or SIGTERM.

    \b
    hello  send "Hello world" and close
    greet  "Welcome!", then "Hello, X!" per line X; the line "exit" ends the session
    upper  each line upper-cased (bytes, ASCII-wise)
    echo   every byte back, streamed

    Prints one line naming the bound address once ready, e.g.
    "ferry net: greet (tcp, asyncio) listening on 127.0.0.1:9000".
    """
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.WARNING,
        format="ferry net serve: %(message)s",
    )
    config = ServeConfig.from_options(
        kind,
        proto=proto,
        model=model,
        host=host,
        port=port,
        path=path,
        idle_timeout=idle_timeout,
        workers=workers,
    )
    with Server(config) as server:
        server.bind()

        def on_signal(_signo: int, _frame: FrameType | None) -> None:
            server.request_stop()

        # Ctrl-C and SIGTERM both mean "shut down cleanly": close clients, reap children,
        # remove the unix socket, exit 0. Installed before the banner so a supervisor that
        # signals right after reading it cannot hit the default (abrupt) handlers.
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            click.echo(server.banner)
            sys.stdout.flush()
            server.serve_forever()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
