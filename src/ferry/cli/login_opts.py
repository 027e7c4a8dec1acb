"""The login options every client command takes: ``-i``, ``--token-file``, ``-v``.

Only click is imported here, so a command module can apply the decorator without importing the
client (``ferry exec --help`` and start-up stay fast).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def login_options(f: F, *, short_identity: bool = True) -> F:
    """Add ``-i/--identity FILE`` (repeatable), ``--token-file FILE`` and ``-v/--verbose``.

    ``short_identity`` False leaves ``-i`` to the command (``ferry sync -i`` itemizes, as rsync's
    does): the identity file is then only ``--identity``."""
    f = click.option(
        "-v", "--verbose", is_flag=True, help="Say how the login went (which key, token or password worked)."
    )(f)
    f = click.option(
        "--token-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Log in with the token in the first line of FILE (else $FERRY_TOKEN).",
    )(f)
    f = click.option(
        *(("-i", "--identity") if short_identity else ("--identity",)),
        "identities",
        metavar="FILE",
        multiple=True,
        help="Private key file to log in with (repeatable; tried before ssh-agent and ~/.ssh/id_*).",
    )(f)
    return f
