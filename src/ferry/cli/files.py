"""The file commands of the client: ``get``, ``put``, ``ls``, ``stat``, ``mkdir``, ``rm``, ``mv``, ``df``.

Each command parses its locations, opens one connection (:func:`ferry.cli.common.open_client`),
calls :class:`~ferry.client.aclient.AsyncClient` and prints through :class:`~ferry.cli.output.Output`.
Errors are :class:`~ferry.errors.FerryError` subclasses; ``ferry.cli.main`` turns them into one line
on standard error and the exit status of their class (2 usage, 3 auth, 4 not found/permission,
5 transfer, 6 connection).

Remote locations are scp-like ``[USER@]HOST:PATH`` (port from ``-P``) or
``ferry://USER@HOST:PORT/PATH``. Paths are relative to the user's home folder. They are normalised
lexically before sending (``a//b/`` -> ``a/b``, ``./a`` -> ``a``) because the server accepts only one
spelling of each path; absolute paths and ``..`` are sent as they are so that the server's refusal
(with its explanation) reaches the user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import urlsplit

import click

from ferry.cli.login_opts import login_options
from ferry.cli.output import (
    Output,
    format_time,
    human_size,
    interrupted_message,
    mode_string,
    reader_gone,
    short_size,
    transfer_record,
    transfer_summary,
)
from ferry.client.location import Location, is_remote, parse_location
from ferry.errors import (
    ConnectionBroken,
    ExitCode,
    FerryError,
    IsADirectory,
    NotFound,
    RemoteError,
    TransferError,
    UsageError,
)
from ferry.errtext import os_reason
from ferry.paths import DEFAULT_PORT
from ferry.ratelimit import parse_rate
from ferry.resident import context as resident_context
from ferry.resident import runtime
from ferry.resident.runtime import RESIDENT_COMMANDS
from ferry.resident.spawn import Spec, creds_digest, persist_seconds
from ferry.resident.spawn import start as start_resident
from ferry.textsafe import safe_name
from ferry.wire.messages import FREE_UNMETERED

if TYPE_CHECKING:
    from ferry.client.aclient import AsyncClient, Usage
    from ferry.client.auth import LoginOptions
    from ferry.hashing import HashName
    from ferry.wire.messages import Entry

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

# --- options shared by every client command --------------------------------------------------------


@dataclass(frozen=True)
class Common:
    """The connection and output options every client command takes."""

    port: int | None
    plain: bool
    password_file: str | None
    quiet: bool
    json: bool
    identities: tuple[str, ...] = ()
    token_file: str | None = None
    verbose: bool = False
    #: --no-resident: connect directly, and leave no resident process behind (docs/cli.md)
    no_resident: bool = False

    def output(self) -> Output:
        """The printing policy these options ask for (progress bars: the config file's
        ``[defaults] progress`` when set, else on a terminal)."""
        from ferry.client.config import load_config

        progress = load_config().defaults.progress
        if progress is not None:
            progress = progress and not self.quiet and not self.json
        return Output(quiet=self.quiet, json_mode=self.json, progress=progress)


def common_options(f: F, *, short_identity: bool = True) -> F:
    """Add ``-P/--port``, ``--plain``, the login options (``-i``, ``--token-file``,
    ``--password-file``, ``-v``), ``-q/--quiet``, ``--json``; pass ``common``. ``short_identity``
    False: no ``-i`` for the identity file (see :func:`~ferry.cli.login_opts.login_options`)."""

    @click.option(
        "-P",
        "--port",
        type=click.IntRange(1, 65535),
        default=None,
        help="Server port for HOST:PATH locations (default 7373; a ferry:// URL carries its own).",
    )
    @click.option("--plain", is_flag=True, help="Connect without TLS (only to a server run with --plain).")
    @click.option(
        "--password-file",
        type=click.Path(dir_okay=False),
        default=None,
        help="Read the password from the first line of FILE (else $FERRY_PASSWORD, else a prompt).",
    )
    @functools.partial(login_options, short_identity=short_identity)
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
    @click.option("--json", "json_mode", is_flag=True, help="One JSON object per result on standard output.")
    @click.option(
        "--no-resident",
        is_flag=True,
        help="Connect directly: neither use nor leave a resident connection (also FERRY_RESIDENT=0).",
    )
    @functools.wraps(f)
    def wrapper(
        *args: Any,
        port: int | None,
        plain: bool,
        password_file: str | None,
        quiet: bool,
        json_mode: bool,
        identities: tuple[str, ...],
        token_file: str | None,
        verbose: bool,
        no_resident: bool,
        **kwargs: Any,
    ) -> Any:
        common = Common(port, plain, password_file, quiet, json_mode, identities, token_file, verbose, no_resident)
        return f(*args, common=common, **kwargs)

    return wrapper  # type: ignore[return-value]


def transfer_options(f: F) -> F:
    """Add ``--hash`` and ``--no-resume``."""
    f = click.option(
        "--no-resume",
        is_flag=True,
        help="Start over instead of continuing an interrupted transfer of the same file.",
    )(f)
    f = click.option(
        "--hash",
        "hash_name",
        type=click.Choice(["blake3", "md5"]),
        default="blake3",
        show_default=True,
        help="Integrity hash (md5 only for peers or tools that need it).",
    )(f)
    return f


def speed_options(f: F) -> F:
    """Add ``-z/--compress``, ``--bwlimit RATE`` and ``--force``."""
    f = click.option(
        "--force", is_flag=True, help="With -r: send every file again, even those already there and unchanged."
    )(f)
    f = click.option("--bwlimit", metavar="RATE", help="Limit the bandwidth (bytes/s; K, M, G suffixes: 10M).")(f)
    f = click.option("-z", "--compress", is_flag=True, help="Compress file data (zstd, per chunk, where it helps).")(f)
    return f


# --- locations and paths ------------------------------------------------------------------------------


def clean_remote(path: str) -> str:
    """The canonical spelling of a remote path: no empty or ``.`` components; ``""`` is the home.

    ``..`` and a leading ``/`` are kept so the server refuses them with its own clear message.
    """
    if path.startswith("/"):
        stripped = path.rstrip("/")
        return stripped or "/"
    return "/".join(p for p in path.split("/") if p not in ("", "."))


def join_remote(base: str, name: str) -> str:
    """``base/name`` for clean remote paths (``""`` is the home)."""
    return f"{base}/{name}" if base else name


def remote_basename(path: str) -> str:
    """The last component of a clean remote path (``""`` for the home)."""
    return path.rsplit("/", 1)[-1]


def _with_port(spec: str, loc: Location, port: int | None) -> Location:
    if port is None:
        return loc
    if spec.startswith("ferry://"):
        with contextlib.suppress(ValueError):
            url_port = urlsplit(spec).port
            if url_port is not None and url_port != port:
                raise UsageError(f"{spec!r} says port {url_port} but -P says {port}; give only one")
    return dataclasses.replace(loc, port=port)


def remote_location(spec: str, port: int | None) -> Location:
    """Parse a ``[USER@]HOST:PATH`` or ``ferry://`` operand; the path is cleaned."""
    if not is_remote(spec):
        raise UsageError(
            f"{spec!r} is not a remote location; write [USER@]HOST:PATH or ferry://USER@HOST:PORT/PATH"
        )
    loc = _with_port(spec, parse_location(spec, require_path=True), port)
    return dataclasses.replace(loc, path=clean_remote(loc.path))


