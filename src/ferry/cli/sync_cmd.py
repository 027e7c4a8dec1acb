"""``ferry sync SRC DEST``: make DEST like SRC, sending only what changed (see docs/sync.md).

Thin: parses the locations and options, calls :func:`ferry.client.sync.sync`, prints items
(``-i``), JSON records (``--json``) or a summary line, and turns per-item failures into exit
status 5 after everything else was done.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import click

from ferry.cli.files import Common, common_options, connected, remote_location, run, show_remote
from ferry.cli.output import Output, human_size
from ferry.client.location import is_remote, parse_location
from ferry.errors import TransferError, UsageError
from ferry.ratelimit import parse_rate
from ferry.textsafe import safe_name

if TYPE_CHECKING:
    from ferry.client.sync import SyncItem, SyncResult


def item_line(item: SyncItem) -> str:
    """One ``-i`` line: the action, the path, and why or how much."""
    path = safe_name(item.path or ".") + ("/" if item.kind == "dir" else "")
    if item.error:
        return f"failed  {path}: {safe_name(item.error)}"
    extra = ""
    if item.action == "skip":
        extra = f": {safe_name(item.reason)}"
    elif item.action == "update":
        extra = f" ({item.reason}; sent {human_size(item.sent)} of {human_size(item.size)})"
    elif item.action == "new" and item.kind == "file":
        extra = f" ({human_size(item.size)})"
    elif item.action == "attrs":
        extra = f" ({item.reason})"
    return f"{item.action:<7} {path}{extra}"


def item_record(item: SyncItem) -> dict[str, Any]:
    """One ``--json`` item object."""
    rec: dict[str, Any] = {
        "type": "item",
        "action": item.action,
        "path": item.path,
        "kind": item.kind,
        "size": item.size,
        "sent": item.sent,
        "reason": item.reason,
    }
    if item.error:
        rec["error"] = item.error
    return rec


def summary_line(src: str, dest: str, r: SyncResult) -> str:
    """The human summary of a sync."""
    parts = [f"{r.files} files checked", f"{r.sent_files} sent"]
    if r.sent_files:
        parts[-1] += f" ({human_size(r.sent_bytes)}; {human_size(r.literal_bytes)} of data moved)"
    parts.append(f"{human_size(r.wire_bytes)} on the wire")
    if r.deleted:
        parts.append(f"{r.deleted} deleted")
    if r.skipped:
        parts.append(f"{r.skipped} skipped")
    if r.failed:
        parts.append(f"{r.failed} failed")
    dry = " (dry run: nothing was changed)" if r.dry_run else ""
    return f"sync: {safe_name(src)} -> {safe_name(dest)}: {', '.join(parts)} in {r.seconds:.2f} s{dry}"


def _remote_arg(spec: str, port: int | None) -> tuple[Any, str]:
    """The location and the API's ``:PATH`` spelling, keeping a trailing ``/`` (it means "contents")."""
    loc = remote_location(spec, port)
    raw = parse_location(spec).path
    slash = "/" if raw.endswith("/") and loc.path else ""
    return loc, ":" + loc.path + slash


