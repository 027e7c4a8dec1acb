"""The server's log: one line per event, and no text from a client can forge or split a line.

Clients control much of what the server logs: the user name of a login attempt (before anyone
logged in), paths and folder names, commands, the software string of their Hello, and text that
ends up in error messages. Escaping is done here, in the one :class:`LineFormatter` every handler
of the server's logger uses, not at each call: whatever a call site passes, the rendered message
goes through :func:`ferry.textsafe.safe_log_text`, so a newline, a carriage return, any other
control character or a Unicode line separator (U+2028) becomes a visible escape and the record
stays on its one line. Tracebacks (``log.exception``) keep their own lines, but each is indented
under the record and escaped, so no line of one can pass for a record of its own.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import TracebackType

from ferry import paths
from ferry.textsafe import safe_log_text

__all__ = ["CONTINUATION", "LineFormatter", "setup_logging"]

#: Prefix of the extra lines of a record (traceback, stack): a record's own line starts with its
#: timestamp, so a line starting with this can never be mistaken for one.
CONTINUATION = "    | "

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def _continued(text: str) -> str:
    return "\n".join(CONTINUATION + safe_log_text(line) for line in text.splitlines())


class LineFormatter(logging.Formatter):
    """``TIME LEVEL MESSAGE`` with the message made one safe line (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The record's line, its message (arguments already merged in) escaped."""
        record.message = safe_log_text(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:
        """The traceback, each line escaped and indented under the record."""
        return _continued(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        """A stack dump, like a traceback."""
        return _continued(super().formatStack(stack_info))


def setup_logging(root: Path, console: bool) -> logging.Logger:
    """The server's logger: a UTF-8 file under the root plus (optionally) the console.

    Handlers are attached to a logger private to this root, replaced (not duplicated) on a restart
    in the same process; every handler formats with :class:`LineFormatter`.
    """
    logfile = paths.log_file(root)
    paths.ensure_private_dir(logfile.parent)
    log = logging.getLogger(f"ferry.server.{root}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = LineFormatter()
    fh = logging.FileHandler(logfile, encoding="utf-8")
    fh.setFormatter(fmt)
    log.addHandler(fh)
    if console:
        ch = logging.StreamHandler(sys.stderr)
        ch.setFormatter(fmt)
        log.addHandler(ch)
    return log