def number_after_colon(loc: Location, port_option: int | None) -> int | None:
    """The port the user probably meant when a location's path is a bare number (``host:7374``)
    and no port was given any other way; None otherwise."""
    path = loc.path
    if port_option is not None or loc.port != DEFAULT_PORT or not (path.isascii() and path.isdigit()):
        return None
    number = int(path)
    return number if 0 < number < 65536 else None


def port_hint(loc: Location, number: int) -> str:
    """How to write port ``number`` for ``loc``'s server (after-the-colon is always a path)."""
    user = f"{loc.user}@" if loc.user else ""
    host = f"[{loc.host}]" if ":" in loc.host else loc.host
    return f"-P {number} {user}{host}: or ferry://{user}{host}:{number}/"


def target_location(spec: str, port: int | None) -> Location:
    """Parse the server operand of commands that name a server first (df, shell, exec):
    ``[USER@]HOST``, ``[USER@]HOST:PATH`` or a URL. The rule is every location's: after the colon
    comes a path (the port is ``-P`` or the URL's); a bare number there is refused with both
    readings spelled out, since these commands once took ``HOST:PORT``."""
    if not is_remote(spec):
        spec += ":"  # a bare HOST: the home on that server
    loc = remote_location(spec, port)
    typed = parse_location(spec).path  # as written: './7374' is the way to name such a folder
    number = number_after_colon(loc, port) if typed == loc.path and not spec.startswith("ferry://") else None
    if number is not None:
        raise UsageError(
            f"{spec!r}: after the colon comes a path, not a port; for port {number} write "
            f"{port_hint(loc, number)} (a folder named {number}: {spec[: -len(loc.path)]}./{number})"
        )
    return loc


def same_server(locs: list[Location]) -> Location:
    """The common server of several operands (one connection serves them all)."""
    first = locs[0]
    for loc in locs[1:]:
        if (loc.host, loc.port, loc.user) != (first.host, first.port, first.user):
            raise UsageError("all remote operands must be on the same server and user")
    return first


def show_remote(loc: Location, path: str | None = None) -> str:
    """How a remote path appears in messages and JSON: ``host:path``."""
    host = f"[{loc.host}]" if ":" in loc.host else loc.host
    return f"{host}:{loc.path if path is None else path}"


# --- running a command ------------------------------------------------------------------------------


def local_error(exc: OSError, what: str) -> FerryError:
    """A local OSError as a FerryError: the user's mistake (2) or a failed transfer (5)."""
    message = f"{what}: {os_reason(exc)}"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST):
        return UsageError(message)
    return TransferError(message)


