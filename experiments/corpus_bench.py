"""Corpus replay throughput: histories/s and edits/s in one process, in 2 local worker processes and on Ray.

The corpus is the Rust RFC texts of the shared git bundle (each file's history a document);
the model is the shipped one. Ray runs on a local cluster of --workers CPUs whose start-up
(`ray.init`) is timed separately from the replays; each replay's time includes planning
(reading the histories) and loading the model in each worker. Every configuration runs
--repeats times and the medians are reported, with the records checked equal to the
one-process replay's (wall-clock fields excepted).

    python experiments/corpus_bench.py --path-glob 'text/00*.md' --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from vqt.apps.corpus import load_for_replay
from vqt.histories.corpus_replay import ReplayOptions, replay_corpus, without_wall_clock
from vqt.histories.sources import expand_inputs

BUNDLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "git" / "rust-rfcs.bundle"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=str(BUNDLE))
    p.add_argument("--path-glob", default="text/00*.md", help="RFC files replayed (default: the 28 of 00xx)")
    p.add_argument("--model", default=None, help="default: the shipped model")
    p.add_argument("--prefix-tokens", type=int, default=512, help="replay the first N tokens of each document "
                   "(0: whole documents)")
    p.add_argument("--max-revisions", type=int, default=40, help="per history")
    p.add_argument("--max-edits", type=int, default=None, help="per work unit (default: every edit)")
    p.add_argument("--range-revisions", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    inputs = expand_inputs([args.bundle], args.path_glob)
    options = ReplayOptions(prefix_tokens=args.prefix_tokens or None, max_edits=args.max_edits, baselines=False,
                            range_revisions=args.range_revisions, max_revisions=args.max_revisions)
    load = partial(load_for_replay, args.model, "float32", None)
    print(f"{len(inputs)} RFC histories ({args.path_glob}), first {args.prefix_tokens or 'all'} tokens, at most {args.max_revisions} "
          f"revisions and {args.max_edits or 'all'} edits per history, no baselines, {args.repeats} repeats")

    def timed(**kw) -> list:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as out:
                runs.append(replay_corpus(inputs, load, options, out=out if kw.get("ray") is not None else None,
                                          **kw))
        return runs

    results = {"1 process": timed(), f"--workers {args.workers}": timed(workers=args.workers)}
    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    startup = time.perf_counter() - t0
    results[f"Ray, {args.workers} CPUs"] = timed(ray="", workers=args.workers)
    ray.shutdown()

    reference = without_wall_clock(results["1 process"][0].rows)
    base = statistics.median(r.seconds for r in results["1 process"])
    print(f"\nRay start-up (ray.init, local cluster of {args.workers} CPUs): {startup:.1f} s, not included below\n")
    print("| executor | seconds (median) | histories/s | edits/s | speedup vs 1 process | records equal |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        sec = statistics.median(r.seconds for r in runs)
        histories = len({s["history"] for s in runs[0].statuses})
        edits = len(runs[0].rows)
        equal = all(without_wall_clock(run.rows) == reference for run in runs)
        print(f"| {name} | {sec:.1f} | {histories / sec:.2f} | {edits / sec:.1f} | {base / sec:.2f}x | "
              f"{'yes' if equal else 'NO'} |")
    print(f"\n{histories} histories, {edits} edits per run; load average of this machine at the end "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other processes slow the parallel runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
