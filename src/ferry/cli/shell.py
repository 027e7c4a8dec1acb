"""``ferry shell``: an interactive prompt on one connection (like ``sftp``).

Built on the standard library's :mod:`cmd` (readline gives line editing, history and tab completion
where available) and on the blocking :class:`ferry.client.blocking.Client`. The portal matters here: its
event loop keeps running in a background thread while the prompt waits for the user, so the
connection keeps answering the server's pings; a loop run only during commands would not.

The remote working folder is tracked by the client, not the server (the protocol has no "cwd"):
paths typed at the prompt are joined to it and normalised lexically, ``/`` means the home folder,
and ``..`` never goes above the home ("already at your home folder"). The server still checks every
path it receives, so this is convenience, not security.

When standard input is not a terminal the prompt is not printed and commands are read one per line,
so ``ferry shell HOST < script`` works; the exit status is that of the last failed command (0 if
none failed). ``ferry shell --pty HOST`` opens a terminal session on the server instead.
"""

from __future__ import annotations

import cmd
import contextlib
import dataclasses
import glob
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ferry.cli.files import (
    Common,
    common_options,
    do_mv,
    do_put,
    entry_record,
    get_many,
    list_paths,
    print_df,
    remove_path,
    show_remote,
    stat_lines,
    target_location,
    transfer_options,
)
from ferry.cli.output import Output, interrupted_message
from ferry.client.location import Location
from ferry.errors import ConnectionBroken, ExitCode, FerryError, HostKeyMismatch, UsageError
from ferry.errtext import os_reason
from ferry.textsafe import safe_name, safe_text

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient
    from ferry.client.auth import LoginOptions
    from ferry.client.blocking import Client

HOME_LIMIT = "already at your home folder"
_COMPLETION_TTL = 3.0  # seconds a remote folder listing is reused for tab completion


def resolve(cwd: str, path: str) -> str:
    """Join ``path`` to the remote working folder ``cwd`` and normalise it lexically.

    ``""`` is the home; a leading ``/`` starts from the home; ``.`` and empty components vanish;
    ``..`` goes up one level but never above the home (:class:`UsageError`).
    """
    parts = [] if path.startswith("/") else [p for p in cwd.split("/") if p]
    for comp in path.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise UsageError(HOME_LIMIT)
            parts.pop()
        else:
            parts.append(comp)
    return "/".join(parts)


def split_flags(args: list[str], allowed: str) -> tuple[set[str], list[str]]:
    """Separate single-letter flags (``-l``, ``-rp``) from operands; ``--`` ends the flags."""
    flags: set[str] = set()
    rest: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--":
            rest.extend(it)
            break
        if a.startswith("-") and len(a) > 1 and not rest:
            for ch in a[1:]:
                if ch not in allowed:
                    raise UsageError(f"unknown option -{ch}")
                flags.add(ch)
        else:
            rest.append(a)
    return flags, rest


def local_matches(patterns: list[str]) -> list[str]:
    """Local operands with ``~`` and patterns expanded here (as a shell would; sorted per
    pattern); a pattern that matches nothing is an error."""
    out: list[str] = []
    for pattern in patterns:
        path = os.path.expanduser(pattern)
        if not glob.has_magic(path):
            out.append(path)
            continue
        found = sorted(glob.glob(path))
        if not found:
            raise UsageError(f"{pattern}: no match here")
        out.extend(found)
    return out


def split_partial(line: str) -> tuple[list[str], str, str | None]:
    """Split a command line being typed as :func:`shlex.split` would, tolerating an unfinished end:
    (the finished words, the last word so far, the quote still open in it or None).

    Completion needs this: readline hands over only the characters after the last space or quote,
    but a name may hold spaces (``get "my fi<Tab>``, ``get my\\ fi<Tab>``).
    """
    words: list[str] = []
    word: list[str] = []
    quote: str | None = None
    started = False  # a word has begun (it may be empty so far: an opening quote)
    i = 0
    while i < len(line):
        ch = line[i]
        if quote is not None:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"' and i + 1 < len(line) and line[i + 1] in '"\\':
                i += 1
                word.append(line[i])
            else:
                word.append(ch)
        elif ch in " \t":
            if started:
                words.append("".join(word))
                word, started = [], False
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "\\" and i + 1 < len(line):
            i += 1
            word.append(line[i])
            started = True
        else:
            word.append(ch)
            started = True
        i += 1
    return words, "".join(word), quote


