"""``ferry net fetch``: HTTP/1.1 GET or HEAD over our own socket; head to stderr, body to stdout or a file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from ferry.net.fetch import Response


@click.command()
@click.argument("url")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the body to FILE (all or nothing) instead of stdout; '-' is stdout.",
    metavar="FILE",
)
@click.option("--head", is_flag=True, help="Send HEAD instead of GET: headers only.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds allowed for connecting and for each wait for data.",
)
@click.option("--insecure", is_flag=True, help="Do not verify the server's TLS certificate.")
@click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also trust the CA certificate(s) in this PEM file.",
)
@click.option(
    "--max-redirects",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Follow at most this many redirects; one more is an error.",
)
@click.option("-q", "--quiet", is_flag=True, help="Do not print the status line and headers.")
def fetch(
    url: str,
    output: Path | None,
    head: bool,
    timeout: float,
    insecure: bool,
    cafile: Path | None,
    max_redirects: int,
    quiet: bool,
) -> None:
    """Fetch URL (http:// or https://) and write the body to stdout or FILE.

    The status line and headers of every response (redirects included) go to stderr.
    Exit status: 0 for a status below 400, 1 for HTTP >= 400, 2 for a bad URL or option,
    6 for connection, TLS, timeout and protocol errors (e.g. a truncated body).
    """
    # Imported here so `ferry --help` does not pay for h11 and ssl.
    from ferry.net.fetch import HTTPStatusError, fetch_to_file
    from ferry.net.fetch import fetch as run_fetch

    def show(response: Response) -> None:
        if not quiet:
            click.echo("\n".join([*response.head_lines(), ""]), err=True)

    method = "HEAD" if head else "GET"
    if output is not None and str(output) != "-":
        fetch_to_file(
            url,
            output,
            method=method,
            timeout=timeout,
            insecure=insecure,
            cafile=cafile,
            max_redirects=max_redirects,
            on_response=show,
        )
        return
    stdout = sys.stdout.buffer
    response = run_fetch(
        url,
        stdout,
        method=method,
        timeout=timeout,
        insecure=insecure,
        cafile=cafile,
        max_redirects=max_redirects,
        on_response=show,
    )
    stdout.flush()
    if response.status >= 400:
        # The body was still written (it often explains the error); the exit status says it failed.
        raise HTTPStatusError(response)
