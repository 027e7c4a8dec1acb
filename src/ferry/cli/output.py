"""How the client commands talk to people and to scripts.

Three modes, chosen once per command by :class:`Output`:

- **human** (default): results on standard output, notes on standard error, and a rich progress bar
  (bytes, rate, ETA) for every transfer *when standard error is a terminal*; a pipe or a log file
  gets no bar, because carriage-return animation in a file is noise.
- **quiet** (``-q``): nothing but errors.
- **json** (``--json``): one JSON object per line on standard output for each transfer or result,
  nothing else on standard output, so ``ferry ... --json | jq`` always parses.

Names that came from the server are shown through :func:`ferry.textsafe.safe_name` in human mode
(a file name must not be able to drive the terminal); JSON output escapes every control character
by construction.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat as statmod
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from ferry.textsafe import safe_name

Progress = Callable[[int, int], None]

_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def human_size(n: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, like ``ls -h``); ``None`` -> ``"unlimited"``."""
    if n is None:
        return "unlimited"
    for unit, factor in _UNITS:
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def reader_gone() -> None:
    """Standard output's reader went away (``ferry ls | head``). Like ``ls`` and ``cat``, end
    quietly: the rest of the output is unwanted, not an error (coreutils die of SIGPIPE, which a
    shell does not report; Python ignores SIGPIPE, so the write fails with EPIPE instead).
    ``/dev/null`` takes standard output's place, so the interpreter's own last flush finds nowhere
    to fail ("Exception ignored ... BrokenPipeError")."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def interrupted_message(command: str | None) -> str:
    """What Ctrl-C prints: for a transfer, that running it again continues where it stopped."""
    if command in _RESUMABLE:
        return "ferry: interrupted; run the same command again to resume where it stopped"
    return "ferry: interrupted"


#: Commands whose work an interruption keeps: the same command again resumes it.
_RESUMABLE = frozenset({"get", "put", "mget", "mput", "sync"})


def short_size(n: int) -> str:
    """A size as ``ls -h`` prints it: ``999``, ``1.5K``, ``23M``, ``4.0G`` (powers of 1024, rounded
    up, as coreutils does: a listing never shows a file as smaller than it is)."""
    if n < 1024:
        return str(n)
    value = float(n)
    for letter in "KMGTPE":
        value /= 1024
        if value < 10 and math.ceil(value * 10) < 100:
            return f"{math.ceil(value * 10) / 10:.1f}{letter}"
        if math.ceil(value) < 1024 or letter == "E":
            return f"{math.ceil(value)}{letter}"
    raise AssertionError("unreachable")  # pragma: no cover - E covers every 64-bit size


def human_rate(nbytes: int, seconds: float) -> str:
    """Average rate of a transfer, e.g. ``"512.0 MiB/s"``."""
    return f"{human_size(int(nbytes / seconds))}/s" if seconds > 0 else "-"


def mode_string(kind: str, mode: int) -> str:
    """``ls -l`` style permissions, e.g. ``drwxr-x---``."""
    first = {"dir": "d", "link": "l", "file": "-"}.get(kind, "?")
    return first + statmod.filemode(mode)[1:]


def format_time(mtime: float) -> str:
    """A modification time as ``YYYY-MM-DD HH:MM`` in local time (sortable, unambiguous)."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))


