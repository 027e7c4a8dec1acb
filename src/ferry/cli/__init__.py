"""The ``ferry`` command line: a thin layer that parses, calls the library and prints.

Subcommands are loaded lazily (``LazyGroup``) so ``ferry exec`` does not pay for importing the
file-transfer or toolkit code: start-up time is part of what users feel.
Each command group lives in its own module under ``ferry.cli``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from ferry import __version__
from ferry.errors import ExitCode, FerryError

# name -> "module:attribute" of a click command; imported only when used.
_COMMANDS: dict[str, str] = {
    "user": "ferry.cli.user:user",
    "net": "ferry.cli.net:net",
    "exec": "ferry.cli.exec_cmd:exec_",
    "serve": "ferry.cli.serve:serve",
    "get": "ferry.cli.files:get",
    "put": "ferry.cli.files:put",
    "ls": "ferry.cli.files:ls",
    "stat": "ferry.cli.files:stat",
    "mkdir": "ferry.cli.files:mkdir",
    "rm": "ferry.cli.files:rm",
    "mv": "ferry.cli.files:mv",
    "df": "ferry.cli.files:df",
    "shell": "ferry.cli.shell:shell",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, lazy=_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ferry")
def cli() -> None:
    """ferry: fast, verified file transfer and remote commands over plain sockets."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ferry`` console script: maps FerryError to a one-line message + exit code."""
    try:
        rv = cli.main(args=argv, prog_name="ferry", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("ferry: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except FerryError as exc:
        from ferry.textsafe import safe_text  # a hostile server's message must not drive the terminal

        click.echo(f"ferry: {safe_text(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("ferry: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(ExitCode.ERROR)
