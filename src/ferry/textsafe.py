"""Make text from the other side safe to print on a terminal.

File names and error messages come from a remote peer (or from another user's files on the server). A
name such as ``"report\\x1b]0;pwned\\x07.pdf"`` would retitle the terminal, ``"\\r"`` overwrites what
was printed before it, and a bidi override (U+202E) makes ``"exe.txt"`` display as ``"txt.exe"``.
Everything that prints a peer-supplied string goes through :func:`safe_name` or :func:`safe_text`.

The escaping is for *display only*: it is not reversible (a literal backslash is left as it is, so
``"\\x1b"`` typed by a user and an escaped ESC look alike). That keeps ordinary names readable and
makes both functions idempotent, so text escaped on the server and again on the client is unchanged.
"""

from __future__ import annotations

__all__ = ["is_unsafe_char", "safe_log_text", "safe_name", "safe_text"]

# Invisible characters that reorder how the surrounding text is displayed ("Trojan Source"): the
# embeddings/overrides U+202A-U+202E, the isolates U+2066-U+2069, and the marks LRM, RLM and ALM.
_BIDI = frozenset(
    [*map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)), "\u200e", "\u200f", "\u061c"]
)
# Unicode line and paragraph separators: some terminals and viewers break the line on them.
_SEPARATORS = frozenset(["\u2028", "\u2029"])


def is_unsafe_char(ch: str) -> bool:
    """True if the single character ``ch`` must not reach a terminal unescaped.

    Unsafe are the C0 controls (U+0000-U+001F, including ESC, which starts every ANSI escape
    sequence), DEL, the C1 controls (U+0080-U+009F, including the one-byte CSI U+009B), the bidi
    controls, the Unicode line/paragraph separators and lone surrogates (undecodable bytes of a file
    name, kept by Python's ``surrogateescape``, which cannot even be encoded for output).
    """
    o = ord(ch)
    return o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or ch in _BIDI or ch in _SEPARATORS


def _escape(ch: str) -> str:
    """The visible escape of one unsafe character: ``\\x1b`` below U+0100, ``\\u202e`` below
    U+10000, else ``\\U000e0001`` (a fixed width, so the next character cannot extend it)."""
    o = ord(ch)
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def _escape_all(s: str, keep: frozenset[str]) -> str:
    # Fastest path: printable ASCII (C-speed checks) has nothing to escape; the server logs a line
    # per file, so this matters for a 10,000-file tree.
    if s.isascii() and s.isprintable():
        return s
    # Fast path: nearly every name is clean, so scan once before building a new string.
    if not any(is_unsafe_char(c) and c not in keep for c in s):
        return s
    return "".join(_escape(c) if is_unsafe_char(c) and c not in keep else c for c in s)


_NOTHING: frozenset[str] = frozenset()
_MESSAGE_WHITESPACE = frozenset("\n\t")


def safe_name(s: str) -> str:
    """Return the file name ``s`` with every unsafe character replaced by a visible escape.

    ``safe_name("a\\x1b[31mb")`` is ``"a\\\\x1b[31mb"`` (shown as ``a\\x1b[31mb``): the escape sequence
    becomes inert text. Normal Unicode (accents, CJK, emoji with joiners) is left alone. Newlines and
    tabs are escaped too: a file name should occupy exactly one line in a listing.
    """
    return _escape_all(s, _NOTHING)


def safe_text(s: str) -> str:
    """Like :func:`safe_name` but for multi-line messages: keeps ``"\\n"`` and ``"\\t"``.

    Carriage returns are still escaped, since ``"\\r"`` lets a message overwrite what was printed
    before it on the same line.
    """
    return _escape_all(s, _MESSAGE_WHITESPACE)


def safe_log_text(s: str) -> str:
    """Return ``s`` fit for one line of a log file: every non-printing character escaped.

    Stricter than :func:`safe_name`: besides what a terminal must not see, it escapes newlines and
    tabs and everything Unicode does not print (format characters such as zero-width joiners,
    private-use and unassigned code points, spaces other than U+0020), because a log line must
    read the same in every viewer and split into exactly one line however it is parsed (Python's
    ``splitlines`` also breaks at U+2028, U+0085, U+001C...). The result is printable, so
    escaping it again changes nothing.
    """
    if s.isprintable():  # C-speed check; nearly every logged string takes this path
        return s
    return "".join(c if c.isprintable() else _escape(c) for c in s)
