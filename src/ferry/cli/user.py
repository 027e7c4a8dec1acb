"""``ferry user``: manage the accounts of a ferry server (add, del, passwd, mod, list, key, token).

Works directly on the server's data root (``--root``, default ``$FERRY_ROOT`` or
``~/.local/share/ferry``), also while the server runs: changes apply at the next login.

Only ``add`` may create a data root (and says so): every other command refuses a root that holds
no accounts, instead of quietly starting an empty one beside the server's real root and answering
"no such user". Every message names the root it used, so a wrong root is seen at once.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import re
import sys
import warnings
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from ferry import paths
from ferry.errors import AccountError, NoSuchUser, UsageError, UserExists

if TYPE_CHECKING:
    # Typing only: at run time the accounts module (argon2, sqlite3) is imported by the commands
    # that need it, so `ferry --help` stays fast.
    from ferry.server.accounts import Accounts, User

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
_password_stdin_option = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password as one line from standard input instead of prompting.",
)


def _root(root: Path | None) -> Path:
    """The data root a command works on: ``--root``, else the default (``$FERRY_ROOT``, ...)."""
    return (root if root is not None else paths.default_root()).absolute()


def _has_accounts(where: Path) -> bool:
    return paths.users_db(where).is_file()


def _open(root: Path | None) -> Accounts:
    """The accounts of an existing data root; never creates one (see the module docstring)."""
    # Imported here: `ferry --help` should not pay for argon2 and sqlite3.
    from ferry.server.accounts import Accounts

    where = _root(root)
    if not _has_accounts(where):
        origin = "--root" if root is not None else "the default data root"
        raise UsageError(
            f"no ferry data root at {where} ({origin}; it holds no users.db): give the server's "
            "root with --root DIR or $FERRY_ROOT ('ferry serve' prints it as 'data root')"
        )
    return Accounts(where)


@contextlib.contextmanager
def _naming_root(where: Path) -> Iterator[None]:
    """Account errors ("no such user", "already exists") say which root they were found in."""
    try:
        yield
    except AccountError as exc:
        raise type(exc)(f"{exc} (data root {where})") from exc


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


def _describe(user: User) -> str:
    if not user.exec_allowed:
        exec_text = "no"
    elif user.exec_allow is None:
        exec_text = "any program"
    else:
        exec_text = ", ".join(user.exec_allow) or "(none)"
    disabled = " (disabled: cannot log in)" if user.disabled else ""
    return f"home {user.home}, quota {format_size(user.quota)}, exec {exec_text}{disabled}"


def _user_json(user: User) -> dict[str, Any]:
    return {
        "name": user.name,
        "home": str(user.home),
        "quota": user.quota,
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
@_root_option
@_password_stdin_option
@click.option(
    "--quota", metavar="SIZE", help="Storage quota, e.g. 500M, 10G, 1.5GiB, 2TB (default: unlimited)."
)
@click.option("--exec/--no-exec", "exec_", default=None, help="May the user run programs? (default: no)")
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
    password_stdin: bool,
    quota: str | None,
    exec_: bool | None,
    allow: tuple[str, ...],
) -> None:
    """Create user NAME with a home folder under the root."""
    from ferry.server.accounts import Accounts, validate_name

    validate_name(name)
    quota_bytes = parse_size(quota) if quota is not None else None
    where = _root(root)
    new_root = not _has_accounts(where)
    if not new_root:  # fail before asking for a password, rather than after
        with _open(root) as accounts:
            if accounts.get(name) is not None:
                raise UserExists(f"user {name!r} already exists (data root {where})")
    home_existed = paths.home_dir(where, name).exists()
    password = _read_password(name, password_stdin)  # before creating anything: it may fail
    with Accounts(where) as accounts, _naming_root(where):  # the one command that may create a root
        created = accounts.add(
            name,
            password,
            quota=quota_bytes,
            # Naming allowed programs without --exec would otherwise create a user who can run nothing.
            exec_allowed=exec_ if exec_ is not None else bool(allow),
            exec_allow=allow or None,
        )
    if new_root:
        serve = "ferry serve" if root is None else f"ferry serve --root {where}"
        click.echo(f"created the data root {where} (serve it with '{serve}')")
    click.echo(f"created user {created.name} in {where}: {_describe(created)}")
    if home_existed:
        click.echo(f"note: the existing folder {created.home} was kept and is now {created.name}'s home")


@user.command("del")
@click.argument("name")
@_root_option
@click.option("--remove-home", is_flag=True, help="Also delete the user's home folder and all files in it.")
def del_cmd(name: str, root: Path | None, remove_home: bool) -> None:
    """Delete user NAME (its home folder is kept unless --remove-home)."""
    where = _root(root)
    with _open(root) as accounts, _naming_root(where):
        home = accounts.home_of(name)
        accounts.delete(name, remove_home=remove_home)
    if remove_home:
        click.echo(f"deleted user {name} and its home folder from {where}")
    else:
        click.echo(f"deleted user {name} from {where} (home folder kept: {home})")


@user.command("passwd")
@click.argument("name")
@_root_option
@_password_stdin_option
def passwd_cmd(name: str, root: Path | None, password_stdin: bool) -> None:
    """Set a new password for user NAME."""
    where = _root(root)
    with _open(root) as accounts, _naming_root(where):
        _require_user(accounts, name)
        accounts.set_password(name, _read_password(name, password_stdin))
    click.echo(f"password of {name} changed in {where}")


@user.command("mod")
@click.argument("name")
@_root_option
@click.option("--quota", metavar="SIZE|none", help="New quota (e.g. 10G), or 'none' for unlimited.")
@click.option("--exec/--no-exec", "exec_", default=None, help="Allow or forbid running programs.")
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
    quota: str | None,
    exec_: bool | None,
    allow: tuple[str, ...],
    allow_any: bool,
    disable: bool | None,
) -> None:
    """Change the quota, program permissions or lock of user NAME.

    Takes effect on a running server within seconds: sessions of a disabled user end, and
    sessions that may run programs end when those rights are reduced.
    """
    from ferry.server.accounts import UNCHANGED

    if allow and allow_any:
        raise UsageError("--allow and --allow-any cannot be combined")
    if quota is None and exec_ is None and not allow and not allow_any and disable is None:
        raise UsageError(
            "nothing to change: give --quota, --exec/--no-exec, --allow, --allow-any or --disable/--enable"
        )
    quota_bytes = parse_size(quota) if quota is not None else UNCHANGED
    exec_allow = allow if allow else (None if allow_any else UNCHANGED)
    # Naming programs implies --exec (unless --no-exec is given), as in `add`.
    exec_allowed = exec_ if exec_ is not None else (True if (allow or allow_any) else UNCHANGED)
    where = _root(root)
    with _open(root) as accounts, _naming_root(where):
        changed = accounts.modify(
            name,
            quota=quota_bytes,
            exec_allowed=exec_allowed,
            exec_allow=exec_allow,
            disabled=UNCHANGED if disable is None else disable,
        )
    click.echo(f"user {changed.name} in {where}: {_describe(changed)}")


@user.command("list")
@_root_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON (quota in bytes, null = unlimited / any).")
def list_cmd(root: Path | None, as_json: bool) -> None:
    """List all users."""
    where = _root(root)
    with _open(root) as accounts:
        users = accounts.list()
    if as_json:
        click.echo(json.dumps([_user_json(u) for u in users], indent=2))
        return
    if not users:
        click.echo(f"no users in {where} yet (`ferry user add NAME`)", err=True)
        return
    click.echo(f"users in {where}:", err=True)  # a note: standard output stays the table
    rows = [("NAME", "QUOTA", "EXEC", "HOME")]
    for u in users:
        if not u.exec_allowed:
            exec_text = "no"
        elif u.exec_allow is None:
            exec_text = "any"
        else:
            exec_text = ",".join(u.exec_allow)
        rows.append((u.name, format_size(u.quota), exec_text, str(u.home)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for name, quota, exec_text, home in rows:
        click.echo(f"{name:<{widths[0]}}  {quota:<{widths[1]}}  {exec_text:<{widths[2]}}  {home}")