#: Characters that must be escaped in a word typed without quotes (as shlex.split reads it).
_ESCAPE_OUTSIDE_QUOTES = frozenset(" \t\n'\"\\")


def completion_text(word: str, quote: str | None, text: str, candidate: str) -> str | None:
    """What replaces readline's ``text`` (the characters after the last space or quote) so the
    line holds ``candidate`` in place of the unfinished ``word``: escaped as the line needs it
    (backslashes outside quotes; inside quotes as they allow). None if ``text`` is not the end of
    ``word`` (nothing sensible to insert).
    """
    typed = split_partial(text)[1]  # text as shlex reads it (a backslash-escaped character)
    if not word.endswith(typed) or not candidate.startswith(word):
        return None
    rest = candidate[len(word) - len(typed) :]
    if quote is None:
        rest = "".join("\\" + ch if ch in _ESCAPE_OUTSIDE_QUOTES else ch for ch in rest)
    elif quote == '"':
        rest = rest.replace("\\", "\\\\").replace('"', '\\"')
    elif "'" in rest:
        return None  # a single-quoted word cannot hold a single quote
    return rest  # (readline itself closes an open quote after a single match)


class FerryShell(cmd.Cmd):
    """The command interpreter. Each ``do_*`` method is one command; its docstring is its help."""

    doc_header = "Commands (help COMMAND for details):"

    def __init__(
        self,
        connect: Callable[[], Client],
        loc: Location,
        *,
        hash_name: str = "blake3",
        resume: bool = True,
        interactive: bool = True,
        out: Output | None = None,
        stdin: Any = None,
        stdout: Any = None,
    ) -> None:
        super().__init__(stdin=stdin, stdout=stdout)
        self._connect = connect
        self.client = connect()
        self.loc = loc
        self.cwd = ""
        self.hash_name = hash_name
        self.resume = resume
        self.interactive = interactive
        self.exit_code = ExitCode.OK
        #: the user left (exit, quit, Ctrl-D), rather than a fatal error ending the shell
        self.left = False
        # Reading a script: no prompt text interleaved with the output.
        self.use_rawinput = interactive
        self._cache: dict[str, tuple[float, list[tuple[str, bool]]]] = {}
        self.out = out if out is not None else Output()
        self._set_prompt()

    # --- plumbing ------------------------------------------------------------------------------

    def _set_prompt(self) -> None:
        if self.interactive:
            user = self.loc.user or ""
            self.prompt = f"ferry {safe_name(user)}@{safe_name(self.loc.host)}:/{safe_name(self.cwd)}> "
        else:
            self.prompt = ""

    def emptyline(self) -> bool:
        """An empty line does nothing (cmd's default would repeat the last command)."""
        return False

    def default(self, line: str) -> None:
        """Unknown command."""
        raise UsageError(f"unknown command {safe_name(line.split()[0])!r}; type 'help'")

    def _fail(self, exc: FerryError) -> None:
        click.echo(f"ferry: {safe_text(str(exc))}", err=True)
        self.exit_code = exc.exit_code

    def onecmd(self, line: str) -> bool:
        """Run one command; errors are reported and the shell goes on (the connection too)."""
        if line.lstrip().startswith("#"):  # a comment line (scripts)
            return False
        try:
            return self._run(line)
        except HostKeyMismatch as exc:
            self._fail(exc)
            return True
        except ConnectionBroken as exc:
            # Typically the server closed an idle session, or restarted. Reconnect and retry once:
            # every shell command is safe to repeat (transfers resume, listings are read-only).
            click.echo(f"ferry: {safe_text(str(exc))}; reconnecting", err=True)
            if not self._reconnect():
                # A script stops (its next commands would act in the wrong place); a person may
                # wait for the server and try again.
                return not self.interactive
            if not self._keep_cwd():
                return not self.interactive  # not run in another folder than it was meant for
            try:
                return self._run(line)
            except FerryError as again:
                self._fail(again)
                return isinstance(again, HostKeyMismatch) or (
                    isinstance(again, ConnectionBroken) and not self.interactive
                )
        except FerryError as exc:
            self._fail(exc)
            return False
        except KeyboardInterrupt:
            click.echo(interrupted_message(line.split()[0] if line.split() else None), err=True)
            self.exit_code = 130
            return False

    def _reconnect(self) -> bool:
        """Replace a broken connection, keeping the remote folder (or saying why it cannot)."""
        try:
            fresh = self._connect()
        except FerryError as exc:
            self._fail(exc)
            if self.interactive and not isinstance(exc, HostKeyMismatch):
                click.echo("ferry: not connected; the next command tries again (exit to leave)", err=True)
            return False  # the broken client stays: the next remote command lands here again
        old, self.client = self.client, fresh
        with contextlib.suppress(Exception):
            old.close()
        self._cache.clear()
        return True

    def _keep_cwd(self) -> bool:
        """After a reconnection: whether the remote folder is still there (the folder is the
        client's, so the new connection needs no more than that). If not, say so and go home."""
        if not self.cwd:
            return True
        try:
            kept = self.client.stat(self.cwd).kind == "dir"
        except FerryError:
            kept = False
        if kept:
            click.echo(f"ferry: reconnected; still in /{safe_name(self.cwd)}", err=True)
            return True
        click.echo(
            f"ferry: reconnected, but /{safe_name(self.cwd)} is no longer a folder on the server; "
            "back in your home folder (the command was not run)",
            err=True,
        )
        self.exit_code = ExitCode.NOT_FOUND
        self.cwd = ""
        self._set_prompt()
        return False

    def _run(self, line: str) -> bool:
        try:
            return super().onecmd(line)
        except ValueError as exc:  # shlex: unbalanced quotes
            raise UsageError(str(exc)) from exc

    def _args(self, arg: str) -> list[str]:
        return shlex.split(arg)

    def _path(self, path: str) -> str:
        return resolve(self.cwd, path)

    def _call(self, fn: Callable[[AsyncClient], Any]) -> Any:
        """Run ``fn(async_client)`` (a coroutine) on the client's loop and wait for it."""
        aclient = self.client.aclient

        async def go() -> Any:
            return await fn(aclient)

        return self.client.call(go())

    def _show(self, path: str) -> str:
        return show_remote(self.loc, path)

    # --- navigation --------------------------------------------------------------------------

    def do_cd(self, arg: str) -> None:
        """cd [PATH]: change the remote folder (no PATH: your home; '/' is your home too)."""
        args = self._args(arg)
        target = self._path(args[0]) if args else ""
        if target:
            entry = self.client.stat(target)
            if entry.kind != "dir":
                raise UsageError(f"{safe_name(target)} is not a folder")
        self.cwd = target
        self._set_prompt()

    def do_pwd(self, arg: str) -> None:
        """pwd: print the remote folder ('/' is your home)."""
        click.echo("/" + safe_name(self.cwd), file=self.stdout)

    def do_lcd(self, arg: str) -> None:
        """lcd [PATH]: change the local folder (no PATH: your local home)."""
        args = self._args(arg)
        target = os.path.expanduser(args[0] if args else "~")
        try:
            os.chdir(target)
        except OSError as exc:
            raise UsageError(f"{target}: {exc.strerror}") from exc

    def do_lpwd(self, arg: str) -> None:
        """lpwd: print the local folder."""
        click.echo(os.getcwd(), file=self.stdout)

    def do_lls(self, arg: str) -> None:
        """lls [PATH]: list a local folder."""
        args = self._args(arg)
        target = Path(os.path.expanduser(args[0] if args else "."))
        try:
            if target.is_dir():
                names = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
            else:
                target.lstat()
                names = [str(target)]
        except OSError as exc:
            raise UsageError(f"{target}: {exc.strerror}") from exc
        for n in names:
            click.echo(safe_name(n), file=self.stdout)

    # --- remote commands -----------------------------------------------------------------------

    def do_ls(self, arg: str) -> None:
        """ls [-l] [-h] [-a] [-R] [PATH...]: list remote folders (-l long, -h sizes as 1.5K,
        -a names starting with '.' too, -R the whole tree)."""
        flags, args = split_flags(self._args(arg), "lhaR")
        paths = [self._path(p) for p in args or [""]]
        self._call(
            lambda c: list_paths(
                c,
                self.out,
                paths,
                long="l" in flags,
                human="h" in flags,
                all_names="a" in flags,
                recursive="R" in flags,
                shown=lambda p: "/" + p,
            )
        )

    def do_stat(self, arg: str) -> None:
        """stat PATH: show a remote path's metadata."""
        for p in self._args(arg) or [""]:
            path = self._path(p)
            e = self.client.stat(path)
            self.out.result("\n".join(stat_lines(path, e)), entry_record(e, path))

    def do_mkdir(self, arg: str) -> None:
        """mkdir [-p] PATH...: create remote folders (-p: parents too, no error if it exists)."""
        flags, args = split_flags(self._args(arg), "p")
        if not args:
            raise UsageError("mkdir needs a PATH")
        for p in args:
            self.client.mkdir(self._path(p), parents="p" in flags)
        self._cache.clear()

    def do_rm(self, arg: str) -> None:
        """rm [-r] PATH...: remove remote files (-r: folders and everything in them)."""
        flags, args = split_flags(self._args(arg), "r")
        if not args:
            raise UsageError("rm needs a PATH")
        for p in args:
            path = self._path(p)
            if not path:
                raise UsageError("your home folder itself cannot be removed")
            self._call(lambda c: remove_path(c, path, recursive="r" in flags, shown="/" + path))  # noqa: B023 (awaited at once)
        self._cache.clear()

    def do_rmdir(self, arg: str) -> None:
        """rmdir PATH...: remove empty remote folders (as sftp; rm -r removes full ones)."""
        args = self._args(arg)
        if not args:
            raise UsageError("rmdir needs a PATH")
        for p in args:
            path = self._path(p)
            if self.client.stat(path).kind != "dir":
                raise UsageError(f"/{safe_name(path)} is not a folder")
            self.client.remove(path)
        self._cache.clear()

    def do_mv(self, arg: str) -> None:
        """mv SRC DST: rename or move (into DST if it is a folder)."""
        args = self._args(arg)
        if len(args) != 2:
            raise UsageError("mv needs SRC and DST")
        src, dst = self._path(args[0]), self._path(args[1])
        self._call(lambda c: do_mv(c, src, dst))
        self._cache.clear()

    def do_df(self, arg: str) -> None:
        """df: your disk usage, quota and the server's free space."""
        print_df(self.out, self.client.df())

    def do_ping(self, arg: str) -> None:
        """ping: round-trip time to the server."""
        click.echo(f"{self.client.ping() * 1000:.2f} ms", file=self.stdout)

    def do_get(self, arg: str) -> None:
        """get [-r] REMOTE [LOCAL]: download a file (a folder with -r) to LOCAL (default: here);
        a pattern (*.log, expanded by the server) downloads every match into the folder LOCAL."""
        flags, args = split_flags(self._args(arg), "r")
        if not 1 <= len(args) <= 2:
            raise UsageError("get needs REMOTE [LOCAL] (mget takes several)")
        self._get([args[0]], os.path.expanduser(args[1]) if len(args) == 2 else ".", "r" in flags)

    def do_mget(self, arg: str) -> None:
        """mget [-r] REMOTE...: download files (patterns expanded by the server) into the local folder."""
        flags, args = split_flags(self._args(arg), "r")
        if not args:
            raise UsageError("mget needs REMOTE...")
        self._get(args, ".", "r" in flags)

    def _get(self, remotes: list[str], local: str, recursive: bool) -> None:
        paths = [self._path(r) for r in remotes]
        self._call(
            lambda c: get_many(
                c,
                self.out,
                paths,
                local,
                recursive=recursive,
                hash_name=self.hash_name,
                resume=self.resume,
                shown=self._show,
            )
        )

    def do_put(self, arg: str) -> None:
        """put [-r] LOCAL [REMOTE]: upload a file (a folder with -r) to REMOTE (default: here);
        a pattern (*.txt) uploads every local match into the folder REMOTE."""
        flags, args = split_flags(self._args(arg), "r")
        if not 1 <= len(args) <= 2:
            raise UsageError("put needs LOCAL [REMOTE] (mput takes several)")
        sources = local_matches([args[0]])
        base = self._path(args[1]) if len(args) == 2 else self.cwd
        into_dir = len(args) == 1 or args[1].endswith("/") or len(sources) > 1
        self._put(sources, base, into_dir, "r" in flags)

    def do_mput(self, arg: str) -> None:
        """mput [-r] LOCAL...: upload files (patterns expanded here) into the remote folder."""
        flags, args = split_flags(self._args(arg), "r")
        if not args:
            raise UsageError("mput needs LOCAL...")
        self._put(local_matches(args), self.cwd, True, "r" in flags)

    def _put(self, sources: list[str], base: str, into_dir: bool, recursive: bool) -> None:
        self._call(
            lambda c: do_put(
                c,
                self.out,
                sources,
                base,
                recursive=recursive,
                hash_name=self.hash_name,
                resume=self.resume,
                into_dir=into_dir,
                shown=self._show,
            )
        )
        self._cache.clear()

    def do_shell(self, arg: str) -> None:
        """!COMMAND: run COMMAND on this machine (in the local folder); '!' alone: a local shell."""
        import subprocess

        for stream in (self.stdout, sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()  # our output so far comes before the command's
        user_shell = os.environ.get("SHELL") or "/bin/sh"
        argv = [user_shell, "-c", arg] if arg.strip() else [user_shell]
        try:
            status = subprocess.call(argv)
        except OSError as exc:
            raise UsageError(f"cannot run {user_shell}: {os_reason(exc)}") from exc
        if status != 0:
            click.echo(f"ferry: local command ended with status {status}", err=True)
            self.exit_code = ExitCode.ERROR

    def do_exit(self, arg: str) -> bool:
        """exit: leave the shell (also quit, or Ctrl-D)."""
        self.left = True
        return True

    do_quit = do_exit

    def do_EOF(self, arg: str) -> bool:
        """Ctrl-D leaves the shell."""
        if self.interactive:
            click.echo(file=self.stdout)
        self.left = True
        return True

    # --- tab completion ------------------------------------------------------------------------

    def _remote_names(self, folder: str) -> list[tuple[str, bool]]:
        """(name, is_dir) in a remote folder, cached briefly so each Tab costs at most one request."""
        now = time.monotonic()
        hit = self._cache.get(folder)
        if hit is not None and now - hit[0] < _COMPLETION_TTL:
            return hit[1]
        try:
            entries = self.client.listdir(folder)
        except FerryError:
            entries = []
        names = [(e.name, e.kind == "dir") for e in entries]
        self._cache[folder] = (now, names)
        return names

    def complete_remote(self, text: str) -> list[str]:
        """Completions of a remote path typed relative to the working folder."""
        head, sep, prefix = text.rpartition("/")
        try:
            folder = resolve("", head) if text.startswith("/") else resolve(self.cwd, head)
        except UsageError:
            return []
        lead = head + sep
        out = []
        for name, is_dir in self._remote_names(folder):
            if name.startswith(prefix) and (prefix.startswith(".") or not name.startswith(".")):
                out.append(lead + name + ("/" if is_dir else ""))
        return sorted(out)

    @staticmethod
    def complete_local(text: str) -> list[str]:
        """Completions of a local path."""
        expanded = os.path.expanduser(text)
        out = []
        for p in glob.glob(glob.escape(expanded) + "*"):
            shown = text + p[len(expanded) :]
            out.append(shown + ("/" if os.path.isdir(p) else ""))
        return sorted(out)

    def completedefault(self, text: str, line: str, begidx: int, endidx: int) -> list[str]:
        """Remote paths for every command, except local paths where a command takes one.

        Names with spaces or quotes are completed escaped (``my\\ file``), or inside the quote
        the word was started with (``"my file"``, closed after a whole name).
        """
        words, word, quote = split_partial(line[:endidx])
        if not words:
            return []
        command = words[0]
        index = len([w for w in words[1:] if not w.startswith("-")])
        local = (
            command in ("lcd", "lls", "mput")
            or (command == "put" and index == 0)
            or (command == "get" and index == 1)
        )
        names = self.complete_local(word) if local else self.complete_remote(word)
        out = [completion_text(word, quote, text, name) for name in names]
        return [c for c in out if c is not None]

    def get_names(self) -> list[str]:
        """Method names cmd uses for help and completion; EOF is a key, not a command to list."""
        return [n for n in super().get_names() if n not in ("do_EOF", "help_EOF")]


def _history_file() -> Path:
    from ferry import paths

    return paths.client_home() / "shell_history"


def _run_interactive(sh: FerryShell) -> None:
    """cmdloop with readline history, and Ctrl-C at the prompt cancelling the line (not the shell)."""
    try:
        import readline
    except ImportError:  # pragma: no cover - platforms without readline still get a prompt
        readline = None  # type: ignore[assignment]
    hist = _history_file()
    if readline is not None:
        # Path characters must not split words, so "dir/na<Tab>" completes as one path.
        readline.set_completer_delims(" \t\n\"'")
        with contextlib.suppress(OSError):
            readline.read_history_file(hist)
        readline.set_history_length(1000)
    sh.intro = (
        f"Connected to {safe_name(sh.loc.address)} as {safe_name(sh.loc.user or '')}. "
        "Type 'help' for commands, Ctrl-D to leave."
    )
    try:
        while True:
            try:
                sh.cmdloop()
                break
            except KeyboardInterrupt:  # Ctrl-C at the prompt: a new prompt, not the banner again
                click.echo("^C", file=sh.stdout)
                sh.intro = None
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                hist.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(hist)


@click.command(short_help="Interactive prompt (ls, cd, get, put, ...) on one connection.")
@click.argument("target", metavar="[USER@]HOST[:PATH]")
@click.option("--pty", is_flag=True, help="Open a terminal session on the server instead of the file prompt.")
@transfer_options
@common_options
def shell(target: str, pty: bool, hash_name: str, no_resume: bool, common: Common) -> int:
    """An interactive prompt on one connection: ls, cd, pwd, get, put, mkdir, rm, mv, stat, df,
    lcd, lls, lpwd, with history and Tab completion of remote paths.

    Commands can also be piped in, one per line: ferry shell HOST < commands.txt
    """
    from ferry.cli.common import default_user, login_options

    loc = target_location(target, common.port)
    loc = dataclasses.replace(loc, user=loc.user or default_user())
    if pty:
        return _run_pty(loc, common)
    # Made once: a password typed at the prompt is kept in it, so a reconnect (after an idle
    # timeout) does not ask again.
    login = login_options(
        password_file=common.password_file,
        token_file=common.token_file,
        identities=common.identities,
        verbose=common.verbose,
    )

    from ferry.client.blocking import Client

    def connect() -> Client:
        return Client.open(lambda: _connect(loc, login, common))

    interactive = sys.stdin.isatty()
    sh = FerryShell(
        connect, loc, hash_name=hash_name, resume=not no_resume, interactive=interactive, out=common.output()
    )
    if loc.path:
        sh.onecmd(f"cd {shlex.quote(loc.path)}")
    try:
        if interactive:
            _run_interactive(sh)
        else:
            sh.cmdloop(intro="")
    finally:
        sh.client.close()
    if interactive and sh.left:
        return ExitCode.OK  # a person who typed exit: earlier errors were shown and dealt with
    return sh.exit_code


async def _connect(loc: Location, login: LoginOptions, common: Common) -> AsyncClient:
    from ferry.cli.common import open_client

    return await open_client(loc, plain=common.plain, login=login, verbose=common.verbose)


def _run_pty(loc: Location, common: Common) -> int:
    """``--pty``: hand the connection to the terminal-session client (ferry.client.pty).

    Exit statuses are those of ``ferry exec -t`` (the same session): the remote shell's own, or
    255 when ferry itself failed (password, connection, login, a refused terminal session).
    """
    from ferry.aio import run as aio_run
    from ferry.cli.common import login_options
    from ferry.cli.exec_cmd import EXIT_FERRY
    from ferry.client.pty import run_pty_session

    async def main(login: LoginOptions) -> int:
        client = await _connect(loc, login, common)
        try:
            return await run_pty_session(client.mux, command=None)
        except NotImplementedError as exc:
            raise UsageError("terminal sessions (--pty) are not available in this version of ferry") from exc
        finally:
            await client.close()

    try:
        login = login_options(
            password_file=common.password_file,
            token_file=common.token_file,
            identities=common.identities,
            verbose=common.verbose,
        )
        return aio_run(main(login))
    except FerryError as exc:
        click.echo(f"ferry: {safe_text(str(exc))}", err=True)
        return EXIT_FERRY
