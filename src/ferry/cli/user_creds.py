"""``ferry user key ...`` and ``ferry user token ...``: SSH keys and access tokens of an account.

Like the rest of ``ferry user`` these work on the server's data root directly (or with ``--db`` on
the accounts several servers share), also while the servers run; removing a key or a token ends the sessions that logged in with it within seconds.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click

from ferry.cli.user import _naming, _open, _place, _where_options
from ferry.errors import UsageError

if TYPE_CHECKING:
    from ferry.server.credentials import Credentials

_DURATION_RE: Final = re.compile(r"\s*(\d+)\s*([smhdwy])\s*", re.IGNORECASE)
_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_expiry(text: str, now: float | None = None) -> int | None:
    """``--expires``: a duration (``30d``, ``12h``, ``2w``, ``90m``, ``1y``), a date
    (``2027-01-31``, midnight UTC) or ``never``; returns a Unix time or None."""
    now = time.time() if now is None else now
    if text.strip().lower() in ("never", "none"):
        return None
    if m := _DURATION_RE.fullmatch(text):
        amount = int(m.group(1))
        if amount <= 0:
            raise UsageError(f"invalid expiry {text!r}: the duration must be more than 0")
        return int(now) + amount * _SECONDS[m.group(2).lower()]
    try:
        day = datetime.date.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"invalid expiry {text!r}: use a duration like 30d, 12h, 2w, 90m, 1y, a date like 2027-01-31, "
            "or 'never'"
        ) from None
    when = int(datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp())
    if when <= now:
        raise UsageError(f"invalid expiry {text!r}: that date is in the past")
    return when


@contextlib.contextmanager
def _credentials(root: Path | None, db: str | None) -> Iterator[Credentials]:
    """The keys and tokens of an existing data root or database; account errors name it."""
    from ferry.server.credentials import Credentials

    place = _place(root, db)
    with _open(place) as accounts, _naming(place):
        yield Credentials(accounts)


def _when(ts: int | None) -> str:
    if ts is None:
        return "never"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- keys ----------------------------------------------------------------------------------------


@click.group()
def key() -> None:
    """SSH public keys a user may log in with (ed25519, ecdsa, rsa >= 2048 bits)."""


@key.command("add")
@click.argument("name")
@click.argument("file", metavar="FILE|-")
@_where_options
def key_add(name: str, file: str, root: Path | None, db: str | None) -> None:
    """Add the public keys in FILE (a .pub file or a whole authorized_keys; '-' reads standard input).

    Lines with authorized_keys options (from=, command=, no-pty, ...) are refused: ferry cannot
    apply them. Nothing is added unless every line is a usable key.
    """
    if file == "-":
        text, source = sys.stdin.read(), "standard input"
    else:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from exc
        source = file
    with _credentials(root, db) as creds:
        added, already = creds.add_keys(name, text, source=source)
    for record in added:
        click.echo(f"added {record.fingerprint} {record.type} {record.comment}".rstrip())
    for record in already:
        click.echo(f"already there: {record.fingerprint} {record.type} {record.comment}".rstrip())


@key.command("list")
@click.argument("name")
@_where_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def key_list(name: str, root: Path | None, db: str | None, as_json: bool) -> None:
    """List the keys of NAME: fingerprint (as ssh-keygen -l prints it), type, comment."""
    with _credentials(root, db) as creds:
        keys = creds.keys(name)
    if as_json:
        rows = [
            {"fingerprint": k.fingerprint, "type": k.type, "comment": k.comment, "added": k.added, "line": k.line}
            for k in keys
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if not keys:
        click.echo(f"{name} has no keys (add one with 'ferry user key add {name} FILE.pub')", err=True)
        return
    for k in keys:
        click.echo(f"{k.fingerprint}  {k.type:<20}  {k.comment}".rstrip())


@key.command("del")
@click.argument("name")
@click.argument("fingerprint")
@_where_options
def key_del(name: str, fingerprint: str, root: Path | None, db: str | None) -> None:
    """Remove the key with FINGERPRINT (SHA256:...) from NAME; its sessions end within seconds."""
    with _credentials(root, db) as creds:
        record = creds.delete_key(name, fingerprint)
    click.echo(f"removed {record.fingerprint} {record.type} {record.comment}".rstrip())


# --- tokens --------------------------------------------------------------------------------------


@click.group()
def token() -> None:
    """Access tokens: revocable credentials for scripts and CI, optionally read-only."""


@token.command("add")
@click.argument("name")
@_where_options
@click.option("--read-only", is_flag=True, help="The token may list and download, not write, delete, rename or run.")
@click.option("--expires", metavar="WHEN", help="30d, 12h, 2w, 1y, a date (2027-01-31) or never (default).")
@click.option("--label", default="", help="A note to recognise the token by (shown by 'token list').")
def token_add(
    name: str, root: Path | None, db: str | None, read_only: bool, expires: str | None, label: str
) -> None:
    """Create a token for NAME and print it once (only its hash is kept).

    Clients use it with FERRY_TOKEN=... or --token-file FILE.
    """
    when = parse_expiry(expires) if expires is not None else None
    with _credentials(root, db) as creds:
        record, secret = creds.add_token(name, read_only=read_only, expires=when, label=label)
    click.echo(secret)
    rights = "read-only" if record.read_only else "read-write"
    click.echo(
        f"token {record.id} for {name}: {rights}, expires {_when(record.expires)}; "
        "shown only this once, store it now",
        err=True,
    )


@token.command("list")
@click.argument("name")
@_where_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (times as Unix seconds, null = never).")
def token_list(name: str, root: Path | None, db: str | None, as_json: bool) -> None:
    """List the tokens of NAME (ids, rights, expiry, labels; never the secrets)."""
    with _credentials(root, db) as creds:
        tokens = creds.tokens(name)
    if as_json:
        rows = [
            {
                "id": t.id,
                "read_only": t.read_only,
                "label": t.label,
                "created": t.created,
                "expires": t.expires,
                "expired": t.expired(),
            }
            for t in tokens
        ]
        click.echo(json.dumps(rows, indent=2))
        return
    if not tokens:
        click.echo(f"{name} has no tokens (create one with 'ferry user token add {name}')", err=True)
        return
    for t in tokens:
        rights = "read-only " if t.read_only else "read-write"
        expiry = "EXPIRED " + _when(t.expires) if t.expired() else "expires " + _when(t.expires)
        click.echo(f"{t.id}  {rights}  created {_when(t.created)}  {expiry}  {t.label}".rstrip())


@token.command("del")
@click.argument("name")
@click.argument("token_id", metavar="ID")
@_where_options
def token_del(name: str, token_id: str, root: Path | None, db: str | None) -> None:
    """Revoke token ID of NAME; sessions that logged in with it end within seconds."""
    with _credentials(root, db) as creds:
        record = creds.delete_token(name, token_id)
    click.echo(f"revoked token {record.id} of {name}")
