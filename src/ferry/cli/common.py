"""Shared pieces of the client commands: which credentials to log in with, opening a connection.

Passwords and tokens never come from the command line (they would show in ``ps`` and shell
history): from ``--password-file`` / ``--token-file`` (refused when other users can read them),
the ``FERRY_PASSWORD`` / ``FERRY_TOKEN`` environment variables, or a prompt on the terminal. The
order the methods are tried in is :mod:`ferry.client.auth`'s (documented in docs/cli.md).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from ferry.client.aclient import AsyncClient
from ferry.client.auth import LoginOptions, read_secret_file
from ferry.client.location import Location

#: What ``--plain`` gives up, said once per connection (docs/security.md).
PLAIN_WARNING = (
    "ferry: warning: --plain: no encryption and no server certificate; passwords, tokens and data "
    "can be read and changed on the way, and a key login is not bound to this connection"
)


def default_user() -> str:
    """The user name when a location names none: $FERRY_USER, else the local login name."""
    if user := os.environ.get("FERRY_USER"):
        return user
    import getpass  # here: most commands name their user, and it pulls termios in

    return getpass.getuser()


def _prompt(prompt: str) -> str | None:
    import getpass

    try:
        return getpass.getpass(prompt)
    except EOFError:
        return None


def _password_prompt() -> Callable[[str], str | None]:
    """A password prompt that says so when the previous answer was wrong (as ssh does)."""
    asked = 0

    def ask(prompt: str) -> str | None:
        nonlocal asked
        if asked:
            click.echo("Permission denied, please try again.", err=True)
        asked += 1
        return _prompt(prompt)

    return ask


def login_options(
    *,
    password_file: str | None = None,
    token_file: str | None = None,
    identities: Sequence[str | os.PathLike[str]] = (),
    verbose: bool = False,
) -> LoginOptions:
    """The credentials a command may use, in the documented order: a token, keys (``-i``, the
    config file, ssh-agent, ~/.ssh/id_*), a password; prompts only on a terminal."""
    token = read_secret_file(token_file, "token", "--token-file") if token_file else os.environ.get("FERRY_TOKEN") or None
    password = read_secret_file(password_file, "password", "--password-file") if password_file else os.environ.get("FERRY_PASSWORD")
    tty = sys.stdin.isatty()
    return LoginOptions(
        password=password,
        token=token,
        identities=list(identities),
        agent=True,
        default_keys=True,
        ask_password=_password_prompt() if tty else None,
        ask_passphrase=_prompt if tty else None,
        notice=(lambda text: click.echo(f"ferry: {text}", err=True)) if verbose else None,
    )


async def open_client(
    loc: Location,
    *,
    plain: bool = False,
    password_file: str | None = None,
    timeout: float = 15.0,
    token_file: str | None = None,
    identities: Sequence[str | os.PathLike[str]] = (),
    verbose: bool = False,
    login: LoginOptions | None = None,
) -> AsyncClient:
    """Connect and log in; tells the user (on stderr) when a server certificate is pinned for the
    first time, warns about ``--plain``, and with ``verbose`` says how the login succeeded."""
    user = loc.user or default_user()
    loc = dataclasses.replace(loc, user=user)
    if loc.alias is not None:  # the config file's [hosts.NAME]: its keys come after -i, its plain applies
        from ferry.client.config import load_config

        alias = load_config().alias(loc.alias)
        if alias is not None:
            identities = [*identities, *alias.identity]
            plain = plain or bool(alias.plain)
            if login is not None:
                login.identities = [*login.identities, *(i for i in alias.identity if i not in login.identities)]
    if login is None:
        login = login_options(
            password_file=password_file, token_file=token_file, identities=identities, verbose=verbose
        )
    if plain:
        click.echo(PLAIN_WARNING, err=True)
    client = await AsyncClient.connect(loc.host, loc.port, user=user, login=login, plain=plain, timeout=timeout)
    info = client.info
    if info is not None and info.pin_status == "new":
        click.echo(
            f"ferry: first connection to {loc.address}; pinned its certificate {info.fingerprint} "
            "(compare it with the one 'ferry serve' printed)",
            err=True,
        )
    if verbose and info is not None:
        extra = " (read-only)" if info.read_only else ""
        click.echo(f"ferry: logged in to {loc.address} as {user} with {info.login_detail}{extra}", err=True)
    return client


def identity_paths(values: Sequence[str]) -> list[Path]:
    """``-i`` values as paths (``~`` expanded)."""
    return [Path(v).expanduser() for v in values]
