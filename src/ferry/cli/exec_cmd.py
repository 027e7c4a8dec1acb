"""``ferry exec TARGET -- CMD [ARGS...]``: run a command on the server, like ``ssh HOST CMD``.

Thin: parse, connect, hand the command to :func:`ferry.client.exec.attach` (or the PTY session),
exit with the remote exit status. Imports beyond click happen inside the command, so ``ferry exec
--help`` and start-up stay fast.

Exit status: the command's own (128+N when signal N killed it); 124 when ``--timeout`` ended it
(as timeout(1) does); 255 when ferry itself failed (connection, login, refusal), as ssh does, so a
script can tell a remote failure from a ferry failure.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from ferry.cli.login_opts import login_options

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient
    from ferry.client.location import Location

#: Exit status when ``--timeout`` ended the command (as timeout(1)).
EXIT_TIMEOUT = 124
#: Exit status when ferry itself failed (as ssh).
EXIT_FERRY = 255
#: The status of a command killed by SIGXFSZ (a file reached the size limit the server set).
EXIT_FILE_SIZE = 128 + signal.SIGXFSZ


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{pair!r}: write NAME=VALUE", param_hint="-e/--env")
        env[name] = value
    return env


# Options may come before or after TARGET; everything after "--" is the command, so its own
# options (ls -l) are never taken for ours.
class _ExecCommand(click.Command):
    """Adds the likely fix to "no such option" errors: the command's own options belong after --."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            raise click.NoSuchOption(
                exc.option_name,
                f"{exc.message.rstrip('.')}; put the remote command after --, e.g. ferry exec HOST -- ls -l",
                ctx=ctx,
            ) from None


@click.command("exec", cls=_ExecCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", metavar="[USER@]HOST[:DIR]")
@click.argument("command", nargs=-1, metavar="-- CMD [ARGS]...")
@click.option("-P", "--port", type=click.IntRange(1, 65535), default=None, help="Server port (default 7373).")
@click.option("--plain", is_flag=True, help="Connect without TLS (only to a server run with --plain).")
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Read the password from the first line of FILE (else $FERRY_PASSWORD, else a prompt).",
)
@click.option(
    "-e",
    "--env",
    "env_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a variable for the command (repeatable); the server allows LANG, LC_*, TZ, TERM, "
    "COLUMNS, LINES and FERRY_*.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="S",
    help=f"Kill the command after S seconds (SIGTERM, SIGKILL 2 s later); exit status {EXIT_TIMEOUT}.",
)
@click.option("-t", "--tty", "use_tty", is_flag=True, help="Run under a terminal (interactive programs).")
@click.option(
    "--cwd", default="", metavar="DIR", help="Working folder, relative to the home (default: home)."
)
@click.option("-n", "--no-stdin", is_flag=True, help="Do not forward standard input (the command reads EOF).")
@login_options
def exec_(
    target: str,
    command: tuple[str, ...],
    port: int | None,
    plain: bool,
    password_file: str | None,
    env_pairs: tuple[str, ...],
    timeout: float | None,
    use_tty: bool,
    cwd: str,
    no_stdin: bool,
    identities: tuple[str, ...],
    token_file: str | None,
    verbose: bool,
) -> int:
    """Run a command on the server and exit with its exit status.

    One CMD string runs through /bin/sh -c on the server (pipes, $VARS, globs work, like ssh); several
    words run as that argv without a shell. The command starts in your home folder (or --cwd) with a
    minimal environment. Ctrl-C is forwarded as SIGINT (the third one gives up and disconnects,
    which kills the command). With -t and no CMD: an interactive shell.

    \b
    Examples:
      ferry exec ann@host -- 'du -sh * | sort -h'
      ferry exec ann@host -- ls -l 'my file'
      tar cf - dir | ferry exec ann@host -- tar xf - -C backup
      ferry exec -t ann@host -- top
    """
    from ferry.aio import run as aio_run
    from ferry.cli.files import clean_remote, target_location
    from ferry.client.exec import Interrupted
    from ferry.errors import FerryError

    try:
        env = _parse_env(env_pairs)
        loc = target_location(target, port)  # a path after the colon is the working folder
        if loc.path:
            if cwd and clean_remote(cwd) != loc.path:
                raise click.UsageError(f"{target!r} and --cwd {cwd!r} name two working folders; give one")
            cwd = loc.path
        if not command and not use_tty:
            raise click.UsageError("no command given (with -t and no command you get a shell)")
        cmd: str | list[str] | None = (
            None if not command else command[0] if len(command) == 1 else list(command)
        )
        # uvloop when installed: its TLS costs about half the CPU per byte of asyncio's.
        login = {"password_file": password_file, "token_file": token_file, "identities": identities, "verbose": verbose}
        return aio_run(_main(loc, cmd, plain, login, env, timeout, use_tty, cwd, no_stdin))
    except Interrupted as exc:
        click.echo(f"ferry: {exc}", err=True)
        return exc.exit_code
    except FerryError as exc:
        from ferry.textsafe import safe_text  # the message may come from a hostile server

        click.echo(f"ferry: {safe_text(str(exc))}", err=True)
        return EXIT_FERRY


async def _main(
    loc: Location,
    cmd: str | list[str] | None,
    plain: bool,
    login: dict[str, Any],
    env: dict[str, str],
    timeout: float | None,
    use_tty: bool,
    cwd: str,
    no_stdin: bool,
) -> int:
    from ferry.cli.common import open_client

    client = await open_client(loc, plain=plain, **login)
    try:
        return await _run(client, cmd, env, timeout, use_tty, cwd, no_stdin)
    finally:
        await client.close()


async def _run(
    client: AsyncClient,
    cmd: str | list[str] | None,
    env: dict[str, str],
    timeout: float | None,
    use_tty: bool,
    cwd: str,
    no_stdin: bool,
) -> int:
    if use_tty:
        from ferry.client.pty import pty_session

        proc = await pty_session(client.mux, cmd, env=env, cwd=cwd, timeout=timeout)
        code = proc.exit_code
        assert code is not None
    else:
        from ferry.client.exec import attach

        proc = await client.start(cmd, env=env, cwd=cwd, timeout=timeout)
        try:
            code = await attach(proc, stdin=not no_stdin)
        finally:
            await proc.close()
    if proc.timed_out:
        click.echo(f"ferry: the command timed out after {timeout:g} s and was killed", err=True)
        return EXIT_TIMEOUT
    if code == EXIT_FILE_SIZE:  # otherwise silent (no shell reports it): say what the limit is
        click.echo(
            f"ferry: the command stopped with status {code} (SIGXFSZ): a file it wrote reached the file "
            "size limit; for a user with a quota the server limits each file a command writes to what "
            "was left of the quota when it started",
            err=True,
        )
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(exec_())
