"""Soak test: a whole real history through one ``TextDocument``, verified against dense forwards as it goes.

    python experiments/soak.py --out runs/soak                      # the whole Anarchism history (15,180 revisions)
    python experiments/soak.py --out runs/soak-200 --limit 200      # the first 200 revisions

Streams the history (default: the Anarchism article's, ../shared/data) and applies every revision
to one document of the shipped model (``data/vqt-small``, float32, ``cpu`` backend, stable
positions) as the atomic text edits between consecutive revisions (``vqt.histories.edits``), each
edit one ``TextDocument.edit``. Nothing is skipped: blankings (a revision that empties the article)
and their reverts are applied like any other edit and counted. After every revision the document's
text must equal the revision's; an edit that fails, or a text that differs, stops the run with
status 1 after printing what failed.

The first document is verified as built (so that every later RSS reading comes after one dense
forward); every ``--every`` revisions (and at the last one) a checkpoint verifies the state against
a dense forward of the whole document (``vqt.histories.replay.dense_check``: the contract, hidden states
within the float tolerance replay uses) and appends one JSON line to ``OUT/soak.jsonl``: revision
index, tokens, edits/s since the last checkpoint (time in ``TextDocument.edit`` only:
re-tokenization and the engine update), RSS (``VmRSS``, before and after the dense forward) and the
verification result. ``OUT/soak.png`` plots RSS, edits/s and tokens over revisions (needs
matplotlib: ``pip install 'vqt[plots]'``; ``--no-plot`` skips it). The exit status is 1 when a
verification failed or a revision could not be applied.

Resumable: rerunning the same command continues from the last checkpoint in ``OUT/soak.jsonl``
(the document is rebuilt from that revision's text with a dense pass, so positions restart
canonical); other settings in the same folder are refused, ``--restart`` starts over. A history
file holding several pages replays each page as its own document.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vqt._errors import UserError  # noqa: E402
from vqt._memory import proc_status_kb, release_free_memory  # noqa: E402
from vqt._extras import require  # noqa: E402
from vqt.apps.loading import load_model  # noqa: E402
from vqt.engine.options import DocumentOptions  # noqa: E402
from vqt.histories.edits import RevisionStats, revision_edits  # noqa: E402
from vqt.histories.formats import iter_history  # noqa: E402
from vqt.histories.replay import dense_check  # noqa: E402
from vqt.ops import get_backend  # noqa: E402
from vqt.text.document import TextDocument  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki" / "enwiki-anarchism-history.xml.lzma"
LOG, PLOT = "soak.jsonl", "soak.png"
# The settings a resumed run must share with the run that wrote the log.
SETTINGS = ("data", "model", "backend", "positions", "start", "limit", "every")


def rss_mb() -> Optional[float]:
    """This process's resident set size in MB (VmRSS of /proc/self/status; None where there is none)."""
    kb = proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


class _Feed:
    """The revisions of a stream, remembering the current one and the one before (what a pair's texts are)."""

    def __init__(self, revisions: Iterable[Mapping[str, Any]], start: int) -> None:
        self.revisions = revisions
        self.index = start - 1  # index in the history of ``current``
        self.previous: Optional[Mapping[str, Any]] = None
        self.current: Optional[Mapping[str, Any]] = None

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for rev in self.revisions:
            self.previous, self.current = self.current, rev
            self.index += 1
            yield rev


def verify(model, doc: TextDocument) -> dict[str, Any]:
    """The document's state against a dense forward of its tokens and positions."""
    t0 = time.perf_counter()
    exact, codes_differ, hidden_diff = dense_check(model, doc)
    return {"exact": bool(exact), "codes_differ": codes_differ, "max_hidden_diff": hidden_diff,
            "verify_s": round(time.perf_counter() - t0, 3)}


