"""The ``ferry`` command line: a thin layer that parses, calls the library and prints.

Subcommands are loaded lazily (``LazyGroup``) so ``ferry exec`` does not pay for importing the
file-transfer or toolkit code: start-up time is part of what users feel.
Each command group lives in its own module under ``ferry.cli``.

A one-shot command run as the program ends with ``os._exit`` once its output is flushed: the
interpreter's teardown would only cost time (see :func:`_exit_now`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, NoReturn

import click

from ferry import __version__
from ferry.errors import ExitCode, FerryError
from ferry.resident import context as resident_context

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
    "known-hosts": "ferry.cli.known_hosts:known_hosts",
    "sync": "ferry.cli.sync_cmd:sync",
    "resident": "ferry.cli.resident_cmd:resident",
}

#: Commands that have nothing left for the interpreter's teardown when they return (connection
#: closed, files renamed or closed, worker threads joined, no atexit hooks), so main() ends them
#: with os._exit; None: no subcommand ran (--version, --help, a usage error). Not shell (it keeps a
#: client thread and readline), serve, user or net.
_ONE_SHOT = frozenset({None, "get", "put", "ls", "stat", "mkdir", "rm", "mv", "df", "exec", "sync"})


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy = dict(lazy or {})
        #: the subcommand this invocation runs (None before one is resolved, e.g. for --version)
        self.invoked: str | None = None

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self._lazy:
            module_name, attr = self._lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module_name), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        self.invoked = name
        return name, command, rest


@click.group(cls=LazyGroup, lazy=_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ferry")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """ferry: fast, verified file transfer and remote commands over plain sockets.

    Host aliases and defaults come from $FERRY_HOME/config.toml (~/.config/ferry/config.toml).
    """
    # Runs before the subcommand parses its options: the config's [defaults] become its defaults.
    ctx.default_map = _config_defaults(ctx.invoked_subcommand)


def _config_defaults(command: str | None) -> dict[str, dict[str, object]] | None:
    """click defaults from the config file's ``[defaults]`` for ``command`` (None without a file)."""
    if command is None or command in ("user", "serve", "net", "known-hosts", "resident"):
        return None
    from ferry.client.config import load_config

    defaults = load_config().defaults
    values: dict[str, object] = {}
    if defaults.hash is not None:
        values["hash_name"] = defaults.hash
    if defaults.bwlimit is not None:
        values["bwlimit"] = defaults.bwlimit
    return {command: values} if values else None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ferry`` console script: maps FerryError to a one-line message + exit code.

    Run as the program (no ``argv``: the console script, ``python -m ferry``), a one-shot command,
    ``--version``, ``--help`` or a usage error ends the process through :func:`_exit_now`. With
    ``argv`` (tests, embedding) it raises SystemExit or returns, as a library function should.
    """
    assert isinstance(cli, LazyGroup)
    cli.invoked = None
    if argv is None:
        resident_context.program = True  # (a command may leave a resident connection behind)
        _sanitise_std_fds()
    code: object = 0
    try:
        _main(argv)
    except SystemExit as exc:
        if argv is not None or cli.invoked not in _ONE_SHOT:
            raise
        code = exc.code
    if argv is None and cli.invoked in _ONE_SHOT:
        _exit_now(code)


def _sanitise_std_fds() -> None:
    """Put ``/dev/null`` on standard input, output or error if the program was started with one
    closed (``ferry get ... >&-``), as OpenSSH does. Otherwise the next socket or file opened takes
    that number: libuv aborts when it closes such a socket, and output meant for the terminal
    (a message, a progress bar) would go into the connection or the file. Python leaves
    ``sys.stdin``/``stdout``/``stderr`` None for a descriptor closed at start-up: they get a text
    stream on /dev/null, so code that asks ``sys.stderr.isatty()`` keeps working."""
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one, as we go up
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # Python found the descriptor closed at start-up
            mode = "r" if fd == 0 else "w"
            stream = open(fd, mode, encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115 (lives as long as the process)
            setattr(sys, name, stream)


def _exit_now(code: object) -> NoReturn:
    """End the process at once with ``code`` (as ``sys.exit(code)`` would), without the
    interpreter's teardown: freeing every module and object costs ~25 ms after a connecting command
    and has nothing left to do (see :data:`_ONE_SHOT`).

    What teardown would still do is flush: log handlers and standard output and error are flushed
    here. A reader that closed our standard output early (``| head``) makes that flush fail: the
    output is unwanted then, so no traceback and the command's own status (as coreutils: see
    :func:`ferry.cli.output.reader_gone`).
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints it and exits 1
        status = 1
        try:
            print(code, file=sys.stderr)
        except (OSError, ValueError):
            pass
    if "logging" in sys.modules:  # asyncio imports it; ferry's client adds no handler of its own
        import logging

        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):  # BrokenPipeError; ValueError: closed
            pass
    os._exit(status & 0xFF)


def _main(argv: list[str] | None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="ferry", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except (click.exceptions.Abort, KeyboardInterrupt):
        from ferry.cli.output import interrupted_message  # only now: start-up pays every import

        click.echo(interrupted_message(cli.invoked), err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(ExitCode.USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
    except FerryError as exc:
        from ferry.textsafe import safe_text  # a hostile server's message must not drive the terminal

        click.echo(f"ferry: {safe_text(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:  # (commands that print through ferry.cli.files.run end there already)
        from ferry.cli.output import reader_gone  # only now: every command's start-up pays imports

        reader_gone()
        sys.exit(ExitCode.OK)
