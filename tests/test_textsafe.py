"""Tests for ferry.textsafe: peer-supplied names must be inert on a terminal."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferry.textsafe import is_unsafe_char, safe_log_text, safe_name, safe_text

# Every code point, lone surrogates included (they come from undecodable bytes in file names).
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(alphabet=ANY_CHAR)

BIDI = [chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C]]


def dangerous(ch: str) -> bool:
    """Independent oracle: what must never reach the terminal raw."""
    return (
        unicodedata.category(ch) in ("Cc", "Cs")  # C0, DEL, C1; lone surrogates
        or ch in BIDI
        or ch in ("\u2028", "\u2029")
    )


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain.txt", "plain.txt"),
        ("a\x1b[31mred\x1b[0m", "a\\x1b[31mred\\x1b[0m"),  # ANSI colour: inert text
        ("title\x1b]0;pwned\x07", "title\\x1b]0;pwned\\x07"),  # OSC retitle + BEL
        ("over\rwrite", "over\\rwrite".replace("\\r", "\\x0d")),
        ("line\nbreak\ttab", "line\\x0abreak\\x09tab"),
        ("del\x7f", "del\\x7f"),
        ("csi\x9b31m", "csi\\x9b31m"),  # the one-byte C1 CSI
        ("exe.\u202etxt", "exe.\\u202etxt"),  # right-to-left override
        ("iso\u2066x\u2069", "iso\\u2066x\\u2069"),
        ("sep\u2028x", "sep\\u2028x"),
        ("bad\udcffbyte", "bad\\udcffbyte"),  # surrogateescape'd byte 0xff from a file name
        ("nul\x00", "nul\\x00"),
    ],
)
def test_safe_name_examples(raw: str, shown: str) -> None:
    assert safe_name(raw) == shown


@pytest.mark.parametrize(
    "normal",
    [
        "résumé.pdf",
        "日本語のファイル.txt",
        "family \U0001f468\u200d\U0001f469\u200d\U0001f467.png",  # emoji joined with ZWJ
        "e\u0301 combining",
        "back\\slash and 'quotes' \"too\"",
        "\U0001f1e9\U0001f1ea flag",
        "",
    ],
)
def test_normal_unicode_is_untouched(normal: str) -> None:
    assert safe_name(normal) == normal
    assert safe_text(normal) == normal


def test_safe_text_keeps_newlines_and_tabs_but_not_cr() -> None:
    assert safe_text("line 1\n\tline 2\r\x1b[2K") == "line 1\n\tline 2\\x0d\\x1b[2K"


@given(ANY_TEXT)
def test_safe_name_output_never_contains_unsafe_chars(s: str) -> None:
    out = safe_name(s)
    assert not any(dangerous(c) for c in out)
    assert not any(is_unsafe_char(c) for c in out)
    out.encode("utf-8")  # printable on a UTF-8 terminal: no lone surrogates left


@given(ANY_TEXT)
def test_safe_text_only_lets_newline_and_tab_through(s: str) -> None:
    out = safe_text(s)
    assert all(not dangerous(c) or c in "\n\t" for c in out)
    assert safe_text(out) == out


@given(ANY_TEXT)
def test_idempotent_and_identity_on_safe_text(s: str) -> None:
    once = safe_name(s)
    assert safe_name(once) == once  # escaping on the server and again on the client is harmless
    if not any(dangerous(c) for c in s):
        assert once == s


@given(ANY_CHAR)
def test_is_unsafe_char_matches_oracle(ch: str) -> None:
    assert is_unsafe_char(ch) == dangerous(ch)


@given(ANY_TEXT)
def test_safe_log_text_is_one_printable_line(s: str) -> None:
    out = safe_log_text(s)
    assert out.isprintable()  # no control, format, separator, private-use or unassigned character
    assert len(out.splitlines()) <= 1  # whatever a reader treats as a line break is escaped
    assert not any(dangerous(c) for c in out)
    assert safe_log_text(out) == out
    out.encode("utf-8")
    if s.isprintable():
        assert out == s  # ordinary text (accents, CJK, spaces) is logged as it is


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        ("a\nb\tc\rd", "a\\x0ab\\x09c\\x0dd"),
        ("sep\u2028nel\x85", "sep\\u2028nel\\x85"),
        ("zw\u200bj\ufeff", "zw\\u200bj\\ufeff"),  # invisible format characters
        ("tag\U000e0041", "tag\\U000e0041"),  # fixed width above U+FFFF
        ("nbsp\u00a0x", "nbsp\\xa0x"),
        ("plain text, ünïcödé 日本", "plain text, ünïcödé 日本"),
    ],
)
def test_safe_log_text_examples(raw: str, logged: str) -> None:
    assert safe_log_text(raw) == logged
