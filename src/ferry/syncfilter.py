"""gitignore-style name filters for ``ferry sync``, the same on client and server.

Rules are gitignore lines: ``*.log`` excludes, ``!keep.log`` re-includes, a trailing ``/`` matches
folders only, a ``/`` elsewhere anchors the pattern to the root of the transfer, ``**`` spans folders,
``#`` starts a comment. How one pattern matches a name (globs, ``**``, character classes, escapes)
is :mod:`pathspec`'s translation of gitignore's wildmatch; how rules combine is gitignore's:

- every entry (file or folder, at any depth) is checked against every rule; the **last** rule that
  matches it decides (exclude, or include for ``!``);
- a pattern without a slash (but for a trailing one) matches the entry's *name* at any depth; one
  with a slash matches its path from the root;
- an excluded folder is not entered at all, so nothing inside it can be re-included (as in git:
  write ``!*/`` to keep folders open while excluding files with ``*``).

Command-line order (see docs/sync.md): the lines of ``--filter-from`` files first, then each
``--exclude PAT``, then each ``--include PAT`` as ``!PAT``: includes win over excludes, so
``--exclude '*' --include '*/' --include '*.c'`` keeps exactly the C files, as with rsync.

Entries excluded on the receiving side are neither overwritten nor deleted (rsync's default).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ferry.errors import UsageError

#: Longest rule list accepted (also the wire limit of ScanTree.rules).
MAX_RULES = 4096


@dataclass(frozen=True, slots=True)
class _Rule:
    text: str
    exclude: bool  # False: a '!' rule (re-include)
    dir_only: bool
    whole_path: bool  # matched against the path from the root, else against the name
    regex: re.Pattern[str]


def _compile(line: str) -> _Rule | None:
    text = line.rstrip("\n")
    body = text
    negated = body.startswith("!")
    if negated:
        body = body[1:]
    dir_only = body.endswith("/")
    if dir_only:
        body = body.rstrip("/")
    if not body:
        return None
    # Imported here: ~50 ms, and a sync without filters never needs it.
    from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

    try:
        pattern = GitIgnoreSpecPattern(body)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"bad filter pattern {text!r}: {exc}") from exc
    if pattern.include is None or pattern.regex is None:  # blank or comment
        return None
    # A slash (leading, or inside) makes gitignore match the path from the root, not the name.
    return _Rule(text, not negated, dir_only, "/" in body, pattern.regex)


class Filter:
    """Decides which entries of a tree take part in a sync (see the module documentation)."""

    def __init__(self, rules: Sequence[str] = ()) -> None:
        if len(rules) > MAX_RULES:
            raise UsageError(f"too many filter rules ({len(rules)}; at most {MAX_RULES})")
        self.rules = list(rules)
        self._rules = [r for r in (_compile(line) for line in rules) if r is not None]

    def __bool__(self) -> bool:
        """True if there is any rule at all (an empty filter excludes nothing and costs nothing)."""
        return bool(self._rules)

    def excluded(self, path: str, is_dir: bool) -> bool:
        """True if entry ``path`` (relative to the root, ``/``-separated) is excluded by the rules.

        Only the entry itself is judged: callers walk top-down and do not enter excluded folders.
        """
        if not self._rules:
            return False
        name = path.rsplit("/", 1)[-1]
        verdict = False
        for rule in self._rules:
            if rule.dir_only and not is_dir:
                continue
            subject = path if rule.whole_path else name
            m = rule.regex.search(subject)
            if m is None:
                continue
            # pathspec's patterns also match what lies *inside* a matching folder (its dir-mark
            # group): only a match of the entry itself counts here.
            if "ps_d" in rule.regex.groupindex and m.group("ps_d") is not None:
                continue
            verdict = rule.exclude
        return verdict


def build_rules(
    filter_lines: Iterable[str] = (), exclude: Iterable[str] = (), include: Iterable[str] = ()
) -> list[str]:
    """The rule list in command-line order: filter-file lines, then excludes, then ``!includes``."""
    rules = [line.rstrip("\r\n") for line in filter_lines]
    rules += list(exclude)
    rules += [f"!{p}" for p in include]
    return rules


def read_filter_file(path: str) -> list[str]:
    """The lines of a ``--filter-from`` file (``-`` is not supported: the file is read once)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read filter file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"filter file {path} is not UTF-8 text") from exc
