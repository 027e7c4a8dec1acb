"""``ferry serve``: run the multi-user TLS file server with zero configuration.

The first start creates the data root, a self-signed certificate and a first user, and prints that
user's password once. The banner goes to standard output and is flushed at once, because scripts and
tests start the server with ``--port 0`` and read the line ``ferry serve: listening on HOST:PORT``
to learn the port; the server's log goes to standard error (and to the log file).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ferry import paths
from ferry.cli.user import parse_size  # the user commands' parser: one spelling of sizes
from ferry.errors import UsageError

if TYPE_CHECKING:
    from ferry.server.app import Banner
    from ferry.store.config import S3Config

F = TypeVar("F", bound=Callable[..., Any])

#: Prefix of the machine-parsable banner lines (documented in docs/cli.md; tests parse them).
LISTENING = "ferry serve: listening on "
FIRST_USER = "ferry serve: created the first user "


def _client_host(host: str) -> str:
    """The host a client on this machine should use: a wildcard address is not connectable."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def path_hint(env_path: str | None = None) -> str | None:
    """How to put ``ferry`` on PATH when the command the banner suggests would not be found there
    (a checkout run through ``./scripts/serve`` or ``.venv/bin/ferry``); None when it is.

    The ``ferry`` script pip installed sits next to this interpreter (``sys.executable`` is not
    resolved: in a venv its folder is the venv's ``bin``).
    """
    bindir = Path(sys.executable).parent
    script = bindir / "ferry"
    if not script.is_file():
        return None
    found = shutil.which("ferry", path=os.environ.get("PATH", "") if env_path is None else env_path)
    if found is not None and Path(found).resolve() == script.resolve():
        return None
    folder = shlex.quote(str(bindir))
    return f"  'ferry' is not on your PATH: export PATH={folder}:\"$PATH\"  (or run {shlex.quote(str(script))})"


def banner_lines(
    banner: Banner, host: str, plain: bool, *, root_option: Path | None = None, env_path: str | None = None
) -> list[str]:
    """The text ``ferry serve`` prints once it listens.

    ``root_option``: the ``--root`` given, repeated in the hints (``ferry user`` needs the same
    root to find the accounts); with shared accounts the hints name the database instead (its URL
    without the password). ``env_path``: the PATH to check for ``ferry`` (default: ours).
    """
    port = int(banner.address.rsplit(":", 1)[1])
    chost = _client_host(host)
    scp_host = f"[{chost}]" if ":" in chost else chost
    user = banner.first_user[0] if banner.first_user else "USER"
    opts = ""
    if port != paths.DEFAULT_PORT:
        opts += f" -P {port}"
    if plain:
        opts += " --plain"
    lines = [f"{LISTENING}{banner.address}"]
    if banner.tls:
        lines.append(f"  TLS certificate: {banner.fingerprint}  (clients pin it on first connection)")
    else:
        lines.append("  TLS: OFF (--plain): passwords and data cross the network unencrypted")
    lines += [
        f"  data root:       {banner.root}",
        f"  log file:        {paths.log_file(banner.root)}",
    ]
    root_opt = "" if root_option is None else f" --root {shlex.quote(str(root_option))}"
    if banner.accounts is not None:
        lines.append(f"  accounts:        {banner.accounts}  (shared by every server given this --db)")
        root_opt = f" --db {shlex.quote(banner.accounts)}"
    if banner.first_user:
        name, password = banner.first_user
        lines += [
            f"{FIRST_USER}{name!r} with password: {password}",
            "  (shown only this once)",
            f"  change it with:  ferry user passwd {name}{root_opt}",
            f"  add users with:  ferry user add NAME{root_opt}",
        ]
    elif root_option is not None or banner.accounts is not None:
        lines.append(f"  manage users with: ferry user list{root_opt}")
    lines += [
        "  connect with:",
        f"    export FERRY_PASSWORD='...'   # the password of {user}",
        f"    ferry ls{opts} {user}@{scp_host}:",
        f"    ferry put{opts} FILE {user}@{scp_host}:",
    ]
    hint = path_hint(env_path)
    if hint is not None:
        lines.append(hint)
    lines.append("  stop with Ctrl-C (or SIGTERM)")  # the last line: readers wait for it
    return lines