def run(coro: Coroutine[Any, Any, T], *, bulk: bool = True, resumable: bool = False) -> T:
    """Run a command's coroutine; local I/O errors that escaped the library become FerryErrors.

    ``resumable``: the command's work survives an interruption (a get or put of files): Ctrl-C
    then says that the same command continues it.

    ``bulk``: the command may move file data, so it runs on uvloop when present (~1.3x on big
    downloads here). Commands that only exchange a few small messages (ls, stat, mkdir, rm, mv, df)
    pass False: asyncio's own loop is already imported, and importing uvloop costs them more
    (~5 ms) than it could save.
    """
    from ferry.aio import run as aio_run

    session = resident_context.current()
    try:
        if session is not None:  # in a resident process: on its loop, where its connection lives
            return session.run(coro)
        return aio_run(coro, use_uvloop=bulk)
    except KeyboardInterrupt:
        click.echo(interrupted_message("get" if resumable else None), err=True)
        raise SystemExit(130) from None
    except BrokenPipeError:  # our reader went away (`ferry ls | head`): end quietly, as ls does
        reader_gone()  # (click would print nothing and exit 1)
        raise SystemExit(ExitCode.OK) from None
    except OSError as exc:
        raise local_error(exc, exc.filename or "local file") from exc


@contextlib.asynccontextmanager
async def connected(loc: Location, common: Common) -> AsyncIterator[AsyncClient]:
    """An authenticated client for ``loc``, closed on exit.

    When ``loc``'s path is a bare number (``ferry ls host:7374``), no port was given and nothing
    answers on the default port, the error adds how to write a port: after the colon comes a path.

    In a resident process this is the resident's connection (or :class:`~ferry.resident.context.Fallback`
    when the command wants another one). A direct connection of a command run as the program
    leaves a resident process behind when it is done (:func:`leave_resident`).
    """
    from ferry.cli.common import login_options, open_client

    session = resident_context.current()
    if session is not None:
        yield await session.client_for(
            loc,
            plain=common.plain,
            identities=common.identities,
            token_file=common.token_file,
            password_file=common.password_file,
            verbose=common.verbose,
        )
        return
    number = number_after_colon(loc, common.port)
    hint = "" if number is None else f" ({number} is a path here; for port {number} write {port_hint(loc, number)})"
    login = login_options(
        password_file=common.password_file,
        token_file=common.token_file,
        identities=common.identities,
        verbose=common.verbose,
    )
    try:
        client = await open_client(loc, plain=common.plain, verbose=common.verbose, login=login)
    except ConnectionBroken as exc:
        if not hint:
            raise
        raise ConnectionBroken(f"{exc}{hint}") from exc
    completed = False
    try:
        yield client
        completed = True
    except FerryError:  # the command failed, the login worked: a resident is still worth having
        completed = True
        raise
    finally:
        await client.close()
        if completed:
            leave_resident(loc, common, client, login)


def leave_resident(loc: Location, common: Common, client: AsyncClient, login: LoginOptions) -> None:
    """Start a resident process for ``loc`` after a direct command of the program, if the
    feature is on and none is there (see :mod:`ferry.resident.spawn`); never fails the command."""
    if not resident_context.program or resident_context.current() is not None:
        return
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.info_name not in RESIDENT_COMMANDS:
        return
    try:
        persist = persist_seconds(common.no_resident)
        if persist is not None:
            start_resident(resident_spec(loc, common, client, login, persist))
    except Exception:
        pass


def resident_spec(loc: Location, common: Common, client: AsyncClient, login: LoginOptions, persist: int) -> Spec:
    """What a resident process for ``client``'s connection needs (the credentials that worked)."""
    from ferry.cli.common import default_user

    user = loc.user or default_user()
    env = os.environ
    return Spec(
        key=runtime.key_string(runtime.client_home(env), user, loc.host, loc.port, client.plain),
        host=loc.host,
        port=loc.port,
        user=user,
        plain=client.plain,
        persist=persist,
        fingerprint=client.info.fingerprint if client.info is not None else None,
        creds=creds_digest(common.identities, common.token_file, common.password_file, env),
        password=login.password,
        token=login.token,
        identities=tuple(os.path.abspath(os.path.expanduser(os.fspath(i))) for i in login.identities),
        agent=login.agent,
        default_keys=login.default_keys,
        passphrase=login.passphrase,
    )


def run_connected(loc: Location, common: Common, action: Callable[[AsyncClient], Awaitable[None]]) -> None:
    """Run ``action`` with a client connected to ``loc`` (see :func:`run`; not resumable)."""

    async def main() -> None:
        async with connected(loc, common) as client:
            await action(client)

    run(main())


async def is_remote_dir(client: AsyncClient, path: str) -> bool | None:
    """True/False for an existing folder/non-folder, None if ``path`` does not exist."""
    if path == "":
        return True
    try:
        return (await client.stat(path)).kind == "dir"
    except NotFound:
        return None


# --- transfers ---------------------------------------------------------------------------------------


