"""Editor conventions: LSP positions, content changes and byte offsets, mapped to code-point offsets.

LSP counts a line's characters in UTF-16 code units by default (UTF-8 bytes or UTF-32
code points when negotiated) and ends lines at "\\n", "\\r\\n" or "\\r"; tree-sitter counts
UTF-8 bytes. ``TextDocument`` works in code points (Python ``str`` indices). These pure
functions convert between them and refuse positions that fall inside one character.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable, Literal

from vqt.text.tokenizer import check_text

PositionEncoding = Literal["utf-16", "utf-8", "utf-32"]
ENCODINGS: tuple[str, ...] = ("utf-16", "utf-8", "utf-32")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def check_encoding(encoding: object) -> PositionEncoding:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown position encoding {encoding!r} (use one of {', '.join(ENCODINGS)})")
    return encoding  # type: ignore[return-value]


def _units(ch: str, encoding: str) -> int:
    """Code units of one code point in ``encoding``."""
    o = ord(ch)
    if encoding == "utf-32" or o < 0x80:
        return 1
    if encoding == "utf-16":
        return 2 if o > 0xFFFF else 1
    return 2 if o < 0x800 else 3 if o < 0x10000 else 4


_CODECS = {"utf-16": ("utf-16-le", 2), "utf-8": ("utf-8", 1)}


def _width(piece: str, encoding: str) -> int:
    """Code units of a string in ``encoding`` (the sum of ``_units`` over its code points, at C speed:
    a diagnostic's range on a long line must not walk the line in Python; lone surrogates count as
    ``_units`` counts them)."""
    if encoding == "utf-32" or piece.isascii():
        return len(piece)
    codec, size = _CODECS[encoding]
    return len(piece.encode(codec, "surrogatepass")) // size


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


class LineIndex:
    """Where each line of a text starts and ends, to convert LSP positions to code-point offsets and back."""

    def __init__(self, text: str) -> None:
        self.text = text
        breaks = list(_LINE_BREAK.finditer(text))
        self.starts = [0] + [m.end() for m in breaks]
        self.ends = [m.start() for m in breaks] + [len(text)]  # end of each line's content, before its break

    def __len__(self) -> int:
        return len(self.starts)

    def offset(self, line: int, character: int, encoding: str = "utf-16", clamp_lines: bool = True) -> int:
        """Code-point offset of (line, character).

        A character past the line's end means the line's end (as LSP specifies); a line past the
        last one means the end of the text, or is an error when ``clamp_lines`` is False. A
        character inside one code point (a UTF-16 surrogate pair, a UTF-8 multi-byte sequence)
        is an error.
        """
        line, character = _count(line, "line"), _count(character, "character")
        if line >= len(self.starts):
            if clamp_lines:
                return len(self.text)
            raise ValueError(f"line {line} is past the end of the document ({len(self.starts)} lines)")
        start, end = self.starts[line], self.ends[line]
        if encoding == "utf-32" or self.text[start:end].isascii():
            return min(start + character, end)
        units = 0
        for i in range(start, end):
            if units == character:
                return i
            ch = self.text[i]
            units += _units(ch, encoding)
            if units > character:
                what = "surrogate pair" if encoding == "utf-16" else f"{encoding} byte sequence"
                raise ValueError(f"position {line}:{character} is inside the {what} of {ch!r} (U+{ord(ch):04X}); "
                                 f"positions must fall between characters")
        return end

    def position(self, offset: int, encoding: str = "utf-16") -> tuple[int, int]:
        """(line, character) of a code-point offset; an offset inside a line break maps to the line's end."""
        if not 0 <= offset <= len(self.text):
            raise ValueError(f"offset {offset} is outside the text [0, {len(self.text)}]")
        line = bisect.bisect_right(self.starts, offset) - 1
        piece = self.text[self.starts[line]:min(offset, self.ends[line])]
        return line, _width(piece, encoding)

    def lsp_range(self, start: int, end: int, encoding: str = "utf-16") -> dict[str, dict[str, int]]:
        """An LSP Range dict for the code-point span [start, end)."""
        (l0, c0), (l1, c1) = self.position(start, encoding), self.position(end, encoding)
        return {"start": {"line": l0, "character": c0}, "end": {"line": l1, "character": c1}}


def _lsp_position(rng: Mapping, key: str, what: str) -> tuple[int, int]:
    p = rng.get(key)
    if not isinstance(p, Mapping):
        raise TypeError(f"{what}.{key} must be a {{line, character}} object, got {p!r}")
    if "line" not in p or "character" not in p:
        raise ValueError(f"{what}.{key} needs 'line' and 'character', got {dict(p)!r}")
    return _count(p["line"], f"{what}.{key}.line"), _count(p["character"], f"{what}.{key}.character")


def apply_content_changes(text: str, changes: Iterable[Mapping[str, Any]], encoding: str = "utf-16") -> str:
    """Apply LSP TextDocumentContentChangeEvents in order and return the new text.

    Each change is ``{"range": {"start": {line, character}, "end": {...}}, "text": str}`` (the
    range refers to the text as left by the previous change) or ``{"text": str}``, which
    replaces the whole text. Raises TypeError/ValueError naming the offending change.
    """
    check_encoding(encoding)
    if isinstance(changes, (str, bytes, Mapping)) or not isinstance(changes, Iterable):
        raise TypeError(f"changes must be a list of content-change objects, got {type(changes).__name__}")
    for i, change in enumerate(changes):
        what = f"content change {i}"
        if not isinstance(change, Mapping):
            raise TypeError(f"{what} must be an object with 'text' (and 'range'), got {change!r}")
        new = change.get("text")
        if not isinstance(new, str):
            raise TypeError(f"{what}: 'text' must be a string, got {new!r}")
        check_text(new, f"{what} text")
        rng = change.get("range")
        if rng is None:
            text = new
            continue
        if not isinstance(rng, Mapping):
            raise TypeError(f"{what}: 'range' must be a {{start, end}} object, got {rng!r}")
        s_pos, e_pos = _lsp_position(rng, "start", f"{what} range"), _lsp_position(rng, "end", f"{what} range")
        index = LineIndex(text)
        try:
            start, end = index.offset(*s_pos, encoding), index.offset(*e_pos, encoding)
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        if end < start:
            raise ValueError(f"{what}: range end {e_pos[0]}:{e_pos[1]} is before its start {s_pos[0]}:{s_pos[1]}")
        text = text[:start] + new + text[end:]
    return text


def utf8_to_offset(data: bytes, byte: int, what: str = "byte offset") -> int:
    """Code-point offset of a UTF-8 byte offset into ``data``; it must fall between characters."""
    _count(byte, what)
    if byte > len(data):
        raise ValueError(f"{what} {byte} is past the end of the text ({len(data)} UTF-8 bytes)")
    if byte < len(data) and data[byte] & 0xC0 == 0x80:
        raise ValueError(f"{what} {byte} is inside a UTF-8 multi-byte sequence")
    return len(data[:byte].decode("utf-8"))


@dataclass(frozen=True)
class ChangedRange:
    """A span of text whose tokens' outputs changed: code points [start, end) and its LSP range."""

    start: int
    end: int
    range: dict[str, dict[str, int]]


def merge_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of code-point spans as sorted, disjoint spans (touching spans merge)."""
    out: list[list[int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]
