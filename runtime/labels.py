"""Class names are data, not markup: which names are refused, and one escaper for each format a name is
written in.

A class name comes from a folder name or a CSV cell, so it can hold anything a file name can. Names with
a control character (C0, DEL, C1: newline, tab, CR, NUL...) or a Unicode line or paragraph separator are
refused where data loads and where metadata is read: every format that lists names one per line
(labels.txt, Triton's label files, the ONNX `labels` entry) would read them back as other names. Every
other name (`a|b`, `<img src=x>`, backticks, non-ASCII) is accepted and escaped where it is written:

    markdown("a|b <i>")   -> "a\\|b &lt;i&gt;"     text or a table cell in report.md / model_card.md
    code_span("x`y")      -> "`` x`y ``"            a Markdown code span
    html("<img>")         -> "&lt;img&gt;"
    figure_text("5$ & 6$") -> "5\\$ & 6\\$"           figure text (no mathtext)
    lines(["a", "b"])     -> "a\\nb\\n"              labels.txt; read back with read_lines

CSV files go through the csv module, JSON through json: both quote what needs quoting.
"""
from __future__ import annotations

import html as _html
import re
import unicodedata
from typing import Iterable

from edgexfer.runtime.errors import RuntimeInputError


def bad_character(name: str) -> str | None:
    """The first character that makes `name` unusable as a class name, as "U+000A", or None."""
    for ch in str(name):
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return f"U+{ord(ch):04X}"
    return None


def refusal(name: str) -> str | None:
    """Why `name` cannot be a class name (None: it can), in words that fit one error line."""
    ch = bad_character(name)
    return None if ch is None else f"{name!r} holds a control character ({ch})"


# backslash first; & < > as entities so no HTML survives; the rest with a backslash (CommonMark escapes any
# ASCII punctuation that way); `_` only where it could start or end emphasis (not between letters)
_MD = {"\\": "\\\\", "`": "\\`", "*": "\\*", "[": "\\[", "]": "\\]", "|": "\\|", "~": "\\~", "#": "\\#",
       "&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_RE = re.compile(r"[\\`*\[\]|~#&<>]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])|[\r\n\t]+")


def markdown(text) -> str:
    """`text` as literal Markdown text, fit for a table cell too: no HTML, link, emphasis or extra column."""
    return _MD_RE.sub(lambda m: _MD.get(m.group(), "\\_" if m.group() == "_" else " "), str(text))


def code_span(text) -> str:
    """`text` as a Markdown code span, fenced by more backticks than it holds in a row."""
    text = re.sub(r"[\r\n\t]+", " ", str(text))
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or fence != "`" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def html(text) -> str:
    return _html.escape(str(text), quote=True)


def figure_text(text) -> str:
    """Figure text shown as given: a `$` would otherwise start mathtext."""
    return str(text).replace("$", r"\$")


def lines(labels: Iterable[str], where: str = "labels") -> str:
    """One label per line (labels.txt, Triton's label files); RuntimeInputError for a name that could not be
    read back as itself."""
    labels = [str(x) for x in labels]
    for x in labels:
        why = refusal(x)
        if why:
            raise RuntimeInputError(f"{where}: {why}; it cannot be written one per line")
    return "".join(f"{x}\n" for x in labels)


def read_lines(text: str) -> list[str]:
    """The labels `lines` wrote, in order."""
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")