async def do_get(
    client: AsyncClient,
    out: Output,
    rpath: str,
    local: str,
    *,
    recursive: bool,
    hash_name: str,
    resume: bool,
    shown: str,
    contents: bool = False,
    force: bool = False,
    compress: bool = False,
) -> None:
    """Download ``rpath`` to ``local`` (a file or a tree with ``recursive``) and report it.

    ``local`` may be an existing folder: the download goes inside it under the remote name (as with
    ``cp``/``scp``); ``contents`` (the remote path ended in ``/``) puts a folder's contents there
    instead. A tree goes through the sync machinery (files already there and unchanged are skipped,
    partial ones resumed) unless the server is too old for it.
    """
    is_dir = await is_remote_dir(client, rpath) if recursive else False
    if is_dir:
        dest = Path(local)
        if dest.is_dir() and rpath and not contents:
            dest = dest / remote_basename(rpath)
        with out.job_progress(safe_name(remote_basename(rpath) or "home")) as (cb, on_file):
            result: Any
            if supports_sync(client):
                src = ":" + (f"{rpath}/" if rpath else "")
                result = await _sync_tree(client, out, src, dest, force, compress, cb, on_file)
            else:
                result = await client.get_tree(rpath, dest, hash=as_hash(hash_name), progress=cb)
    else:
        dest = Path(local)
        if dest.is_dir():
            dest = dest / remote_basename(rpath) if rpath else dest
        elif not dest.parent.is_dir():
            raise UsageError(f"{local}: no such local folder to download into")
        try:
            with out.progress(safe_name(remote_basename(rpath))) as cb:
                result = None
                if compress and supports_sync(client):
                    result = await _compressed(client, rpath, dest, cb, upload=False)
                if result is None:
                    result = await client.get(
                        rpath, dest, resume=resume, hash=as_hash(hash_name), progress=cb, checksum=out.json
                    )
        except IsADirectory as exc:
            raise UsageError(f"{safe_name(shown)} is a folder: use -r to download a folder") from exc
    out.result(
        transfer_summary("get", shown, str(dest), result),
        transfer_record("get", shown, str(dest), result, hash_name),
    )
    _raise_failures(result)


def supports_sync(client: AsyncClient) -> bool:
    """True if the server speaks the sync requests (re-runs skip unchanged files)."""
    from ferry.client.sync import supports_sync as supported

    return supported(client)


async def _sync_tree(
    client: AsyncClient,
    out: Output,
    src: str | Path,
    dest: str | Path,
    force: bool,
    compress: bool,
    progress: Any,
    on_file: Any,
) -> Any:
    """A get -r / put -r through the sync machinery (the contents of ``src`` into ``dest``, no
    deletions); single failures are noted as they happen, the summary counts them."""

    def report(item: Any) -> None:
        if item.error:
            out.note(f"ferry: {safe_name(item.path or '.')}: {safe_name(item.error)}")

    return await client.sync(
        src, dest, force=force, compress=compress, progress=progress, on_file=on_file, on_item=report
    )


def _raise_failures(result: Any) -> None:
    """Exit status 5 after a tree transfer in which single files failed (everything else was done)."""
    failed = getattr(result, "failed", 0)
    if failed:
        shown = "; ".join(f"{safe_name(i.path or '.')}: {safe_name(i.error)}" for i in result.items if i.error)
        raise TransferError(f"{failed} item(s) could not be transferred: {shown[:2000]}; everything else was")


async def _compressed(client: AsyncClient, src: str | Path, dst: str | Path, cb: Any, *, upload: bool) -> Any:
    """``get -z`` / ``put -z`` of one file: a delta transfer with zstd-packed chunks (an older copy
    at the destination, or an interrupted download's partial, is its basis). None if the server
    does not do delta transfers: the caller then transfers the file whole, uncompressed."""
    import time as _time

    from ferry.client.delta import delta_get, delta_put, delta_refused
    from ferry.client.transfer import TransferResult

    t0 = _time.monotonic()
    try:
        if upload:
            size = Path(src).stat().st_size
            moved = await delta_put(client.mux, Path(src), str(dst), compress=True, progress=cb)
        else:
            moved = await delta_get(client.mux, str(src), Path(dst), compress=True, progress=cb)
            size = Path(dst).stat().st_size
    except RemoteError as exc:
        if delta_refused(exc):
            return None
        raise
    # "sent": what crossed the network (packed), as for any transfer
    return TransferResult(str(dst if upload else src), size, moved.wire, 0, _time.monotonic() - t0, "")