@click.command(short_help="Make DEST like SRC, sending only what changed (rsync's job).")
@click.argument("src")
@click.argument("dest")
@click.option("-c", "--checksum", is_flag=True, help="Compare content hashes instead of size and mtime.")
@click.option("--delete", is_flag=True, help="Delete what DEST has and SRC does not (after the transfers).")
@click.option("-n", "--dry-run", is_flag=True, help="Show what would change; change nothing.")
@click.option("--exclude", multiple=True, metavar="PAT", help="Leave out names matching PAT (gitignore style).")
@click.option("--include", multiple=True, metavar="PAT", help="Keep names matching PAT even if excluded.")
@click.option(
    "--filter-from",
    "filter_from",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Read gitignore-style rules from FILE (before --exclude and --include).",
)
@click.option("-i", "--itemize", is_flag=True, help="One line per change (and per skipped entry).")
@click.option("--no-delta", is_flag=True, help="Send changed files whole instead of their changed parts.")
@click.option("-z", "--compress", is_flag=True, help="Compress file data (zstd, per chunk, where it helps).")
@click.option("--bwlimit", metavar="RATE", help="Limit the bandwidth (bytes/s; K, M, G suffixes: 10M).")
@functools.partial(common_options, short_identity=False)  # -i itemizes here, as with rsync
def sync(
    src: str,
    dest: str,
    checksum: bool,
    delete: bool,
    dry_run: bool,
    exclude: tuple[str, ...],
    include: tuple[str, ...],
    filter_from: tuple[str, ...],
    itemize: bool,
    no_delta: bool,
    compress: bool,
    bwlimit: str | None,
    common: Common,
) -> None:
    """Make DEST like SRC; exactly one of them is remote ([USER@]HOST:PATH or ferry://...).

    SRC/ (a trailing slash) syncs the contents of SRC into DEST; SRC without it syncs into DEST/SRC
    (as rsync does). Unchanged files (same size and modification time, or same content with -c)
    cost no data; changed large files send only their changed chunks. Symbolic links and special
    files are skipped and reported. See docs/sync.md.
    """
    from ferry.syncfilter import build_rules, read_filter_file

    if is_remote(src) == is_remote(dest):
        raise UsageError("exactly one of SRC and DEST must be remote ([USER@]HOST:PATH or ferry://...)")
    rate = parse_rate(bwlimit)
    lines: list[str] = []
    for path in filter_from:
        lines += read_filter_file(path)
    rules = build_rules(lines, exclude, include)
    push = is_remote(dest)
    loc, api_remote = _remote_arg(dest if push else src, common.port)
    api_src, api_dest = (src, api_remote) if push else (api_remote, dest)
    shown_src = src if push else show_remote(loc)
    shown_dest = show_remote(loc) if push else dest
    out = common.output()

    def on_item(item: SyncItem) -> None:
        if out.json:
            out.result(None, item_record(item))
        elif itemize:
            out.result(item_line(item), {})
        elif item.error:
            out.note(f"ferry: {safe_name(item.path or '.')}: {safe_name(item.error)}")

    async def main() -> SyncResult:
        from ferry.cli.common import open_client  # noqa: F401 (imported here: see below)
        from ferry.client.sync import local_listing_for

        # The local side is listed in a thread from now on, beside the connection and login
        # (spent mostly waiting for the server). Not earlier: beside the imports above (and
        # those of asyncio and the connection) the listing would only compete with them for the
        # interpreter lock, and both would take longer (docs/performance.md).
        listing = local_listing_for(api_src, api_dest, rules=rules, checksum=checksum)
        async with connected(loc, common) as client:
            if rate:
                client.set_bwlimit(rate)
            with out.job_progress("sync") as (progress, on_file):
                result: SyncResult = await client.sync(
                    api_src,
                    api_dest,
                    delete=delete,
                    dry_run=dry_run,
                    checksum=checksum,
                    rules=rules,
                    delta=not no_delta,
                    compress=compress,
                    progress=progress,
                    on_item=on_item,
                    on_file=on_file,
                    local_listing=listing,
                )
                return result

    result = run(main())
    report(out, shown_src, shown_dest, result)


def report(out: Output, src: str, dest: str, result: SyncResult) -> None:
    """Print the summary (a JSON object in JSON mode) and fail with status 5 if anything failed."""
    for note in result.notes:
        out.note(f"ferry: {safe_name(note)}")
    out.result(summary_line(src, dest, result), {"type": "summary", "src": src, "dest": dest, **result.summary()})
    if result.failed:
        shown = "; ".join(f"{safe_name(i.path or '.')}: {safe_name(i.error)}" for i in result.items if i.error)
        if len(shown) > 2000:
            shown = shown[:2000] + "..."
        raise TransferError(f"{result.failed} item(s) failed: {shown}")
