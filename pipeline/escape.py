"""Escapers for the project's text output channels: the terminal and markdown (HTML: :func:`html.escape`).

User-provided strings (slide and patient ids, labels, file paths, error messages that quote file
contents) are free text: a manifest label can hold anything. Written raw, control characters would
be executed by a terminal (ANSI colour or cursor codes, carriage returns that overwrite a line,
bidi overrides that reorder it) and markdown punctuation would become links, images, HTML or table
cells in the Prefect UI. Each escaper makes such characters visible instead.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["terminal", "markdown", "plain_words", "plain_schema"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Markdown punctuation, backslash-escaped (CommonMark makes an escaped one literal): links, images,
# HTML, entities, emphasis, code spans, strikethrough, GFM table pipes, and the ':' and '@' of GFM's
# autolinks. The rest of ASCII punctuation ('/', '.', '-', ',', ...) means nothing inside a line and
# stays as it is, so paths and ids stay readable; at the start of a line see _MD_LEAD_*.
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]<>()#!|~&:@])")
_MD_WWW = re.compile(r"(?i)(www)\.")  # GFM autolinks www.example.com too, even inside a word
_MD_LEAD_MARK = re.compile(r"^(\s*)([-+=])")  # a list item or a setext underline at the start of a line
_MD_LEAD_NUMBER = re.compile(r"^(\s*\d+)\.")  # an ordered list item
_MD_LEAD_SPACES = re.compile(r"^ +")  # four would start a code block: written as entities, shown as spaces


def _unsafe(ch: str) -> bool:
    """Control (Cc), format (Cf: bidi overrides and isolates, zero-width marks) or line/paragraph separator."""
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")


def _visible(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def terminal(text: object, newlines: bool = False) -> str:
    """``text`` safe to print: control and format characters shown as ``\\x1b``, ``\\r``, ``\\u202e``...

    ``newlines=True`` keeps line feeds (for multi-line messages built by the project itself)."""
    s = str(text)
    return "".join(ch if not _unsafe(ch) or (newlines and ch == "\n") else _visible(ch) for ch in s)


def markdown(text: object) -> str:
    """``text`` as literal inline markdown (also safe in a GFM table cell): one line, its markdown
    punctuation backslash-escaped, control characters shown as in :func:`terminal`."""
    s = _MD_WWW.sub(r"\1\\.", _MD_PUNCT.sub(r"\\\1", terminal(text)))
    s = _MD_LEAD_NUMBER.sub(r"\1\\.", _MD_LEAD_MARK.sub(r"\1\\\2", s))
    return _MD_LEAD_SPACES.sub(lambda m: "&#32;" * len(m.group()), s)


_ROLE = re.compile(r":[a-z]+:`~?(?:[\w.]+\.)?(\w+)`")  # :class:`pipeline.config.TilingParams` -> TilingParams
_LITERAL = re.compile(r"``([^`]+)``")


def plain_words(doc: str) -> str:
    """A docstring as people read it in a form: reStructuredText roles and literals made plain words
    (``:meth:`a.B.c``` -> ``c``, double-backquoted ``x`` -> ``x``), whitespace collapsed."""
    return " ".join(_LITERAL.sub(r"\1", _ROLE.sub(r"\1", doc)).split())


def plain_schema(schema: dict, cls: type | None = None) -> None:
    """pydantic's ``json_schema_extra`` hook: the model's description (its docstring, which Prefect's
    run form shows) in :func:`plain_words`."""
    if isinstance(schema.get("description"), str):
        schema["description"] = plain_words(schema["description"])