async def do_put(
    client: AsyncClient,
    out: Output,
    sources: list[str],
    base: str,
    *,
    recursive: bool,
    hash_name: str,
    resume: bool,
    into_dir: bool,
    shown: Callable[[str], str],
    force: bool = False,
    compress: bool = False,
) -> None:
    """Upload each of ``sources`` to ``base``: into it when it is a folder, else as it.

    ``into_dir`` says the user meant a folder (several sources, or a trailing ``/``). A missing
    ``base`` is then an error, except for a single source folder, which is created as ``base``
    (as ``cp -r DIR NEW/`` does). A source folder written with a trailing ``/`` sends its contents
    into the destination instead. Trees go through the sync machinery (see :func:`do_get`).
    """
    from ferry.wire.codes import ErrorCode  # connected by now: the wire layer is loaded anyway

    target_dir = await is_remote_dir(client, base)
    if target_dir is None and into_dir and not (len(sources) == 1 and Path(sources[0]).is_dir()):
        raise ErrorCode.NOT_FOUND.error(f"{safe_name(shown(base))}: no such remote folder")
    if target_dir is False and into_dir:  # else each source would overwrite that one file in turn
        raise ErrorCode.NOT_A_DIRECTORY.error(f"{safe_name(shown(base))}: not a folder")
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise UsageError(f"{src}: no such local file or folder")
        name = os.path.basename(os.path.abspath(src))
        contents = p.is_dir() and src.endswith("/")
        dest = join_remote(base, name) if target_dir and not contents else base
        if p.is_dir():
            if not recursive:
                raise UsageError(f"{src} is a folder: use -r to upload a folder")
            with out.job_progress(safe_name(name)) as (cb, on_file):
                if supports_sync(client):
                    result: Any = await _sync_tree(
                        client, out, os.path.join(src, ""), ":" + dest, force, compress, cb, on_file
                    )
                else:
                    result = await client.put_tree(p, dest, hash=as_hash(hash_name), progress=cb)
        else:
            with out.progress(safe_name(name)) as cb:
                result = None
                if compress and supports_sync(client):
                    result = await _compressed(client, p, dest, cb, upload=True)
                if result is None:
                    result = await client.put(
                        p, dest, resume=resume, hash=as_hash(hash_name), progress=cb, checksum=out.json
                    )
        out.result(
            transfer_summary("put", src, shown(dest), result),
            transfer_record("put", src, shown(dest), result, hash_name),
        )
        _raise_failures(result)


def as_hash(name: str) -> HashName:
    """A --hash value (click.Choice has checked it) as the library's type."""
    assert name in ("blake3", "md5")
    return cast("HashName", name)


async def get_to_stdout(client: AsyncClient, out: Output, rpath: str, *, hash_name: str, shown: str) -> None:
    """``get REMOTE -``: the file to standard output; the summary (or JSON) goes to standard error."""
    from ferry.client.stdio import get_stream

    out.to_stderr = True  # standard output carries the data
    sys.stdout.flush()
    try:
        with out.progress(safe_name(remote_basename(rpath))) as cb:
            result = await get_stream(
                client.mux, rpath, sys.stdout.fileno(), hash=as_hash(hash_name), progress=cb, checksum=out.json
            )
    except IsADirectory as exc:
        raise UsageError(f"{safe_name(shown)} is a folder: standard output takes one file") from exc
    out.result(transfer_summary("get", shown, "-", result), transfer_record("get", shown, "-", result, hash_name))


async def put_from_stdin(client: AsyncClient, out: Output, rpath: str, *, hash_name: str, shown: str) -> None:
    """``put - REMOTE``: standard input, streamed until its end, as the file REMOTE."""
    from ferry.client.stdio import put_stream

    if await is_remote_dir(client, rpath):  # (the home, too: rpath "")
        raise UsageError(f"{safe_name(shown)} is a folder: standard input needs a file name, e.g. {shown}/NAME")
    with out.progress("stdin") as cb:
        result = await put_stream(
            client.mux, sys.stdin.fileno(), rpath, hash=as_hash(hash_name), progress=cb, checksum=out.json
        )
    out.result(transfer_summary("put", "-", shown, result), transfer_record("put", "-", shown, result, hash_name))


def has_magic(path: str) -> bool:
    """Whether a remote path is a glob pattern (``*``, ``?`` or ``[``), expanded by the server."""
    return any(ch in path for ch in "*?[")


async def expand_remote(client: AsyncClient, paths: list[str], shown: Callable[[str], str]) -> list[str]:
    """Remote operands with their patterns expanded on the server (in order; each pattern's
    matches sorted); a pattern that matches nothing is an error, as in scp."""
    from ferry.wire.codes import ErrorCode  # connected by now: the wire layer is loaded anyway

    out: list[str] = []
    for path in paths:
        if not has_magic(path):
            out.append(path)
            continue
        found = await client.glob(path)
        if not found:
            raise ErrorCode.NOT_FOUND.error(f"{safe_name(shown(path))}: no match")
        out.extend(e.name for e in found)
    return out


async def get_many(
    client: AsyncClient,
    out: Output,
    paths: list[str],
    local: str,
    *,
    recursive: bool,
    hash_name: str,
    resume: bool,
    shown: Callable[[str], str],
    contents: frozenset[str] = frozenset(),
    force: bool = False,
    compress: bool = False,
) -> None:
    """Download remote ``paths`` (patterns expanded on the server) to ``local``: into it when
    there are several (it must be a folder then), to standard output for ``-`` (one file).
    ``contents``: the paths given with a trailing ``/`` (a folder's contents go into ``local``)."""
    sources = await expand_remote(client, paths, shown)
    if local == "-":
        if len(sources) != 1:
            raise UsageError(f"standard output takes one file; {len(sources)} match")
        await get_to_stdout(client, out, sources[0], hash_name=hash_name, shown=shown(sources[0]))
        return
    if len(sources) > 1 and not Path(local).is_dir():
        raise UsageError(f"{local}: no such local folder (several files go into an existing folder)")
    for src in sources:
        await do_get(
            client,
            out,
            src,
            local,
            recursive=recursive,
            hash_name=hash_name,
            resume=resume,
            shown=shown(src),
            contents=src in contents,
            force=force,
            compress=compress,
        )


