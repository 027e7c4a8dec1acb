"""``ferry exec``: run a command on the server (work in progress, issue 4)."""

from __future__ import annotations

import click


@click.command("exec")
def exec_() -> None:
    """Run a command on the server (work in progress)."""
    raise click.ClickException("ferry exec is not implemented yet")
