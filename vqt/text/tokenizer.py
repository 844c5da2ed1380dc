"""Tokenizer wrapper on HF ``tokenizers``: ids plus code-point offsets, and the project's default tokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer

DATA_DIR = Path(os.environ.get("VQT_DATA", Path(__file__).resolve().parents[2] / "data"))
DEFAULT_TOKENIZER = DATA_DIR / "tokenizer.json"


class Tokenizer:
    """Encodes text to token ids. Offsets are Unicode code points (Python str indices)."""

    def __init__(self, hf: _HFTokenizer) -> None:
        self.hf = hf

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} does not exist")
        try:
            return cls(_HFTokenizer.from_file(str(p)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{p} is not a tokenizers JSON file: {e}") from None

    @classmethod
    def default(cls) -> "Tokenizer":
        """The byte-level BPE trained by data/prepare_tokenizer.py (override the folder with $VQT_DATA)."""
        return cls.from_file(DEFAULT_TOKENIZER)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) code-point span in ``text``."""
        check_text(text, "text")
        enc = self.hf.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


def check_text(text: object, what: str) -> None:
    """Text must be a str that UTF-8 can encode (no lone surrogates)."""
    if isinstance(text, (bytes, bytearray)):
        raise TypeError(f"{what} must be str, got bytes: decode it first (e.g. data.decode('utf-8'))")
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode at code point {e.start}: {text[e.start:e.end]!r} "
                         f"(a lone surrogate?)") from None