def split_get_operands(operands: tuple[str, ...]) -> tuple[list[str], str]:
    """``REMOTE... [LOCAL]``: the last word is LOCAL unless it is a remote location too."""
    if len(operands) > 1 and not is_remote(operands[-1]):
        return list(operands[:-1]), operands[-1]
    return list(operands), "."


@click.command(short_help="Download files (folders with -r).")
@click.argument("operands", nargs=-1, required=True, metavar="REMOTE... [LOCAL]")
@click.option("-r", "--recursive", is_flag=True, help="Download folder trees.")
@transfer_options
@speed_options
@common_options
def get(
    operands: tuple[str, ...],
    recursive: bool,
    hash_name: str,
    no_resume: bool,
    compress: bool,
    bwlimit: str | None,
    force: bool,
    common: Common,
) -> None:
    """Download REMOTE ([USER@]HOST:PATH or ferry://USER@HOST:PORT/PATH) to LOCAL (default: here).

    Several REMOTEs (on one server) and patterns ('HOST:logs/*.log', expanded by the server)
    go into LOCAL, which must then be a folder. Data is verified chunk by chunk; an interrupted
    download is continued by running the same command again (unless --no-resume). A file appears
    under its final name only when complete. LOCAL '-' writes one file to standard output
    (verified at the end; no resume). With -r, a re-run skips the files already there and
    unchanged (size and mtime); a REMOTE folder ending in '/' puts its contents into LOCAL.
    """
    remotes, local = split_get_operands(operands)
    locs = [remote_location(r, common.port) for r in remotes]
    loc = same_server(locs)
    out = common.output()
    rate = parse_rate(bwlimit)
    # A folder written with a trailing '/' means its contents (as with rsync).
    contents = frozenset(
        one.path for spec, one in zip(remotes, locs, strict=True) if parse_location(spec).path.endswith("/") and one.path
    )
    if local == "-" and recursive:
        raise UsageError("get -r writes folders, not standard output: give a local folder")

    def shown(path: str) -> str:
        return show_remote(loc, path)

    async def main() -> None:
        async with connected(loc, common) as client:
            if rate:
                client.set_bwlimit(rate)
            await get_many(
                client,
                out,
                [one.path for one in locs],
                local,
                recursive=recursive,
                hash_name=hash_name,
                resume=not no_resume,
                shown=shown,
                contents=contents,
                force=force,
                compress=compress,
            )

    run(main(), resumable=local != "-")


@click.command(short_help="Upload files (folders with -r).")
@click.argument("paths", nargs=-1, required=True, metavar="LOCAL... REMOTE")
@click.option("-r", "--recursive", is_flag=True, help="Upload folders (their whole trees).")
@transfer_options
@speed_options
@common_options
def put(
    paths: tuple[str, ...],
    recursive: bool,
    hash_name: str,
    no_resume: bool,
    compress: bool,
    bwlimit: str | None,
    force: bool,
    common: Common,
) -> None:
    """Upload LOCAL files (folders with -r) to REMOTE ([USER@]HOST:PATH or ferry://...).

    If REMOTE is an existing folder (or the home, HOST:), each LOCAL goes inside it under its own
    name. Uploads are verified, appear only when complete, and resume after an interruption.
    LOCAL '-' uploads standard input to the file REMOTE (streamed and verified; no resume).
    """
    if len(paths) < 2:
        raise UsageError("put needs at least one LOCAL and a REMOTE: ferry put FILE... [USER@]HOST:PATH")
    *sources, target = paths
    loc = remote_location(target, common.port)
    out = common.output()
    raw_path = parse_location(target).path
    rate = parse_rate(bwlimit)
    if "-" in sources:
        if len(sources) > 1 or recursive:
            raise UsageError("'-' (standard input) must be the only LOCAL, without -r")

        shown = show_remote(loc)
        run_connected(loc, common, lambda c: put_from_stdin(c, out, loc.path, hash_name=hash_name, shown=shown))
        return

    async def main() -> None:
        async with connected(loc, common) as client:
            if rate:
                client.set_bwlimit(rate)
            await do_put(
                client,
                out,
                sources,
                loc.path,
                recursive=recursive,
                hash_name=hash_name,
                resume=not no_resume,
                into_dir=len(sources) > 1 or raw_path.endswith("/"),
                shown=lambda p: show_remote(loc, p),
                force=force,
                compress=compress,
            )

    run(main(), resumable=True)


# --- listings and metadata ---------------------------------------------------------------------------


def entry_record(e: Entry, path: str | None = None) -> dict[str, Any]:
    """The JSON object of one entry."""
    rec: dict[str, Any] = {"name": e.name, "kind": e.kind, "size": e.size, "mtime": e.mtime, "mode": e.mode}
    if e.target is not None:
        rec["target"] = e.target
    if path is not None:
        rec = {"path": path, **rec}
    return rec


