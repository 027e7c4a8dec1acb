"""Words for operating-system errors, as a user should read them.

``str(OSError)`` is written for programmers: ``[Errno 2] No such file or directory: 'pw.txt'``,
and asyncio's connect failures say ``Connect call failed ('::1', 7373, 0, 0)`` or ``Multiple
exceptions: ...``. Messages that reach a person say what happened in words (``no such file or
folder``, ``connection refused``) next to the name or address they are about, which the caller
already shows in its own form (a bracketed IPv6 address, the file as the user typed it).
"""

from __future__ import annotations

import errno
import os
import re

# The wording ferry uses elsewhere (a "folder", as in the rest of its messages), where the C
# library's differs.
_WORDS = {
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "not a folder",
    errno.EISDIR: "is a folder",
    errno.ENOTEMPTY: "folder not empty",
}
_ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]")
# A bare ``ConnectionResetError()`` (as asyncio and ssl raise them) has no number and no text.
_BY_CLASS: dict[type[OSError], int] = {
    ConnectionResetError: errno.ECONNRESET,
    ConnectionRefusedError: errno.ECONNREFUSED,
    ConnectionAbortedError: errno.ECONNABORTED,
    BrokenPipeError: errno.EPIPE,
    TimeoutError: errno.ETIMEDOUT,
    FileNotFoundError: errno.ENOENT,
    PermissionError: errno.EACCES,
}


def os_reason(exc: OSError) -> str:
    """What went wrong, in words, without the ``[Errno N]`` prefix or Python's repr of a path.

    ``socket.gaierror`` (name resolution) keeps its own text, a TLS error gives OpenSSL's reason.
    asyncio's "Multiple exceptions" (one per address of a host name) is reduced to the distinct
    reasons of its parts, so ``localhost`` refusing on ``::1`` and ``127.0.0.1`` reads
    ``connection refused``.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}  # no socket/ssl import just to compare
    if "gaierror" in names:  # name resolution: its numbers are not errnos
        return _lower_first(exc.strerror or str(exc) or "cannot resolve the host name")
    if "SSLError" in names:  # its numbers are OpenSSL's; the reason is the readable part
        verify = getattr(exc, "verify_message", None)
        if verify:
            return f"certificate verify failed: {verify}"
        reason = getattr(exc, "reason", None)
        return f"TLS error ({reason})" if reason else f"TLS error ({type(exc).__name__})"
    if exc.errno is not None and exc.errno > 0:
        return _words(exc.errno)
    text = str(exc)
    numbers = _ERRNO_IN_TEXT.findall(text)
    if numbers:
        reasons = dict.fromkeys(_words(int(n)) for n in numbers)  # distinct, in order
        return "; ".join(reasons)
    if exc.strerror or text:
        return _lower_first(exc.strerror or text)
    for cls, number in _BY_CLASS.items():
        if isinstance(exc, cls):
            return _words(number)
    return type(exc).__name__


def _words(number: int) -> str:
    return _WORDS.get(number) or _lower_first(os.strerror(number))


def _lower_first(text: str) -> str:
    """``"Connection refused"`` -> ``"connection refused"`` (it follows a colon in a message);
    an all-capitals word (``"TLS ..."``) is left as it is."""
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        return text[0].lower() + text[1:]
    return text
