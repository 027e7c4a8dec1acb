"""``ferry net probe``: is a TCP port reachable? One line per target, exit status for scripts."""

from __future__ import annotations

import click

from ferry.errors import ExitCode


@click.command()
@click.argument("targets", nargs=-1, required=True, metavar="HOST:PORT...")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    show_default=True,
    help="Seconds to wait for each connection attempt.",
)
def probe(targets: tuple[str, ...], timeout: float) -> int:
    """Check whether TCP ports accept connections.

    Prints one line per target: open, closed (refused), timeout, or error NAME.
    Exit status: 0 if all are open, 1 if any is not, 2 for a malformed target.
    """
    # Imported here so `ferry --help` does not pay for the toolkit.
    from ferry.net.probe import Status
    from ferry.net.probe import probe as run_probe
    from ferry.net.target import parse_hostport

    # Parse every target before probing any: a typo in the last one should fail fast (exit 2)
    # instead of after a round of timeouts.
    parsed = [parse_hostport(t) for t in targets]
    results = run_probe(parsed, timeout)
    for result in results:
        click.echo(result.line())
    return ExitCode.OK if all(r.status is Status.OPEN for r in results) else ExitCode.ERROR
