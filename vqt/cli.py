"""Command-line entry point: ``vqt demo`` (and ``python -m vqt``)."""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Optional, Sequence

import torch


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo_model, demo_revisions
    from .text import TextDocument
    from .tokenizer import Tokenizer

    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    tok = Tokenizer.default()
    model = demo_model(tok, dtype=dtype, seed=args.seed)
    print(f"model: {model.describe()} (untrained, k-means codebooks)")
    revs = list(demo_revisions())
    doc = TextDocument(model, tok, revs[0][1], position_mode=args.positions)
    print(f"document: {len(doc.doc)} tokens, positions {args.positions}, backend {doc.doc.backend}\n")
    header = f"{'edit':<20} {'tokens':>6} {'dirty per layer':<18} {'flips':<14} {'MAC ratio':>9} {'prefix':>7} {'ms':>7}  exact"
    print(header)
    print("-" * len(header))
    ratios, prefix, all_exact = [], [], True
    for what, text in revs[1:]:
        st = doc.set_text(text)
        exact = "-"
        if args.verify:
            out = model.forward_dense(doc.doc.token_ids, doc.doc.positions)
            ok = torch.equal(out.codes, doc.doc.codes) and torch.allclose(out.hidden, doc.doc.hidden,
                                                                          atol=1e-9 if dtype == torch.float64 else 1e-4)
            all_exact &= ok
            exact = "yes" if ok else "NO"
        ratios.append(st.ratio)
        prefix.append(st.prefix_ratio)
        print(f"{what:<20} {st.n_tokens:>6} {str(st.dirty_per_layer):<18} {str(st.flips_per_layer):<14} "
              f"{st.ratio:>8.1f}x {st.prefix_ratio:>6.1f}x {st.seconds * 1e3:>7.1f}  {exact}")
    print(f"\nmedian MAC ratio vs dense {statistics.median(ratios):.1f}x (prefix reuse {statistics.median(prefix):.1f}x)"
          f" over {len(ratios)} edits" + ("; every step matched the dense forward" if args.verify and all_exact else ""))
    return 0 if all_exact else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vqt", description="Incremental Transformer inference with vector-quantized attention.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="replay a short built-in edit history, checking every step against a dense forward")
    d.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    d.add_argument("--positions", choices=["stable", "canonical"], default="stable")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-verify", dest="verify", action="store_false", help="skip the dense comparison")
    d.set_defaults(func=_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
