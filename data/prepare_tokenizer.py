"""Train the byte-level BPE tokenizer `data/tokenizer.json` on a sample of the Anarchism history.

Every `--every`-th revision of the MediaWiki XML history is streamed with
`vqt.histories.formats` and fed to the `tokenizers` BPE trainer. The four API-JSON articles
(shared/data/wiki/api) are held out for evaluation and never read here.

Run from the project root:  RAYON_NUM_THREADS=1 PYTHONPATH=. python3 data/prepare_tokenizer.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from vqt.histories.formats import iter_history

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "wiki" / "enwiki-anarchism-history.xml.lzma"
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]  # ids 0 and 1, in this order


def sample_texts(source: Path, every: int) -> Iterator[str]:
    """Texts of every `every`-th revision (empty ones left out), with a progress bar."""
    for index, rev in enumerate(tqdm(iter_history(source), desc="revisions", unit="rev")):
        if index % every == 0 and rev["text"]:
            yield rev["text"]


def build_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (no prefix space, so encodings concatenate) trained on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # tqdm over the revisions reports progress instead
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="MediaWiki history to sample")
    parser.add_argument("--every", type=int, default=25, help="keep every N-th revision")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "tokenizer.json")
    args = parser.parse_args()

    start = time.perf_counter()
    tokenizer = build_tokenizer(sample_texts(args.source, args.every), args.vocab_size)
    ids = [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != [0, 1]:
        raise SystemExit(f"special tokens got ids {ids}, expected [0, 1]")
    tokenizer.save(str(args.out))
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, "
        f"vocab {tokenizer.get_vocab_size()}) in {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