def _check_scale_options(
    plain: bool, db: str | None, cert: Path | None, key: Path | None, store: str | None, endpoint: str | None
) -> S3Config | None:
    """Refuse contradictory or malformed --db / --cert / --key / --store before anything starts;
    returns the object store of --store."""

    if (cert is None) != (key is None):
        raise UsageError("--cert and --key go together: give both (the certificate and its private key)")
    if cert is not None and plain:
        raise UsageError("--cert/--key and --plain contradict each other: --plain serves without TLS")
    if db is not None:
        from ferry.server.accountdb_pg import check_url

        check_url(db)
    if store is None:
        return None
    from ferry.store.config import parse_store_url, store_config

    parse_store_url(store)  # a malformed URL first: it may be why nothing else fits
    if db is None:
        raise UsageError(
            "--store needs --db postgresql://...: the object backend keeps the namespace and the accounts "
            "in PostgreSQL"
        )
    return store_config(store, endpoint, os.environ)


def _pem_option(flag: str, help: str) -> Callable[[F], F]:
    """A PEM file that must exist (``--cert``, ``--key``)."""
    kind = click.Path(exists=True, dir_okay=False, path_type=Path)
    return click.option(flag, type=kind, default=None, metavar="FILE", help=help)


def _count_option(flag: str, default: int, help: str) -> Callable[[F], F]:
    """A server limit given as a count (``N >= 1``), its default shown in ``--help``."""
    return click.option(flag, type=click.IntRange(min=1), default=default, show_default=True, metavar="N", help=help)


def _seconds_option(flag: str, default: float, minimum: float, help: str) -> Callable[[F], F]:
    """A server limit given in seconds (at least ``minimum``), its default shown in ``--help``."""
    return click.option(
        flag, type=click.FloatRange(min=minimum), default=default, show_default=True, metavar="SECONDS", help=help
    )