def entry_line(e: Entry, long: bool, width: int = 0, *, human: bool = False) -> str:
    """One line of ``ls`` output (folders end in ``/`` so they stand out without colour)."""
    name = safe_name(e.name) + ("/" if e.kind == "dir" else "")
    if not long:
        return name
    size = short_size(e.size) if human else str(e.size)
    if e.target is not None:  # as ls -l: where the link points (the server never follows it)
        name += f" -> {safe_name(e.target)}"
    return f"{mode_string(e.kind, e.mode)} {size:>{width}} {format_time(e.mtime)} {name}"


def is_hidden(name: str) -> bool:
    """Whether ``ls`` hides a (relative) name without ``-a``: it, or a folder it is in, starts with '.'."""
    return any(part.startswith(".") for part in name.split("/"))


def print_listing(
    out: Output, entries: list[Entry], long: bool, *, human: bool = False, listed: str | None = None
) -> None:
    """Print entries in ``ls`` style (or JSON lines; ``listed``: the folder, added as ``dir``)."""
    width = max((len(short_size(e.size) if human else str(e.size)) for e in entries), default=1)
    for e in entries:
        record = entry_record(e)
        if listed is not None:
            record["dir"] = listed
        out.result(entry_line(e, long, width, human=human), record)


def stat_lines(path: str, e: Entry) -> list[str]:
    """Human ``stat`` output."""
    return [
        f"  path: {safe_name(path) or '(home)'}",
        f"  kind: {e.kind}" + (f" -> {safe_name(e.target)}" if e.target is not None else ""),
        f"  size: {e.size} bytes ({human_size(e.size)})",
        f"  mode: {mode_string(e.kind, e.mode)} ({e.mode & 0o7777:04o})",
        f"  modified: {format_time(e.mtime)}",
    ]


async def list_paths(
    client: AsyncClient,
    out: Output,
    paths: list[str],
    *,
    long: bool,
    human: bool,
    all_names: bool,
    recursive: bool,
    shown: Callable[[str], str],
) -> None:
    """``ls`` of one or more remote paths, as coreutils prints them: files given by name first
    (always shown, even hidden ones), then each folder under a ``NAME:`` heading when there are
    several operands; names starting with '.' only with ``all_names``."""
    several = len(paths) > 1
    files: list[Entry] = []
    folders: list[tuple[str, list[Entry]]] = []
    for path in paths:
        entries = await client.listdir(path, recursive=recursive)
        # A folder holding only a file of its own name lists the same: ask only then.
        alone = len(entries) == 1 and entries[0].kind != "dir" and entries[0].name == remote_basename(path)
        if alone and await is_remote_dir(client, path) is False:
            files.append(entries[0])  # a file lists as itself
        else:
            folders.append((path, [e for e in entries if all_names or not is_hidden(e.name)]))
    if files:
        print_listing(out, files, long, human=human)
    for i, (path, entries) in enumerate(folders):
        if several and not out.json:
            out.result(("\n" if files or i else "") + f"{safe_name(shown(path))}:", {})
        print_listing(out, entries, long, human=human, listed=path if several else None)


@click.command(context_settings={"help_option_names": ["--help"]})  # -h is --human-readable, as in ls
@click.argument("remotes", nargs=-1, required=True, metavar="REMOTE...")
@click.option("-l", "long", is_flag=True, help="Long listing: permissions, size in bytes, time, name.")
@click.option("-h", "--human-readable", "human", is_flag=True, help="Sizes as 1.5K, 23M, 4.0G (with -l).")
@click.option("-a", "--all", "all_names", is_flag=True, help="Also list names starting with '.'.")
@click.option("-R", "--recursive", is_flag=True, help="List the whole tree (names relative to REMOTE).")
@common_options
def ls(remotes: tuple[str, ...], long: bool, human: bool, all_names: bool, recursive: bool, common: Common) -> None:
    """List remote folders (HOST: is your home). A file lists as itself.

    Names starting with '.' are hidden unless -a. With several REMOTEs (all on one server) each
    folder is listed under a heading, as ls does.
    """
    locs = [remote_location(r, common.port) for r in remotes]
    loc = same_server(locs)
    out = common.output()

    async def main() -> None:
        async with connected(loc, common) as client:
            await list_paths(
                client,
                out,
                [one.path for one in locs],
                long=long,
                human=human,
                all_names=all_names,
                recursive=recursive,
                shown=lambda p: show_remote(loc, p),
            )

    run(main(), bulk=False)


@click.command()
@click.argument("remote")
@common_options
def stat(remote: str, common: Common) -> None:
    """Show the metadata of a remote path (links are not followed)."""
    loc = remote_location(remote, common.port)
    out = common.output()

    async def main() -> None:
        async with connected(loc, common) as client:
            e = await client.stat(loc.path)
        out.result("\n".join(stat_lines(loc.path, e)), entry_record(e, loc.path))

    run(main(), bulk=False)


