"""`vqt replay` over a corpus (local processes or Ray) and `vqt summarize DIR` over saved records."""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Optional

from vqt.apps.loading import load_model
from vqt.apps.outputs import check_plot_folder, open_output
from vqt.histories.corpus_replay import CorpusRun, ReplayOptions, read_output, replay_corpus, to_records
from vqt.histories.replay import format_summary, summarize
from vqt.histories.sources import expand_inputs
from vqt.modeling.model import VQTModel
from vqt.text.tokenizer import Tokenizer



def wants_corpus(args: argparse.Namespace) -> bool:
    """Whether `vqt replay` runs as a corpus: a corpus option, several inputs, or a folder, glob or bundle
    (a single file, or a repository with --file, is one history replayed as before)."""
    one_history = args.file is not None or all((os.path.isfile(d) and not d.endswith(".bundle")) or
                                               (not os.path.exists(d) and not glob.has_magic(d)) for d in args.data)
    return bool(args.workers or args.ray is not None or args.out or args.path_glob or len(args.data) > 1
                or not one_history)


@functools.lru_cache(maxsize=1)
def load_for_replay(spec: Optional[str], dtype: str, tokenizer_path: Optional[str]) -> tuple[VQTModel, Tokenizer]:
    """(model, tokenizer) as `vqt replay` loads them, once per process; module-level, so a partial of it pickles."""
    model, _, tokenizer = load_model(spec, dtype, tokenizer_path)
    return model, tokenizer


def replayed_part(args: argparse.Namespace) -> str:
    """What of each document `vqt replay` replays, in words (for its first lines)."""
    part = f"the first {args.prefix_tokens} tokens of each document" if args.prefix_tokens else "whole documents"
    part += f" up to {args.max_tokens} tokens (--max-tokens)" if args.max_tokens else ""
    return part + (f" from revision {args.start_revision}" if getattr(args, "start_revision", 0) else "")


def replay_command(args: argparse.Namespace) -> int:
    """`vqt replay` over a corpus: plan, replay on the chosen executor, print the summary, save what was asked."""
    inputs = expand_inputs(args.data, args.path_glob or args.file)  # --file: a glob matching one path
    options = ReplayOptions(prefix_tokens=args.prefix_tokens, max_tokens=args.max_tokens, max_edits=args.max_edits,
                            baselines=not args.no_baselines,
                            verify=args.verify, positions=args.positions, backend=args.backend,
                            range_revisions=args.range_revisions, max_revisions=args.max_revisions,
                            strict=args.strict)
    check_plot_folder(args.plot)  # the command line's checks, before the long work
    jsonl = open_output("--jsonl", args.jsonl)
    model, _ = load_for_replay(args.model, args.dtype, args.tokenizer)  # a bad model fails here, before any worker
    print(f"model: {args.model or 'shipped'}: {model.describe()}")
    where = ("Ray " + (args.ray or "(local cluster)")) if args.ray is not None else \
        f"{args.workers or 1} local process{'es' if (args.workers or 1) > 1 else ''}"
    print(f"corpus: {len(inputs)} inputs; {where}; {replayed_part(args)}, positions {args.positions}, "
          f"backend {args.backend}" + (f"; records under {args.out}" if args.out else ""))
    done = 0

    def progress(status: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if not args.quiet:
            note = f"FAILED: {status['error']}" if status["error"] else f"{status['edits']} edits"
            if status["skipped"]:
                note += f"; skipped {status['skipped']} malformed revisions, first: {status['first_skipped']}"
            if status.get("over_guard"):
                note += f"; skipped {status['over_guard']} revision pairs over --max-tokens: {status['first_over_guard']}"
            print(f"[{done}] {status['history']} @{status['start']}: {note}", file=sys.stderr)

    run = replay_corpus(inputs, partial(load_for_replay, args.model, args.dtype, args.tokenizer), options,
                        workers=args.workers, out=args.out, ray=args.ray,
                        settings={"model": args.model, "dtype": args.dtype, "tokenizer": args.tokenizer},
                        progress=progress)
    if jsonl:
        with jsonl:
            jsonl.writelines(json.dumps(row) + "\n" for row in run.rows)
    return report(run, plot=args.plot, verify=args.verify)


def report(run: CorpusRun, plot: Optional[str] = None, verify: bool = False) -> int:
    """Print the corpus summary (histories, failures, throughput, the per-edit table); 1 if nothing to summarize."""
    histories = {s["history"] for s in run.statuses}
    failed = [s for s in run.statuses if s["error"]]
    print(f"{len(histories)} histories ({len(run.statuses)} work units), {len(run.rows)} edits, "
          f"{len({s['history'] for s in failed})} histories failed")
    for s in failed:
        print(f"  failed: {s['history']} (revisions from {s['start']}): {s['error']}")
    skipped = [s for s in run.statuses if s["skipped"]]
    if skipped:
        print(f"skipped {sum(s['skipped'] for s in skipped)} malformed revisions in {len(skipped)} work units "
              f"(first: {skipped[0]['first_skipped']}; --strict fails their histories instead)")
    guarded = [s for s in run.statuses if s.get("over_guard")]
    if guarded:
        print(f"skipped {sum(s['over_guard'] for s in guarded)} revision pairs of documents over the memory guard "
              f"(--max-tokens) in {len(guarded)} work units (first: {guarded[0]['first_over_guard']})")
    if run.replayed:
        print(run.throughput())
    if not run.rows:
        print("no edit was replayed")
        return 1
    records = to_records(run.rows)
    print(format_summary(summarize(records), len(records)))
    if plot:
        from vqt.apps.plots import plot_replay

        plot_replay(records, Path(plot))
        print(f"plots written to {plot}")
    if verify:
        bad = sum(not r.exact for r in records)
        print("verify: every edit matched the dense forward" if not bad else f"verify: {bad} edits DIFFER from dense")
        return int(bad > 0)
    return 0


def summarize_command(args: argparse.Namespace) -> int:
    """`vqt summarize DIR`: the summary table (and plots) of saved records, without replaying."""
    check_plot_folder(args.plot)
    rows, statuses = read_output(args.folder)
    return report(CorpusRun(statuses, rows, replayed=[], seconds=0.0), plot=args.plot)