def _read_log(path: Path, settings: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """(the checkpoints of a previous run in ``path`` made with ``settings``, whether that run completed);
    a run with other settings is refused."""
    if not path.is_file():
        return [], False
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [r for r in records if r["kind"] == "start"]
    if starts:
        before = starts[0]["settings"]
        for key in SETTINGS:
            if before.get(key) != settings.get(key):
                raise UserError(f"--out {path.parent} holds a soak run with another {key} ({before.get(key)!r}, now "
                                f"{settings.get(key)!r}): use another --out, the same settings to resume, or --restart")
    return [r for r in records if r["kind"] == "checkpoint"], bool(records) and records[-1]["kind"] == "end"


def summarize(checkpoints: Sequence[dict[str, Any]], session: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over every checkpoint of the log; RSS from this process's checkpoints (warm-up: its first)."""
    rates = [c["edits_per_s"] for c in checkpoints if c["edits_per_s"] is not None]
    apply_s = sum(c["apply_s"] for c in checkpoints)
    edits = sum(c["edits_since"] for c in checkpoints)
    out = {"revisions_applied": sum(c["revisions_since"] for c in checkpoints), "edits": edits,
           "apply_s": round(apply_s, 3), "edits_per_s_overall": edits / apply_s if apply_s else None,
           "edits_per_s_median": statistics.median(rates) if rates else None,
           "blankings": sum(c["blankings_since"] for c in checkpoints),
           "restores": sum(c["restores_since"] for c in checkpoints),
           "reverts": sum(c["reverts_since"] for c in checkpoints),
           "verified": len(checkpoints), "failures": sum(not c["exact"] for c in checkpoints),
           "wall_s": round(sum(c["wall_s"] for c in checkpoints), 3)}
    if session and session[0]["rss_mb"] is not None:
        warm, end = session[0], session[-1]
        out.update(rss_warmup_mb=warm["rss_mb"], rss_end_mb=end["rss_mb"], tokens_warmup=warm["tokens"],
                   tokens_end=end["tokens"], rss_change=(end["rss_mb"] - warm["rss_mb"]) / warm["rss_mb"])
        # A leak shows as growth at equal document size: the earliest checkpoint after warm-up whose
        # document was within 5% of the final one's length, against the end.
        same = [c for c in session[1:-1] if c["rss_mb"] is not None and abs(c["tokens"] - end["tokens"]) <=
                0.05 * end["tokens"]]
        if same:
            out.update(rss_same_size_mb=same[0]["rss_mb"], tokens_same_size=same[0]["tokens"],
                       revision_same_size=same[0]["revision"],
                       rss_same_size_change=(end["rss_mb"] - same[0]["rss_mb"]) / same[0]["rss_mb"])
        out.update(rss_trend(session[1:]))
    return out


def rss_trend(checkpoints: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """RSS against document size over the checkpoints after warm-up: a least-squares line RSS = a + b *
    tokens, and how far the last third of the run sits above the first third at equal size (the mean of
    their relative residuals; a leak shows as a positive drift), with the checkpoints' own scatter around
    the line (5th and 95th percentile of the residuals). Empty with fewer than six checkpoints."""
    pts = [(c["tokens"], c["rss_mb"]) for c in checkpoints if c["rss_mb"] is not None]
    if len(pts) < 6:
        return {}
    tokens, rss = (np.array(v, dtype=np.float64) for v in zip(*pts))
    (a, b), *_ = np.linalg.lstsq(np.stack([np.ones_like(tokens), tokens], 1), rss, rcond=None)
    rel = rss / (a + b * tokens) - 1
    third = len(rel) // 3
    return {"rss_fit_mb": float(a), "rss_fit_kb_per_token": float(b * 1024), "rss_fit_points": len(rel),
            "rss_drift": float(rel[-third:].mean() - rel[:third].mean()),
            "rss_scatter": (float(np.percentile(rel, 5)), float(np.percentile(rel, 95)))}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"revisions applied: {s['revisions_applied']}, edits: {s['edits']} "
             f"(blankings: {s['blankings']}, restored by the next revision: {s['restores']}; reverts: {s['reverts']})"]
    if s["edits_per_s_median"] is not None:
        lines.append(f"edits/s: median {s['edits_per_s_median']:.1f} over checkpoints, overall "
                     f"{s['edits_per_s_overall']:.1f} ({s['apply_s']:.1f} s applying edits, {s['wall_s']:.1f} s in all, "
                     f"{s['revisions_applied'] / max(s['wall_s'], 1e-9):.2f} revisions/s)")
    if "rss_warmup_mb" in s:
        lines.append(f"RSS: {s['rss_warmup_mb']:.0f} MB at warm-up ({s['tokens_warmup']} tokens) vs "
                     f"{s['rss_end_mb']:.0f} MB at the end ({s['tokens_end']} tokens): {100 * s['rss_change']:+.1f}%")
    if "rss_same_size_mb" in s:
        lines.append(f"RSS at the same document size: {s['rss_same_size_mb']:.0f} MB at revision "
                     f"{s['revision_same_size']} ({s['tokens_same_size']} tokens) vs {s['rss_end_mb']:.0f} MB at the "
                     f"end: {100 * s['rss_same_size_change']:+.1f}%")
    if "rss_drift" in s:
        lo, hi = s["rss_scatter"]
        lines.append(f"RSS against document size ({s['rss_fit_points']} checkpoints after warm-up: "
                     f"{s['rss_fit_mb']:.0f} MB + {s['rss_fit_kb_per_token']:.1f} KB/token): the last third of the run "
                     f"sits {100 * s['rss_drift']:+.1f}% from the first third at equal size (checkpoint scatter "
                     f"{100 * lo:+.0f}% to {100 * hi:+.0f}%)")
    lines.append(f"verification failures: {s['failures']} of {s['verified']} checkpoints")
    return "\n".join(lines)


def plot(checkpoints: Sequence[dict[str, Any]], path: Path) -> None:
    """RSS and edits/s (and tokens) over revisions, one panel each."""
    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    x = [c["revision"] for c in checkpoints]
    series = lambda key: [c.get(key) if c.get(key) is not None else float("nan") for c in checkpoints]  # noqa: E731
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    axes[0].plot(x, series("rss_mb"), marker=".", label="before the dense check")
    axes[0].plot(x, series("rss_after_verify_mb"), marker=".", alpha=0.5, label="after it")
    for ax, key, label in ((axes[0], None, "RSS (MB)"), (axes[1], "edits_per_s", "edits/s"),
                           (axes[2], "tokens", "document tokens")):
        if key is not None:
            ax.plot(x, series(key), marker=".")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    bad = [c for c in checkpoints if not c["exact"]]
    if bad:
        axes[0].scatter([c["revision"] for c in bad], [c["rss_mb"] for c in bad], c="red", label="verification failed")
    axes[0].legend()
    axes[2].set_xlabel("revision")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DATA), help="history file (default: the Anarchism history in ../shared/data)")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model data/vqt-small)")
    p.add_argument("--backend", default="cpu", help="engine backend (default cpu)")
    p.add_argument("--positions", default="stable", choices=["stable", "canonical"])
    p.add_argument("--start", type=int, default=0, help="index of the first revision (the document starts as its "
                   "text, by a dense pass)")
    p.add_argument("--limit", type=int, default=None, help="apply at most this many revisions after --start")
    p.add_argument("--every", type=int, default=100, help="verify and log every N revisions (default 100)")
    p.add_argument("--out", required=True, help="folder for soak.jsonl and soak.png")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--restart", action="store_true", help="discard a previous run's log in --out instead of resuming")
    p.add_argument("--no-plot", action="store_true", help="do not write soak.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():  # (scoped, so that a caller in the same process keeps its settings)
            return run(args)
    except UserError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    for name, value, least in (("--start", args.start, 0), ("--limit", args.limit, 1), ("--every", args.every, 1),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise UserError(f"{name} {value}: expected an integer >= {least}")
    if not Path(args.data).is_file():
        raise UserError(f"--data {args.data}: no such file (the shared data folder, see ../shared/data/README.md)")
    if not args.no_plot:
        require("matplotlib", "plots")  # before the long work, not after it
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e})") from e
    log_path = out / LOG
    settings = {k: getattr(args, k) for k in SETTINGS}
    if args.restart and log_path.exists():
        log_path.unlink()
    previous, complete = _read_log(log_path, settings)
    start = previous[-1]["revision"] if previous else args.start
    stop = None if args.limit is None else args.start + args.limit  # index of the last revision applied
    if complete:
        print(f"soak: {log_path} holds a completed run (to revision {start}); --restart runs it again")
        s = summarize(previous, [])
        print(format_summary(s))
        return int(s["failures"] > 0)

    model, name, tok = load_model(args.model, torch.float32)
    options = DocumentOptions.make(backend=get_backend(args.backend, model.device).name, position_mode=args.positions)
    print(f"model: {name}: {model.describe()}; backend {options.backend}, positions {args.positions}, "
          f"{args.threads} thread{'s' if args.threads > 1 else ''}")
    print(f"data: {args.data}, revisions {start}..{stop if stop is not None else 'end'}"
          + (f" (resuming {out / LOG} at revision {start})" if previous else ""))
    log = open(log_path, "a")
    write = lambda record: (log.write(json.dumps(record) + "\n"), log.flush())  # noqa: E731
    if not previous:
        write({"kind": "start", "settings": settings, "model": model.describe(), "time": time.time()})

    feed = _Feed(itertools.islice(iter_history(args.data), start, None if stop is None else stop + 1), start)
    pairs = revision_edits(feed, max_edit_chars=None, skip_identical=False, stats=RevisionStats())
    session: list[dict[str, Any]] = []
    doc: Optional[TextDocument] = None
    doc_id: Optional[str] = None
    window = {"revisions": 0, "edits": 0, "apply": 0.0, "blankings": 0, "restores": 0, "reverts": 0}
    t_window = time.perf_counter()
    last_blanking = False
    built = False
    total_edits = 0
    status = 0

    def checkpoint(index: int) -> dict[str, Any]:
        nonlocal t_window
        rss = rss_mb()  # before the dense forward
        result = verify(model, doc)
        rss_verify = rss_mb()  # with the dense forward's temporaries, which the allocator keeps for reuse
        release_free_memory()  # ... handed back, so the next checkpoint's RSS counts the document, not them
        record = {"kind": "checkpoint", "revision": index, "rev_id": feed.current["rev_id"],
                  "timestamp": feed.current.get("timestamp"), "tokens": len(doc.doc), "chars": len(doc.text),
                  "revisions_since": window["revisions"], "edits_since": window["edits"],
                  "apply_s": round(window["apply"], 4),
                  "edits_per_s": window["edits"] / window["apply"] if window["apply"] > 0 else None,
                  "blankings_since": window["blankings"], "restores_since": window["restores"],
                  "reverts_since": window["reverts"], "rss_mb": rss, "rss_after_verify_mb": rss_verify,
                  "wall_s": round(time.perf_counter() - t_window, 3), **result}
        write(record)
        session.append(record)
        rate = f"{record['edits_per_s']:.1f}" if record["edits_per_s"] is not None else "-"
        rss = f"{record['rss_mb']:.0f} MB" if record["rss_mb"] is not None else "-"
        tqdm.write(f"revision {index} (rev {record['rev_id']}): {record['tokens']} tokens, {rate} edits/s, RSS {rss}, "
                   + ("verified" if result["exact"] else
                      f"VERIFICATION FAILED ({result['codes_differ']} codes differ, max hidden diff "
                      f"{result['max_hidden_diff']:.3g})"))
        for key in window:
            window[key] = 0
        t_window = time.perf_counter()
        return record

    t0 = time.perf_counter()
    bar = tqdm(total=None if stop is None else stop - start, unit="rev", desc="soak", disable=args.quiet,
               smoothing=0.05)
    try:
        for pair in pairs:
            index, rev = feed.index, feed.current
            if doc is None or pair.doc_id != doc_id:  # the first pair of a document (or page): a dense pass
                doc, doc_id = TextDocument(model, tok, feed.previous["text"], options), pair.doc_id
                if not built:  # verify it too, so that every checkpoint's RSS comes after one dense forward
                    built = True
                    rss = rss_mb()
                    result = verify(model, doc)
                    write({"kind": "build", "revision": index - 1, "tokens": len(doc.doc), "rss_mb": rss,
                           "rss_after_verify_mb": rss_mb(), **result})
                    release_free_memory()
                    if not result["exact"]:
                        status = 1
                        tqdm.write(f"revision {index - 1}: the dense build does NOT match the dense forward: {result}")
                    t_window = time.perf_counter()
            for j, e in enumerate(pair.edits):
                t = time.perf_counter()
                try:
                    doc.edit(e.start, e.end, e.text)
                except Exception as err:  # noqa: BLE001  (printed, logged and fatal: never hidden)
                    traceback.print_exc()
                    message = (f"revision {index} (rev {rev['rev_id']}), edit {j} of {len(pair.edits)}: "
                               f"replace [{e.start}, {e.end}) of {len(doc.text)} characters by {len(e.text)}: "
                               f"{type(err).__name__}: {err}")
                    raise _ApplyFailed(message) from err
                window["apply"] += time.perf_counter() - t
                window["edits"] += 1
            if doc.text != rev["text"]:
                raise _ApplyFailed(f"revision {index} (rev {rev['rev_id']}): after its {len(pair.edits)} edits the "
                                   f"document's text ({len(doc.text)} characters) differs from the revision's "
                                   f"({len(rev['text'])})")
            total_edits += len(pair.edits)
            window["revisions"] += 1
            window["blankings"] += pair.flags.blanking
            window["reverts"] += pair.flags.revert
            window["restores"] += last_blanking and pair.flags.revert
            last_blanking = pair.flags.blanking
            bar.update(index - start - bar.n)
            elapsed = sum(c["apply_s"] for c in session) + window["apply"]
            bar.set_postfix(tokens=len(doc.doc), edits=total_edits,
                            edits_s=f"{total_edits / elapsed:.1f}" if elapsed else "-")
            if (index - args.start) % args.every == 0:
                checkpoint(index)
        if window["revisions"]:
            checkpoint(feed.index)
    except _ApplyFailed as failure:
        print(f"soak: FAILED to apply {failure}", file=sys.stderr)
        write({"kind": "error", "revision": feed.index, "error": str(failure)})
        status = 2
    finally:
        bar.close()
        log.close()
    checkpoints = previous + session
    s = summarize(checkpoints, session)
    s["seconds_this_run"] = round(time.perf_counter() - t0, 1)
    with open(log_path, "a") as f:
        f.write(json.dumps({"kind": "stopped" if status == 2 else "end", **s}) + "\n")
    print(format_summary(s))
    if checkpoints and not args.no_plot:
        plot(checkpoints, out / PLOT)
        print(f"log: {log_path}; plot: {out / PLOT}")
    elif checkpoints:
        print(f"log: {log_path}")
    return 1 if status or s["failures"] else 0


class _ApplyFailed(Exception):
    """A revision that could not be applied (the message names it); ends the soak with status 1."""


if __name__ == "__main__":
    sys.exit(main())
