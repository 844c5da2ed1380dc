"""Training and evaluation text from the Wikipedia histories in ../shared/data, tokenized and cached.

Training text: a sample of revisions of the Anarchism history, and (for adapting pretrained
models) the Rust RFC texts of the git bundle. Held out for evaluation: the four MediaWiki API
JSON articles, never used for training or for the tokenizer.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from vqt.histories.formats import iter_history
from vqt.text.tokenizer import Tokenizer

SHARED_DATA = Path(os.environ.get("VQT_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
WIKI = SHARED_DATA / "wiki"
ANARCHISM = WIKI / "enwiki-anarchism-history.xml.lzma"
HELDOUT = sorted((WIKI / "api").glob("*.json.xz")) if (WIKI / "api").is_dir() else []
RFC_BUNDLE = SHARED_DATA / "git" / "rust-rfcs.bundle"
CACHE = Path(os.environ.get("VQT_CACHE", Path.home() / ".cache" / "vqt"))
EOS = 0  # <|endoftext|> in the project tokenizer


def require_data(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is absent: the shared Wikipedia histories are expected in {WIKI} "
                                f"(set $VQT_SHARED_DATA to the folder that holds wiki/)")
    return path


def training_texts(every: int = 25, limit: Optional[int] = None) -> Iterator[str]:
    """Every ``every``-th revision of the Anarchism history (the tokenizer saw the same sample)."""
    for i, rev in enumerate(iter_history(require_data(ANARCHISM))):
        if limit is not None and i >= limit * every:
            break
        if i % every == 0 and rev["text"]:
            yield rev["text"]


def rfc_texts(limit: Optional[int] = None) -> Iterator[str]:
    """The latest text of each Rust RFC (text/*.md) in the bundle, cloned once under $VQT_CACHE."""
    import subprocess

    clone = CACHE / "rust-rfcs"
    if not (clone / ".git").is_dir():
        require_data(RFC_BUNDLE)
        clone.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", str(RFC_BUNDLE), str(clone)], check=True)
    for i, path in enumerate(sorted((clone / "text").glob("*.md"))):
        if limit is not None and i >= limit:
            break
        yield path.read_text(encoding="utf-8", errors="replace")


def heldout_texts(paths: Optional[Sequence[str | Path]] = None) -> list[str]:
    """The latest revision of each history in ``paths`` (default: the held-out API-JSON articles)."""
    out = []
    for path in HELDOUT if paths is None else paths:
        last = ""
        for rev in iter_history(path):
            last = rev["text"] or last
        out.append(last)
    if not out:
        raise FileNotFoundError(f"no held-out articles under {WIKI / 'api'}")
    return out


def tokenized(name: str, texts: Iterator[str] | list[str], tokenizer: Tokenizer, key: str) -> np.ndarray:
    """Concatenated token ids (EOS between texts), cached under $VQT_CACHE by name and key."""
    digest = hashlib.sha256(f"{key}|{tokenizer.hf.to_str()}".encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(EOS)
    arr = np.asarray(ids, dtype=np.uint16 if tokenizer.vocab_size < 65536 else np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


def train_tokens(tokenizer: Tokenizer, every: int = 25) -> np.ndarray:
    return tokenized("train", training_texts(every), tokenizer, f"anarchism/{every}")


def heldout_tokens(tokenizer: Tokenizer) -> np.ndarray:
    return tokenized("heldout", heldout_texts(), tokenizer, "api-latest")
