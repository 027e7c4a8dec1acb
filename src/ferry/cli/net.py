"""``ferry net``: the socket toolkit (the seed systems as small, correct tools)."""

from __future__ import annotations

import click

from ferry.cli import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy={
        "serve": "ferry.cli.net_serve:serve",
        "send": "ferry.cli.net_send:send",
        "fetch": "ferry.cli.net_fetch:fetch",
        "probe": "ferry.cli.net_probe:probe",
    },
)
def net() -> None:
    """The socket toolkit: toy servers, a netcat-like client, a raw HTTP fetch, a port probe."""
