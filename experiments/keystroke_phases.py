"""Where a keystroke's time goes: the C++ layer step's phases, the Python around them, and the LM head.

    python experiments/keystroke_phases.py                                  # shipped SmolLM2, 4k tokens
    python experiments/keystroke_phases.py --model demo --tokens 1000 --keystrokes 26
    python experiments/keystroke_phases.py --tokens 16000 --spots-in 1000   # typed where the 1k run types

Types the keystrokes of ``experiments/lsp_latency.py`` (a phrase typed then backspaced at spots spread over
held-out text) into a ``TextDocument`` in this process on the ``cpu`` backend, with the layer step's phase
clock on (``set_phase_timing`` in ``vqt/csrc/vqt_ops_cpu.cpp``: wall time between marks on the calling
thread, summed over every layer of every keystroke), and prints milliseconds per keystroke for each phase:

- qkv: the dirty rows' RMSNorm and q/k/v product (and sink scores); rope: their angles and rotation;
- changed keys: the layer's removed and added keys copied into float64 blocks; affected rows: which clean
  queries see them, and whether a delta update or a full row is cheaper;
- delta rows, full rows: the float64 attention (on the threads); requantize: outputs, certified skips,
  searches, output-table lookups; correction: quantize-then-correct's W_corr product; mlp: the residual,
  RMSNorm and SwiGLU products; commit: the rows stored for the next layer;
- between layer steps: the plan, the Python loop and the final norm; surprisal: the LM head and
  log-softmax of the rows whose prediction changed (what the server computes before it publishes).

Timings are wall clock on a shared machine: compare phases within one run, not across runs. The phase
clock costs a clock read per mark (a dozen per layer), nothing when off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lsp_latency import document, keystrokes, open_document, type_into  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-vqt", help="a shipped model name or a model folder (default: "
                   "smollm2-vqt; demo: the small built-in model)")
    p.add_argument("--dtype", choices=["float32", "bf16"], default="bf16", help="products (default bf16)")
    p.add_argument("--tokens", type=int, default=4000, help="document length in tokens (default 4000)")
    p.add_argument("--keystrokes", type=int, default=52, help="timed keystrokes (default 52: two spots)")
    p.add_argument("--warmup", type=int, default=3, help="untimed keystrokes first (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--spots-in", type=int, default=None, metavar="TOKENS",
                   help="type at spots spread over the first TOKENS tokens (as lsp_latency.py --spots shared does "
                        "for its shortest length), so that runs at several --tokens type into the same text; "
                        "default: spots spread over the whole document")
    args = p.parse_args()
    for name in ("tokens", "keystrokes", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.spots_in is not None and not 1 <= args.spots_in <= args.tokens:
        p.error(f"--spots-in must be between 1 and --tokens ({args.tokens}), got {args.spots_in}")
    if args.warmup < 0:
        p.error(f"--warmup must be at least 0, got {args.warmup}")

    import torch

    from vqt.apps.loading import load_model

    torch.set_num_threads(args.threads)
    model, _, tok = load_model(args.model, args.dtype)[:3]
    text = document(tok, args.tokens)
    doc = open_document(model, tok, text)
    if doc.doc.backend.name != "cpu":
        sys.exit(f"the phase clock is the fused cpu backend's; this document runs on {doc.doc.backend.name!r}")
    ext = doc.doc.backend.ext  # the fused CPU extension (its phase clock)

    in_steps = [0.0]  # seconds in layer steps during the current keystroke
    original = doc.doc.backend.layer_step

    def timed_step(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            in_steps[0] += time.perf_counter() - t0

    doc.doc.backend.layer_step = timed_step
    totals, outside, lm_head = [], [], []
    spots = text if args.spots_in is None else document(tok, args.spots_in)  # (a prefix of text)
    ext.set_phase_timing(args.warmup == 0)
    for i, (change_ms, surprisal_ms) in enumerate(type_into(doc, keystrokes(spots, args.keystrokes + args.warmup))):
        if i >= args.warmup:
            totals.append(change_ms + surprisal_ms)
            outside.append(change_ms - in_steps[0] * 1e3)
            lm_head.append(surprisal_ms)
        in_steps[0] = 0.0
        if i + 1 == args.warmup:
            ext.set_phase_timing(True)  # from the next keystroke on
    phases = ext.phase_times()
    ext.set_phase_timing(False)
    n, calls = len(totals), phases.pop("calls")
    if calls == 0:
        sys.exit(f"no layer step ran in C++ (model {args.model!r} has no quantized layers?): nothing to show")
    rows = [(name, ms / n) for name, ms in phases.items()]
    rows += [("between layer steps", statistics.fmean(outside)), ("surprisal", statistics.fmean(lm_head))]
    total = statistics.fmean(totals)
    where = "the whole document" if args.spots_in is None else f"its first {args.spots_in} tokens"
    print(f"{args.model}, {len(doc.doc)} tokens, {n} keystrokes at spots spread over {where}, {args.threads} "
          f"thread(s), {args.dtype} products; {calls / n:.0f} layer steps per keystroke")
    print(f"{'phase':<22} {'ms/keystroke':>12} {'share':>7}")
    for name, ms in rows:
        print(f"{name:<22} {ms:>12.2f} {ms / total:>7.1%}")
    print(f"{'total (mean)':<22} {total:>12.2f} {sum(ms for _, ms in rows) / total:>7.1%}")
    print(f"(median keystroke {statistics.median(totals):.1f} ms; the rest is the clock's reads and the time "
          f"between the last mark and the step's return)")


if __name__ == "__main__":
    main()