def _each_remote(
    remotes: tuple[str, ...],
    common: Common,
    op: str,
    action: Callable[[AsyncClient, str, str], Awaitable[None]],
) -> None:
    """Run ``action(client, path, shown)`` for each remote path (all on one server, one
    connection; ``shown``: the path as messages show it), reporting each."""
    locs = [remote_location(r, common.port) for r in remotes]
    loc = same_server(locs)
    out = common.output()

    async def main() -> None:
        async with connected(loc, common) as client:
            for one in locs:
                await action(client, one.path, show_remote(loc, one.path))
                out.result(None, {"op": op, "path": one.path, "ok": True})

    run(main(), bulk=False)


@click.command()
@click.argument("remotes", nargs=-1, required=True, metavar="REMOTE...")
@click.option("-p", "--parents", is_flag=True, help="Create missing parents; no error if it exists.")
@common_options
def mkdir(remotes: tuple[str, ...], parents: bool, common: Common) -> None:
    """Create remote folders."""
    _each_remote(remotes, common, "mkdir", lambda c, path, _shown: c.mkdir(path, parents=parents))


async def remove_path(client: AsyncClient, path: str, *, recursive: bool, shown: str) -> None:
    """Remove ``path``; as rm(1), a folder (even an empty one) only with ``recursive``."""
    from ferry.wire.codes import ErrorCode  # connected by now: the wire layer is loaded anyway

    if not recursive and await is_remote_dir(client, path):
        raise ErrorCode.IS_A_DIRECTORY.error(f"{safe_name(shown)} is a folder: use -r to remove it")
    await client.remove(path, recursive=recursive)


@click.command()
@click.argument("remotes", nargs=-1, required=True, metavar="REMOTE...")
@click.option("-r", "--recursive", is_flag=True, help="Remove folders and everything in them.")
@common_options
def rm(remotes: tuple[str, ...], recursive: bool, common: Common) -> None:
    """Remove remote files (and folders with -r, as rm does)."""
    _each_remote(
        remotes, common, "rm", lambda c, path, shown: remove_path(c, path, recursive=recursive, shown=shown)
    )


async def do_mv(client: AsyncClient, src: str, dst: str) -> str:
    """Rename ``src`` to ``dst``, or into ``dst`` if that is an existing folder; returns the new path."""
    if await is_remote_dir(client, dst):
        dst = join_remote(dst, remote_basename(src))
    await client.rename(src, dst)
    return dst


@click.command()
@click.argument("source", metavar="REMOTE_SRC")
@click.argument("dest", metavar="DST_PATH")
@common_options
def mv(source: str, dest: str, common: Common) -> None:
    """Rename or move REMOTE_SRC to DST_PATH on the same server.

    DST_PATH is a path in your home (or a location on the same server); if it is an existing folder,
    REMOTE_SRC moves into it.
    """
    loc = remote_location(source, common.port)
    if is_remote(dest):
        dloc = remote_location(dest, common.port)
        same_server([loc, dloc])
        dpath = dloc.path
    else:
        dpath = clean_remote(dest)
    out = common.output()

    async def main() -> None:
        async with connected(loc, common) as client:
            final = await do_mv(client, loc.path, dpath)
        out.result(None, {"op": "mv", "source": loc.path, "dest": final, "ok": True})

    run(main(), bulk=False)


def df_lines(
    used: int, quota: int | None, free: int, partial: int = 0, files: int = 0, max_files: int | None = None
) -> list[str]:
    """Human ``df`` output; ``partial`` is the part of ``used`` held by unfinished uploads, ``files``
    the files and folders of the home (of at most ``max_files``)."""
    left = free if quota is None else max(min(quota - used, free), 0)
    unmetered = free >= FREE_UNMETERED  # (an object store: no free space to measure)
    file_text = f"{files:,}" if max_files is None else f"{files:,} of {max_files:,}"
    return [
        f"{'used':<12}{'partial':<12}{'quota':<12}{'available':<12}{'server free':<12}files",
        f"{human_size(used):<12}{human_size(partial):<12}{human_size(quota):<12}"
        f"{human_size(None if unmetered and quota is None else left):<12}"
        f"{human_size(None if unmetered else free):<12}{file_text}",
    ]


def print_df(out: Output, u: Usage) -> None:
    """``df`` output: the table, or ``{"used", "quota", "free", "available", "partial",
    "partials", "files", "max_files"}`` (also the shell's)."""
    available = u.free if u.quota is None else max(min(u.quota - u.used, u.free), 0)
    out.result(
        "\n".join(
            line.rstrip() for line in df_lines(u.used, u.quota, u.free, u.partial, u.files, u.max_files)
        ),
        {
            "used": u.used,
            "quota": u.quota,
            "free": u.free,
            "available": available,
            "partial": u.partial,
            "partials": u.partials,
            "files": u.files,
            "max_files": u.max_files,
        },
    )


@click.command()
@click.argument("target", metavar="[USER@]HOST[:PATH]")
@common_options
def df(target: str, common: Common) -> None:
    """Show your disk usage, quota and the server's free space (the same for every PATH in
    your home, as df reports the filesystem holding a path)."""
    loc = target_location(target, common.port)
    out = common.output()

    async def main() -> None:
        async with connected(loc, common) as client:
            u = await client.df()
        print_df(out, u)

    run(main(), bulk=False)
