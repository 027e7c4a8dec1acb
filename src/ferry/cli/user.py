"""``ferry user``: manage the accounts of a ferry server (add, del, passwd, mod, list, key, token).

Works directly on the server's data root (``--root``, default ``$FERRY_ROOT`` or
``~/.local/share/ferry``), or with ``--db postgresql://...`` (default ``$FERRY_DB``) on the accounts
that several servers share, also while the servers run: changes apply at the next login.

Only ``add`` may create a data root or the accounts in a database (and says so): every other
command refuses a root or a database that holds no accounts, instead of quietly starting an empty
one beside the real one and answering "no such user". Every message names the root or database it
used, so a wrong one is seen at once.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from ferry import paths
from ferry.errors import AccountError, NoSuchUser, UsageError, UserExists

if TYPE_CHECKING:
    # Typing only: at run time the accounts module (argon2, sqlite3) is imported by the commands
    # that need it, so `ferry --help` stays fast.
    from ferry.server.accounts import Accounts, User

F = TypeVar("F", bound=Callable[..., Any])

#: What --exec means for the quota (the help of user add and user mod).
_EXEC_QUOTA = (
    " Programs run with the server's rights and their writes are not counted against --quota or "
    "--max-files; with a quota, each file a program writes is limited to what is left of the quota "
    "when it starts (RLIMIT_FSIZE: per file, not in total; see docs/exec.md)."
)


# --- sizes ---------------------------------------------------------------------------------------

# GNU coreutils conventions: a bare letter or an "iB" suffix is binary (K = KiB = 1024), "kB"/"KB"
# etc. is decimal (1000). Case-insensitive, with or without a space, with a fraction ("1.5G").
def _units() -> dict[str, int]:
    units = {"": 1, "b": 1, "byte": 1, "bytes": 1}
    for power, letter in enumerate("kmgtpe", start=1):
        units[letter] = units[letter + "i"] = units[letter + "ib"] = 1024**power
        units[letter + "b"] = 1000**power
    return units


_UNITS: Final = _units()
_SIZE_RE: Final = re.compile(r"\s*(\d[\d_]*(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_UNLIMITED: Final = frozenset({"none", "unlimited", "off"})


def parse_size(text: str) -> int | None:
    """Parse a quota: ``"10G"``, ``"500 MB"``, ``"1.5GiB"``, ``"1048576"``; ``"none"`` -> ``None``.

    K/M/G/T/P/E, Ki..Ei and KiB..EiB are powers of 1024; kB/MB/GB/... are powers of 1000 (as in
    GNU ``du``/``df``). Fractions are allowed and rounded down to whole bytes.
    """
    if text.strip().lower() in _UNLIMITED:
        return None
    match = _SIZE_RE.fullmatch(text)
    factor = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or factor is None:
        raise UsageError(
            f"invalid size {text!r}: use a number with an optional unit, "
            "e.g. 500M, 10G, 1.5GiB, 2TB, 1048576, or 'none' for unlimited"
        )
    try:
        return int(Decimal(match.group(1).replace("_", "")) * factor)
    except InvalidOperation:  # pragma: no cover - the regex only lets numbers through
        raise UsageError(f"invalid size {text!r}") from None


def format_size(size: int | None) -> str:
    """A human-readable size in binary units (``None`` -> ``"unlimited"``)."""
    if size is None:
        return "unlimited"
    for unit, factor in (("EiB", 1024**6), ("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3),
                         ("MiB", 1024**2), ("KiB", 1024)):  # fmt: skip
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if size % factor == 0 else f"{value:.1f} {unit}"
    return f"{size} B"


# --- shared helpers ------------------------------------------------------------------------------

_root_option = click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Server data root (default: $FERRY_ROOT, else $XDG_DATA_HOME/ferry, else ~/.local/share/ferry).",
)
_db_option = click.option(
    "--db",
    metavar="URL",
    envvar="FERRY_DB",
    default=None,
    help="The accounts several servers share, in PostgreSQL (postgresql://USER@HOST/DATABASE, as given "
    "to 'ferry serve --db'), instead of a root's users.db. Default: $FERRY_DB.",
)


def _where_options(f: F) -> F:
    """``--root DIR`` and ``--db URL``: where the accounts are (see :func:`_place`)."""
    return _root_option(_db_option(f))


_password_stdin_option = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password as one line from standard input instead of prompting.",
)


def _root(root: Path | None) -> Path:
    """The data root a command works on: ``--root``, else the default (``$FERRY_ROOT``, ...)."""
    return (root if root is not None else paths.default_root()).absolute()


@dataclass(frozen=True)
class Place:
    """Where a command finds the accounts: a data root, or a shared database (``db``)."""

    root: Path
    root_given: bool
    db: str | None = None

    def __str__(self) -> str:
        """The root, or the database URL without its password (for messages)."""
        if self.db is None:
            return str(self.root)
        from ferry.server.accountdb_pg import redact_url

        return redact_url(self.db)

    @property
    def kind(self) -> str:
        """How messages name it: ``data root`` or ``accounts database``."""
        return "data root" if self.db is None else "accounts database"


def _place(root: Path | None, db: str | None) -> Place:
    """Where the accounts are: ``--db`` (or ``$FERRY_DB``), else the data root."""
    if db is not None:
        from ferry.server.accountdb_pg import check_url  # stdlib only; psycopg comes with the accounts

        if root is not None:
            raise UsageError(
                "give either --root (a server's own accounts) or --db (accounts shared by servers), not both"
                + (" ($FERRY_DB is set)" if os.environ.get("FERRY_DB") == db else "")
            )
        return Place(_root(None), False, check_url(db))
    return Place(_root(root), root is not None)


def _has_accounts(place: Place) -> bool:
    if place.db is None:
        return paths.users_db(place.root).is_file()
    from ferry.server.accountdb import NoAccounts
    from ferry.server.accounts import Accounts

    try:
        Accounts(None, db=place.db, create=False).close()
    except NoAccounts:
        return False
    return True


def _open(place: Place) -> Accounts:
    """The accounts of an existing data root or database; never creates them (see the module docstring)."""
    # Imported here: `ferry --help` should not pay for argon2 and sqlite3.
    from ferry.server.accountdb import NoAccounts
    from ferry.server.accounts import Accounts

    if place.db is not None:
        try:
            return Accounts(None, db=place.db, create=False)
        except NoAccounts:
            raise UsageError(
                f"no ferry accounts in the database {place}: give the URL the servers use ('ferry serve "
                "--db URL' prints it as 'accounts'), or create them with 'ferry user add NAME --db URL'"
            ) from None
    if not _has_accounts(place):
        origin = "--root" if place.root_given else "the default data root"
        raise UsageError(
            f"no ferry data root at {place} ({origin}; it holds no users.db): give the server's "
            "root with --root DIR or $FERRY_ROOT ('ferry serve' prints it as 'data root')"
        )
    return Accounts(place.root)


@contextlib.contextmanager
def _naming(place: Place) -> Iterator[None]:
    """Account errors ("no such user", "already exists") say which root or database they came from."""
    try:
        yield
    except AccountError as exc:
        raise type(exc)(f"{exc} ({place.kind} {place})") from exc


def _read_password(name: str, from_stdin: bool) -> str:
    if from_stdin:
        # Strip only the line ending: leading/trailing spaces may be part of the password.
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UsageError("no password on standard input (expected one non-empty line)")
        return password
    try:
        # Without a terminal getpass warns (GetPassWarning, a traceback-like text) and then reads
        # standard input with echo: refuse in one line instead.
        with warnings.catch_warnings():
            warnings.simplefilter("error", getpass.GetPassWarning)
            first = getpass.getpass(f"New password for {name}: ")
            second = getpass.getpass("Repeat the password: ")
    except getpass.GetPassWarning:
        raise UsageError(
            f"no terminal to ask for the password of {name}: pipe it in with --password-stdin"
        ) from None
    except EOFError:
        raise UsageError("no password given (use --password-stdin to pipe one in)") from None
    if first != second:
        raise UsageError("the passwords do not match; nothing was changed")
    if not first:
        raise UsageError("the password must not be empty")
    return first


def _home_text(user: User, place: Place) -> str:
    if place.db is not None:
        return f"home homes/{user.name} under each server's root (made at the first login there)"
    return f"home {user.home}"


def _describe(user: User, place: Place) -> str:
    if not user.exec_allowed:
        exec_text = "no"
    elif user.exec_allow is None:
        exec_text = "any program"
    else:
        exec_text = ", ".join(user.exec_allow) or "(none)"
    disabled = " (disabled: cannot log in)" if user.disabled else ""
    return (
        f"{_home_text(user, place)}, quota {format_size(user.quota)}, files {format_count(user.max_files)}, "
        f"exec {exec_text}{disabled}"
    )


def format_count(count: int | None) -> str:
    """A file limit for people (``None`` -> ``"unlimited"``)."""
    return "unlimited" if count is None else f"{count:,}"


def parse_count(text: str) -> int | None:
    """Parse a file limit: a whole number (``20000``, ``20_000``), or ``none`` -> ``None``."""
    if text.strip().lower() in _UNLIMITED:
        return None
    cleaned = text.strip().replace("_", "").replace(",", "")
    if not cleaned.isdigit():
        raise UsageError(f"invalid number of files {text!r}: use a whole number such as 20000, or 'none' for unlimited")
    return int(cleaned)


def _user_json(user: User) -> dict[str, Any]:
    return {
        "name": user.name,
        "home": str(user.home),
        "quota": user.quota,
        "max_files": user.max_files,
        "exec_allowed": user.exec_allowed,
        "exec_allow": None if user.exec_allow is None else list(user.exec_allow),
        "disabled": user.disabled,
    }


def _require_user(accounts: Accounts, name: str) -> None:
    """Fail before prompting for a password, rather than after."""
    from ferry.server.accounts import validate_name

    validate_name(name)
    if accounts.get(name) is None:
        raise NoSuchUser(f"no such user: {name!r}")


# --- commands ------------------------------------------------------------------------------------


def _lazy_group() -> type[click.Group]:
    from ferry.cli import LazyGroup  # the package is imported anyway: this command runs under it

    return LazyGroup


@click.group(
    cls=_lazy_group(),
    lazy={"key": "ferry.cli.user_creds:key", "token": "ferry.cli.user_creds:token"},
)
def user() -> None:
    """Manage the accounts of a ferry server (works while the server runs)."""


@user.command("add")
@click.argument("name")
@_where_options
@_password_stdin_option
@click.option(
    "--quota", metavar="SIZE", help="Storage quota, e.g. 500M, 10G, 1.5GiB, 2TB (default: unlimited)."
)
@click.option(
    "--max-files",
    metavar="N",
    help="Most files and folders the home may hold, like an inode quota (default: unlimited).",
)
@click.option(
    "--exec/--no-exec", "exec_", default=None, help="May the user run programs? (default: no)." + _EXEC_QUOTA
)
@click.option(
    "--allow",
    "allow",
    metavar="PROG",
    multiple=True,
    help="Only allow this program (repeatable); implies --exec.",
)
def add_cmd(
    name: str,
    root: Path | None,
    db: str | None,
    password_stdin: bool,
    quota: str | None,
    max_files: str | None,
    exec_: bool | None,
    allow: tuple[str, ...],
) -> None:
    """Create user NAME with a home folder under the root.

    With --db, the servers sharing the database each make the home under their own root at the
    user's first login there.
    """
    from ferry.server.accounts import Accounts, validate_name

    validate_name(name)
    quota_bytes = parse_size(quota) if quota is not None else None
    files_limit = parse_count(max_files) if max_files is not None else None
    place = _place(root, db)
    new_root = not _has_accounts(place)
    if not new_root:  # fail before asking for a password, rather than after
        with _open(place) as accounts:
            if accounts.get(name) is not None:
                raise UserExists(f"user {name!r} already exists ({place.kind} {place})")
    home_existed = place.db is None and paths.home_dir(place.root, name).exists()
    password = _read_password(name, password_stdin)  # before creating anything: it may fail
    # The one command that may create a root, or the accounts in a database.
    opened = Accounts(place.root, db=None) if place.db is None else Accounts(None, db=place.db)
    with opened as accounts, _naming(place):
        created = accounts.add(
            name,
            password,
            quota=quota_bytes,
            max_files=files_limit,
            # Naming allowed programs without --exec would otherwise create a user who can run nothing.
            exec_allowed=exec_ if exec_ is not None else bool(allow),
            exec_allow=allow or None,
        )
    if new_root and place.db is not None:
        click.echo(f"created the ferry accounts in the database {place} (serve them with 'ferry serve --db URL')")
    elif new_root:
        serve = "ferry serve" if root is None else f"ferry serve --root {place}"
        click.echo(f"created the data root {place} (serve it with '{serve}')")
    click.echo(f"created user {created.name} in {place}: {_describe(created, place)}")
    if home_existed:
        click.echo(f"note: the existing folder {created.home} was kept and is now {created.name}'s home")


@user.command("del")
@click.argument("name")
@_where_options
@click.option(
    "--remove-home",
    is_flag=True,
    help="Also delete the user's home folder and all files in it. With --db: the user's files on the "
    "object backend (servers with --store); homes under each server's own root are not reached from here.",
)
def del_cmd(name: str, root: Path | None, db: str | None, remove_home: bool) -> None:
    """Delete user NAME (its home folder is kept unless --remove-home)."""
    place = _place(root, db)
    if place.db is not None and remove_home:
        _del_shared(place, name)
        return
    with _open(place) as accounts, _naming(place):
        home = accounts.home_of(name)
        accounts.delete(name, remove_home=remove_home)
    if remove_home:
        click.echo(f"deleted user {name} and its home folder from {place}")
    elif place.db is not None:
        click.echo(f"deleted user {name} from {place} (servers keep its home folder, homes/{name} under their root)")
    else:
        click.echo(f"deleted user {name} from {place} (home folder kept: {home})")


def _del_shared(place: Place, name: str) -> None:
    """``del --remove-home --db``: the account, then its files on the object backend (the namespace
    shares the accounts' database). Refused, deleting nothing, when the database holds no namespace:
    the servers then keep homes under their own roots, out of this command's reach."""
    import asyncio

    # The object backend's driver (the 'scale' extra): only this command needs it.
    from ferry.store.namespace import empty_home_in, holds_namespace

    assert place.db is not None
    if not asyncio.run(holds_namespace(place.db)):
        raise UsageError(
            "with shared accounts (--db) each server keeps the homes under its own root: the user "
            f"was not deleted; delete it without --remove-home, then remove homes/{name} on each server"
        )
    with _open(place) as accounts, _naming(place):
        # The account first: its sessions end (revocation) and nothing new is written meanwhile.
        accounts.delete(name)
    files, freed = asyncio.run(empty_home_in(place.db, name))
    click.echo(
        f"deleted user {name} from {place} and its {files} files ({freed} bytes) from the object store "
        "(their space comes back at the next sweep after --chunk-grace)"
    )


@user.command("passwd")
@click.argument("name")
@_where_options
@_password_stdin_option
def passwd_cmd(name: str, root: Path | None, db: str | None, password_stdin: bool) -> None:
    """Set a new password for user NAME."""
    place = _place(root, db)
    with _open(place) as accounts, _naming(place):
        _require_user(accounts, name)
        accounts.set_password(name, _read_password(name, password_stdin))
    click.echo(f"password of {name} changed in {place}")


@user.command("mod")
@click.argument("name")
@_where_options
@click.option("--quota", metavar="SIZE|none", help="New quota (e.g. 10G), or 'none' for unlimited.")
@click.option(
    "--max-files",
    metavar="N|none",
    help="Most files and folders the home may hold (e.g. 100000), or 'none' for unlimited.",
)
@click.option("--exec/--no-exec", "exec_", default=None, help="Allow or forbid running programs." + _EXEC_QUOTA)
@click.option(
    "--allow",
    "allow",
    metavar="PROG",
    multiple=True,
    help="Replace the allowed programs (repeatable); implies --exec.",
)
@click.option("--allow-any", is_flag=True, help="Allow any program (clears the list); implies --exec.")
@click.option(
    "--disable/--enable",
    "disable",
    default=None,
    help="Lock the account (no login; its open sessions end within seconds) or unlock it.",
)
def mod_cmd(
    name: str,
    root: Path | None,
    db: str | None,
    quota: str | None,
    max_files: str | None,
    exec_: bool | None,
    allow: tuple[str, ...],
    allow_any: bool,
    disable: bool | None,
) -> None:
    """Change the quota, file limit, program permissions or lock of user NAME.

    Takes effect on a running server within seconds: sessions of a disabled user end, and
    sessions that may run programs end when those rights are reduced.
    """
    from ferry.server.accounts import UNCHANGED

    if allow and allow_any:
        raise UsageError("--allow and --allow-any cannot be combined")
    if quota is None and max_files is None and exec_ is None and not allow and not allow_any and disable is None:
        raise UsageError(
            "nothing to change: give --quota, --max-files, --exec/--no-exec, --allow, --allow-any or "
            "--disable/--enable"
        )
    quota_bytes = parse_size(quota) if quota is not None else UNCHANGED
    files_limit = parse_count(max_files) if max_files is not None else UNCHANGED
    exec_allow = allow if allow else (None if allow_any else UNCHANGED)
    # Naming programs implies --exec (unless --no-exec is given), as in `add`.
    exec_allowed = exec_ if exec_ is not None else (True if (allow or allow_any) else UNCHANGED)
    place = _place(root, db)
    with _open(place) as accounts, _naming(place):
        changed = accounts.modify(
            name,
            quota=quota_bytes,
            max_files=files_limit,
            exec_allowed=exec_allowed,
            exec_allow=exec_allow,
            disabled=UNCHANGED if disable is None else disable,
        )
    click.echo(f"user {changed.name} in {place}: {_describe(changed, place)}")


@user.command("show")
@click.argument("name")
@_where_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as one entry of 'list --json').")
def show_cmd(name: str, root: Path | None, db: str | None, as_json: bool) -> None:
    """Show user NAME: home, quota, file limit, programs, lock."""
    place = _place(root, db)
    with _open(place) as accounts:
        found = accounts.get(name)
    if found is None:
        raise NoSuchUser(f"no such user: {name!r} ({place.kind} {place})")
    if as_json:
        click.echo(json.dumps(_user_json(found), indent=2))
        return
    click.echo(f"user {found.name} in {place}: {_describe(found, place)}")


@user.command("list")
@_where_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (quota in bytes, null = unlimited / any).")
def list_cmd(root: Path | None, db: str | None, as_json: bool) -> None:
    """List all users (with --db, HOME is relative to each server's root)."""
    place = _place(root, db)
    with _open(place) as accounts:
        users = accounts.list()
    if as_json:
        click.echo(json.dumps([_user_json(u) for u in users], indent=2))
        return
    if not users:
        click.echo(f"no users in {place} yet (`ferry user add NAME`)", err=True)
        return
    click.echo(f"users in {place}:", err=True)  # a note: standard output stays the table
    rows = [("NAME", "QUOTA", "FILES", "EXEC", "HOME")]
    for u in users:
        if not u.exec_allowed:
            exec_text = "no"
        elif u.exec_allow is None:
            exec_text = "any"
        else:
            exec_text = ",".join(u.exec_allow)
        rows.append((u.name, format_size(u.quota), format_count(u.max_files), exec_text, str(u.home)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for name, quota, files, exec_text, home in rows:
        click.echo(
            f"{name:<{widths[0]}}  {quota:<{widths[1]}}  {files:<{widths[2]}}  {exec_text:<{widths[3]}}  {home}"
        )