class _Size(click.ParamType[int]):
    """A byte count written as ``ferry user --quota`` takes it (``64GiB``, ``500M``, ``0``)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            size = parse_size(str(value))
        except UsageError as exc:
            self.fail(str(exc), param, ctx)
        return 0 if size is None else size


SIZE = _Size()


@click.command()
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data folder (accounts, certificate, homes, logs). Default: $FERRY_ROOT or ~/.local/share/ferry.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=paths.DEFAULT_PORT,
    show_default=True,
    help="TCP port; 0 picks a free one (printed in the banner).",
)
@click.option("--plain", is_flag=True, help="No TLS (trusted networks or benchmarks only).")
@click.option(
    "--keep-partials",
    "keep_partials",
    type=click.FloatRange(min=0),
    default=7.0,
    show_default=True,
    metavar="DAYS",
    help="Delete interrupted uploads not resumed within DAYS (fractions allowed; 0 keeps them for ever).",
)
@_seconds_option(
    "--sweep-interval",
    3600.0,
    0.1,
    "How often every home is searched for interrupted uploads older than --keep-partials "
    "(the first search runs a second after start). With --store: how often the object store is swept.",
)
@_seconds_option(
    "--chunk-grace",
    3600.0,
    0.0,
    "With --store: how long a chunk no file or upload references any more is kept before the sweeper "
    "deletes it (downloads of a file removed meanwhile can finish).",
)
@_count_option(
    "--max-partials",
    64,
    "Unfinished uploads one user may hold (interrupted ones kept for a resume, and running ones); "
    "a new upload beyond it is refused until some are resumed or removed.",
)
@click.option(
    "--max-partial-bytes",
    type=SIZE,
    default="64GiB",
    show_default=True,
    metavar="SIZE",
    help="Bytes of those unfinished uploads (running ones at their full size) one user may hold; "
    "0: no limit but the user's quota.",
)
@_count_option("--max-sessions", 1000, "Logged-in sessions at once; further logins are refused as busy.")
@_count_option("--max-sessions-per-user", 100, "Logged-in sessions of one user at once.")
@_count_option(
    "--max-uploads-per-user",
    64,
    "Unfinished uploads of one user at once, over all their connections (each holds a file open); "
    "more are refused as busy.",
)
@_count_option(
    "--max-downloads-per-user",
    64,
    "Downloads of one user in progress at once, over all their connections (each holds a file "
    "open); more are refused as busy.",
)
@_seconds_option(
    "--upload-idle-timeout",
    300.0,
    0.1,
    "Close an unfinished upload that receives no data for this long (its partial is kept, so the "
    "same put resumes).",
)
@_count_option(
    "--max-pending-logins", 1024, "Connections that have not logged in yet, from all addresses together."
)
@_count_option(
    "--max-pending-logins-per-address",
    32,
    "Connections that have not logged in yet from one IPv4 address or IPv6 /64 "
    "(raise it for many users behind one NAT or proxy).",
)
@click.option(
    "--login-threads",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Password checks at once, each in a thread (argon2id keeps a core busy ~22 ms). Default: one per core.",
)
@_seconds_option("--login-timeout", 10.0, 0.1, "Time a new connection has to finish TLS and send its credentials.")
@_seconds_option(
    "--password-cache",
    600.0,
    0,
    "Remember a verified password this long (as a keyed hash in memory) so the same account's "
    "next logins skip argon2; 0 turns it off.",
)
@click.option(
    "--db",
    metavar="URL",
    envvar="FERRY_DB",
    default=None,
    help="Keep the accounts in this PostgreSQL database (postgresql://USER@HOST/DATABASE), shared by "
    "every server given the same URL; manage them with 'ferry user ... --db URL'. Default: $FERRY_DB.",
)
@_pem_option(
    "--cert",
    "Present this TLS certificate (PEM) instead of the one generated under the root: give every "
    "server behind one address the same --cert and --key, so clients pin one fingerprint.",
)
@_pem_option("--key", "The private key (PEM, unencrypted) of --cert.")
@click.option(
    "--store",
    metavar="s3://BUCKET/PREFIX",
    default=None,
    help="Keep the files in this S3 bucket (with --db; credentials from AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY); the namespace and the accounts are in --db. Every server given the same "
    "--store and --db serves the same files (docs/scale-out.md). Remote commands are not available.",
)
@click.option(
    "--s3-endpoint",
    metavar="URL",
    envvar="FERRY_S3_ENDPOINT",
    default=None,
    help="The S3 service of --store when it is not AWS (e.g. http://127.0.0.1:8333). Default: $FERRY_S3_ENDPOINT.",
)
def serve(
    root: Path | None,
    host: str,
    port: int,
    plain: bool,
    keep_partials: float,
    sweep_interval: float,
    chunk_grace: float,
    max_partials: int,
    max_partial_bytes: int,
    max_sessions: int,
    max_sessions_per_user: int,
    max_uploads_per_user: int,
    max_downloads_per_user: int,
    upload_idle_timeout: float,
    max_pending_logins: int,
    max_pending_logins_per_address: int,
    login_threads: int | None,
    login_timeout: float,
    password_cache: float,
    db: str | None,
    cert: Path | None,
    key: Path | None,
    store: str | None,
    s3_endpoint: str | None,
) -> None:
    """Run the ferry file server until Ctrl-C or SIGTERM.

    With no options it serves ~/.local/share/ferry on 127.0.0.1:7373 over TLS; on first start it
    creates a self-signed certificate and the user 'ferry', and prints its password once.
    """
    # Imported here so `ferry --help` does not load the server (argon2, sqlite, ssl).
    from ferry.server.app import ServeConfig, run
    from ferry.server.context import Limits

    store_config = _check_scale_options(plain, db, cert, key, store, s3_endpoint)
    config = ServeConfig(
        root=root if root is not None else paths.default_root(),
        host=host,
        port=port,
        plain=plain,
        limits=Limits(
            partial_max_age=keep_partials * 86400,
            sweep_interval=sweep_interval,
            chunk_grace=chunk_grace,
            max_partials=max_partials,
            max_partial_bytes=max_partial_bytes,
            max_sessions=max_sessions,
            max_sessions_per_user=max_sessions_per_user,
            max_uploads_per_user=max_uploads_per_user,
            max_downloads_per_user=max_downloads_per_user,
            upload_idle_timeout=upload_idle_timeout,
            max_pending_logins=max_pending_logins,
            max_pending_logins_per_address=max_pending_logins_per_address,
            login_timeout=login_timeout,
            password_cache=password_cache,
        ),
        db=db,
        cert=cert.absolute() if cert is not None else None,
        key=key.absolute() if key is not None else None,
        store=store_config,
    )
    if login_threads is not None:
        config.limits.auth_concurrency = login_threads

    def on_ready(banner: Banner) -> None:
        # The absolute root: the hints must work from any folder.
        shown_root = banner.root if root is not None else None
        for line in banner_lines(banner, host, plain, root_option=shown_root):
            click.echo(line)
        sys.stdout.flush()  # readers wait for the listening line; never leave it in a buffer

    run(config, on_ready)
    click.echo("ferry serve: stopped", err=True)
