"""Shared pieces of the client commands: where the password comes from, opening a connection.

Passwords never come from the command line (they would show in ``ps`` and shell history): from
``--password-file``, the ``FERRY_PASSWORD`` environment variable, or a prompt on the terminal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ferry.client.aclient import AsyncClient
from ferry.client.location import Location
from ferry.errors import AuthError, UsageError
from ferry.errtext import os_reason


def default_user() -> str:
    """The user name when a location names none: $FERRY_USER, else the local login name."""
    if user := os.environ.get("FERRY_USER"):
        return user
    import getpass  # here: most commands name their user, and it pulls termios in

    return getpass.getuser()


def resolve_password(loc: Location, password_file: str | None) -> str:
    """The password for ``loc``: --password-file, $FERRY_PASSWORD, or an interactive prompt."""
    if password_file:
        try:
            return Path(password_file).read_text(encoding="utf-8").splitlines()[0]
        except OSError as exc:
            raise UsageError(f"cannot read a password from --password-file {password_file}: {os_reason(exc)}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"cannot read a password from --password-file {password_file}: not UTF-8 text") from exc
        except IndexError as exc:
            raise UsageError(f"--password-file {password_file} is empty: put the password on its first line") from exc
    env = os.environ.get("FERRY_PASSWORD")
    if env is not None:
        return env
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass(f"{loc.user}@{loc.address} password: ")
    raise AuthError("no password: set FERRY_PASSWORD, use --password-file FILE, or run on a terminal to be asked")


async def open_client(
    loc: Location, *, plain: bool = False, password_file: str | None = None, timeout: float = 15.0
) -> AsyncClient:
    """Connect and log in; tells the user (on stderr) when a server certificate is pinned for the first time."""
    user = loc.user or default_user()
    loc = Location(loc.host, loc.port, user, loc.path)
    return await connect_with_password(loc, resolve_password(loc, password_file), plain=plain, timeout=timeout)


async def connect_with_password(
    loc: Location, password: str, *, plain: bool = False, timeout: float = 15.0
) -> AsyncClient:
    """Connect as ``loc.user`` with ``password``; prints the pin notice on a first connection."""
    assert loc.user is not None
    client = await AsyncClient.connect(
        loc.host, loc.port, user=loc.user, password=password, plain=plain, timeout=timeout
    )
    info = client.info
    if info is not None and info.pin_status == "new":
        click.echo(
            f"ferry: first connection to {loc.address}; pinned its certificate {info.fingerprint} "
            "(compare it with the one 'ferry serve' printed)",
            err=True,
        )
    return client