class Output:
    """Printing policy of one command invocation (human, quiet or JSON)."""

    def __init__(self, *, quiet: bool = False, json_mode: bool = False, progress: bool | None = None) -> None:
        self.quiet = quiet
        self.json = json_mode
        #: results go to standard error: standard output carries data (``ferry get REMOTE -``)
        self.to_stderr = False
        # Bars only for a person watching: stderr must be a terminal and nothing asked for silence.
        self.bars = (not quiet and not json_mode and sys.stderr.isatty()) if progress is None else progress

    def name(self, s: str) -> str:
        """A peer-supplied name made safe for the terminal."""
        return safe_name(s)

    def result(self, human: str | None, record: dict[str, Any]) -> None:
        """One result: ``record`` as a JSON line in JSON mode, else ``human`` on stdout (unless quiet)."""
        if self.json:
            import json  # only --json needs it (~2 ms of every command otherwise)

            click.echo(json.dumps(record, ensure_ascii=True, sort_keys=False), err=self.to_stderr)
        elif human is not None and not self.quiet:
            click.echo(human, err=self.to_stderr)

    def note(self, message: str) -> None:
        """A human note on standard error (suppressed by -q and --json)."""
        if not self.quiet and not self.json:
            click.echo(message, err=True)

    @contextlib.contextmanager
    def progress(self, label: str, total: int | None = None) -> Iterator[Progress | None]:
        """A ``progress(done, total)`` callback showing a bar while the block runs, or None.

        The bar is removed when the transfer ends (the summary line says what happened), so a
        sequence of transfers leaves a clean screen. rich is imported only here: it is the slowest
        import of the client and scripts never need it.
        """
        with self.job_progress(label, total) as (update, _file):
            yield update

    @contextlib.contextmanager
    def job_progress(
        self, label: str, total: int | None = None
    ) -> Iterator[tuple[Progress | None, Callable[[str], None] | None]]:
        """Like :meth:`progress` for a whole job of many files: also a callback naming the current
        file, shown after ``label``. On a narrow terminal (under 80 columns) the bar and the time
        left make room: the label, bytes and rate always fit."""
        if not self.bars:
            yield None, None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            ProgressColumn,
            Task,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar
        from rich.table import Column
        from rich.text import Text

        class RateColumn(ProgressColumn):
            """Transfer rate in the same binary units as the byte counts (rich's own is decimal)."""

            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                shown = "?" if speed is None else f"{human_size(int(speed))}/s"
                return Text(shown, style="progress.data.speed")

        console = Console(stderr=True)
        wide = console.width >= 80
        name = Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=4)
        columns: list[ProgressColumn | str] = [TextColumn("{task.description}", markup=False, table_column=name)]
        if wide:
            columns.append(BarColumn())
        columns += [DownloadColumn(binary_units=True), RateColumn()]
        if wide:
            columns.append(TimeRemainingColumn())
        bar = Bar(*columns, console=console, transient=True)
        task = bar.add_task(label, total=total)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)  # 0: not known (a stream)

        def current(name: str) -> None:
            bar.update(task, description=f"{label} {safe_name(name)}")

        with bar:
            yield update, current


def transfer_record(op: str, source: str, dest: str, result: Any, hash_name: str = "blake3") -> dict[str, Any]:
    """The JSON object for a finished transfer (a TransferResult or a TreeResult).

    A file's ``digest`` is ferry's chunk-tree digest (``ferry.hashing``); ``checksum`` (when the
    transfer computed it) is the standard hash of the whole file, ``hash`` its algorithm: the value
    ``b3sum`` or ``md5sum`` print.
    """
    rec: dict[str, Any] = {"op": op, "source": source, "dest": dest}
    if hasattr(result, "files"):  # TreeResult, or the SyncResult of a get -r / put -r
        rec.update(kind="tree", files=result.files, size=result.bytes, seconds=round(result.seconds, 6))
        if hasattr(result, "sent_files"):
            rec.update(
                sent_files=result.sent_files,
                sent_bytes=result.sent_bytes,
                literal_bytes=result.literal_bytes,
                unchanged=result.unchanged,
                skipped=result.skipped,
                failed=result.failed,
            )
    else:
        rec.update(
            kind="file",
            size=result.size,
            sent=result.sent,
            resumed_from=result.resumed_from,
            seconds=round(result.seconds, 6),
            digest=result.digest,
        )
        if getattr(result, "checksum", None) is not None:
            rec.update(hash=hash_name, checksum=result.checksum)
    return rec


def transfer_summary(op: str, source: str, dest: str, result: Any) -> str:
    """The one-line human summary of a finished transfer."""
    arrow = f"{safe_name(source)} -> {safe_name(dest)}"
    if hasattr(result, "files"):
        files = "file" if result.files == 1 else "files"
        moved = getattr(result, "sent_bytes", result.bytes)
        extra = ""
        if hasattr(result, "sent_files") and result.sent_files != result.files:
            extra = f", {result.files - result.sent_files} already there"
        if getattr(result, "skipped", 0):
            extra += f", {result.skipped} skipped (links, special files)"
        return (
            f"{op}: {arrow}: {result.files} {files}, {human_size(result.bytes)}{extra} "
            f"in {result.seconds:.2f} s ({human_rate(moved, result.seconds)})"
        )
    extra = f", resumed at {human_size(result.resumed_from)}" if result.resumed_from else ""
    return (
        f"{op}: {arrow}: {human_size(result.size)} in {result.seconds:.2f} s "
        f"({human_rate(result.sent, result.seconds)}{extra})"
    )
