"""Typing latency of `vqt lsp`: didChange -> published result, incremental server vs the dense baseline.

    python experiments/lsp_latency.py                      # default model (shipped, else the demo model)
    python experiments/lsp_latency.py --model DIR --keystrokes 200
    python experiments/lsp_latency.py --model smollm2-vqt --tokens 1000 4000 16000 --dense-keystrokes 10

Replays typing into a document of about --tokens tokens (several lengths: one after the other) of
held-out text (the held-out Wikipedia articles in ../shared/data, repeated as needed; the built-in
demo revisions without them): at cursor spots spread over the
text, a phrase with an accented letter and an emoji is typed one character per didChange,
then deleted with backspace, one character per didChange. For every keystroke it times, from sending the
didChange, (a) the publishDiagnostics for that version and (b) the completion at the cursor,
requested right after the change. The same keystrokes are replayed against `vqt lsp --dense`,
which recomputes the whole document after each change. Both servers run one after the other
on this machine with pygls' LanguageClient; timings are wall-clock and noisy on a shared CPU.
With --in-process the same keystrokes are also applied to a ``TextDocument`` in this process (the
change and the surprisal, what the server does before it publishes), which separates the engine's
time from the server's, and the result is checked against a dense forward of the final text
(``dense_check``: the float32 contract, as ``vqt replay --verify`` applies it).

Where the typing happens: with several lengths the documents are prefixes of one text, and by default
(``--spots shared``) every length is typed into at the same spots, spread over the shortest document, so
that the length is the only thing that differs between the rows (what an edit costs depends on its
context: how many codes it flips, and so how many rows every later layer recomputes, varied up to
twofold between the spots of one text with SmolLM2). ``--spots own`` spreads each length's spots over that
document instead (different contexts per length). Each spot takes 26 keystrokes (the phrase typed, then
deleted), so ``--keystrokes`` sets how many spots are visited.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lsprotocol import types
from pygls.lsp.client import LanguageClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqt.apps.demo import demo_revisions  # noqa: E402
from vqt.apps.loading import model_tokenizer  # noqa: E402
from vqt.histories.corpus import heldout_texts  # noqa: E402
from vqt.text.tokenizer import Tokenizer  # noqa: E402

PHRASE = "a new café 😀 "
URI = "file:///typing.txt"


def document(tokenizer: Tokenizer, n_tokens: int) -> str:
    """About n_tokens tokens of held-out text (the demo revisions without ../shared/data), cut at a token
    boundary."""
    try:
        pieces = heldout_texts()
    except FileNotFoundError:
        pieces = [t for _, t in demo_revisions()]
    text = "\n\n".join(pieces)
    while True:
        _, offsets = tokenizer.encode_with_offsets(text)
        if len(offsets) >= n_tokens:
            return text[:offsets[n_tokens - 1][1]]
        text = text + "\n\n" + "\n\n".join(pieces)


def keystrokes(text: str, count: int) -> list[tuple[int, int, str]]:
    """(start, end, new) code-point edits: PHRASE typed then backspaced at cursor spots spread over the text."""
    per_spot = 2 * len(PHRASE)
    spots = -(-count // per_spot)
    out = []
    for k in range(spots):
        cur = text.rfind(" ", 0, (2 * k + 1) * len(text) // (2 * spots)) + 1
        out += [(cur + i, cur + i, ch) for i, ch in enumerate(PHRASE)]
        out += [(cur + i - 1, cur + i, "") for i in range(len(PHRASE), 0, -1)]
    return out[:count]


def utf16_position(text: str, offset: int) -> types.Position:
    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    return types.Position(line, len(text[start:offset].encode("utf-16-le")) // 2)


async def replay(args: argparse.Namespace, text: str, edits: list[tuple[int, int, str]], dense: bool) -> dict:
    client = LanguageClient("lsp-latency", "1")
    published: dict[int, float] = {}

    @client.feature(types.TEXT_DOCUMENT_PUBLISH_DIAGNOSTICS)
    def on_diagnostics(ls: LanguageClient, params: types.PublishDiagnosticsParams) -> None:
        published[params.version] = time.perf_counter()

    server = ["-m", "vqt", "lsp", "--dtype", args.dtype, "--log", str(args.log)] + (["--dense"] if dense else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    await client.start_io(sys.executable, *server, *(["--model", args.model] if args.model else []), env=env)
    await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities()))
    client.initialized(types.InitializedParams())
    client.text_document_did_open(types.DidOpenTextDocumentParams(types.TextDocumentItem(URI, "plaintext", 1, text)))
    doc_id = types.TextDocumentIdentifier(URI)
    published_ms, completion_ms, ratios = [], [], []
    for version, (s, e, new) in enumerate(edits, start=2):
        rng = types.Range(utf16_position(text, s), utf16_position(text, e))
        text = text[:s] + new + text[e:]
        cursor = utf16_position(text, s + len(new))
        t0 = time.perf_counter()
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(version, URI), [types.TextDocumentContentChangePartial(rng, new)]))
        await client.text_document_completion_async(types.CompletionParams(doc_id, cursor))
        t1 = time.perf_counter()
        if version - 2 >= args.warmup:
            published_ms.append((published[version] - t0) * 1e3)
            completion_ms.append((t1 - t0) * 1e3)
            if not dense:
                hover = await client.text_document_hover_async(types.HoverParams(doc_id, cursor))
                ratios.append(float(re.search(r"\(([\d.]+)x fewer\)", hover.contents.value).group(1)))
    info = await client.workspace_execute_command_async(types.ExecuteCommandParams("vqt.inspect", [URI, True]))
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return {"published": published_ms, "completion": completion_ms, "ratios": ratios, "tokens": len(info["tokens"])}


def open_document(model, tok: Tokenizer, text: str):
    """A TextDocument of ``text`` as `vqt lsp` holds one: its surprisals computed, and everything loaded so far
    frozen, as the server freezes what it loaded (no full collection walks it inside a keystroke)."""
    from vqt.engine.options import DocumentOptions
    from vqt.ops import get_backend
    from vqt.text.document import TextDocument

    doc = TextDocument(model, tok, text, DocumentOptions(backend=get_backend("auto", model.device).name))
    doc.surprisal()
    gc.collect()
    gc.freeze()
    return doc


def type_into(doc, edits: list[tuple[int, int, str]]):
    """Applies each (start, end, new) code-point edit to ``doc`` as an LSP change (versions 2, 3, ...), then
    the surprisal, as the server does before it publishes; yields (change ms, surprisal ms) per keystroke."""
    from vqt.text.changes import LineIndex

    for version, (s, e, new) in enumerate(edits, start=2):
        change = {"range": LineIndex(doc.text).lsp_range(s, e, "utf-16"), "text": new}
        t0 = time.perf_counter()
        doc.apply_changes([change], version)
        t1 = time.perf_counter()
        doc.surprisal()
        yield (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3


def in_process(args: argparse.Namespace, model, tok: Tokenizer, text: str, edits: list[tuple[int, int, str]]) -> dict:
    """The keystrokes applied to a TextDocument here (change + surprisal, timed), then the dense check."""
    import torch

    from vqt.histories.replay import dense_check

    torch.set_num_threads(args.threads)
    doc = open_document(model, tok, text)
    times = [change + surprisal for change, surprisal in type_into(doc, edits)][args.warmup:]
    with torch.no_grad():
        ok, differ, diff = dense_check(model, doc)
    return {"published": times, "tokens": len(doc.doc), "ok": ok, "codes_differ": differ, "hidden_diff": diff}


def machine_speed(threads: int) -> tuple[float, float]:
    """(GFLOP/s of a 512 x 512 float64 matrix product, GB/s of copying 256 MB) on ``threads`` threads, medians:
    fixed work timed beside the latencies, since a shared machine's speed moves by tens of percent within
    minutes (the memory-bound copy follows the dense forward's swings better than the product)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(512, 512, dtype=torch.float64)
    src, dst = torch.ones(1 << 26), torch.empty(1 << 26)

    def timed(fn, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return 2 * 512 ** 3 / timed(lambda: a @ a, 15) / 1e9, 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), 5) / 1e9


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory or 'demo' (default: the server's default)")
    p.add_argument("--dtype", choices=["auto", "float32", "float64", "bf16"], default="auto",
                   help="the servers' --dtype (auto: bf16 products where the CPU has native bfloat16)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1000],
                   help="document lengths in tokens (at most the model's max_len)")
    p.add_argument("--keystrokes", type=int, default=120)
    p.add_argument("--dense-keystrokes", type=int, default=None,
                   help="keystrokes replayed against --dense (default: --keystrokes; fewer for a real model)")
    p.add_argument("--warmup", type=int, default=5, help="first keystrokes not timed")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (1 keeps many small ops "
                   "from waiting on OpenMP barriers when the CPU is shared)")
    p.add_argument("--in-process", action="store_true",
                   help="also apply the keystrokes to a TextDocument in this process (no server) and check the "
                        "final state against a dense forward")
    p.add_argument("--spots", choices=["shared", "own"], default="shared",
                   help="shared: type at the same spots (spread over the shortest document) at every length; own: "
                        "spread each length's spots over its own document")
    p.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "vqt-lsp-latency.log"),
                   help="the servers' log file")
    args = p.parse_args()

    tok = model_tokenizer(args.model)
    print(f"{'tokens':>7} {'server':<12} {'keys':>5} {'didChange -> diagnostics':>32} {'didChange -> completion':>32}"
          f"  MAC ratio")
    print(f"{'':>7} {'':<12} {'':>5} {'p50 ms':>10} {'p95':>10} {'max':>10} {'p50 ms':>10} {'p95':>10} {'max':>10}"
          f"  median")
    speed = [machine_speed(args.threads)]
    local = None  # the model loaded here for --in-process
    texts = {n: document(tok, n) for n in args.tokens}
    shortest = texts[min(args.tokens)]
    for n in args.tokens:
        text = texts[n]
        assert text.startswith(shortest), "the documents of several lengths are prefixes of one text"
        spots_in = shortest if args.spots == "shared" else text
        for dense in (False, True):
            count = args.dense_keystrokes if dense and args.dense_keystrokes is not None else args.keystrokes
            edits = keystrokes(spots_in, count + args.warmup)
            r = asyncio.run(replay(args, text, edits, dense))
            ratio = f"{statistics.median(r['ratios']):.1f}x" if r["ratios"] else "1.0x"
            pub, com = r["published"], r["completion"]
            print(f"{r['tokens']:>7} {'dense' if dense else 'incremental':<12} {len(pub):>5} {pct(pub, .5):>10.1f} "
                  f"{pct(pub, .95):>10.1f} {max(pub):>10.1f} {pct(com, .5):>10.1f} {pct(com, .95):>10.1f} "
                  f"{max(com):>10.1f}  {ratio}", flush=True)
        if args.in_process:
            if local is None:
                from vqt.apps.loading import load_model
                local = load_model(args.model, args.dtype)
            r = in_process(args, local[0], local[2], text, keystrokes(spots_in, args.keystrokes + args.warmup))
            pub = r["published"]
            print(f"{r['tokens']:>7} {'in-process':<12} {len(pub):>5} {pct(pub, .5):>10.1f} {pct(pub, .95):>10.1f} "
                  f"{max(pub):>10.1f} {'-':>10} {'-':>10} {'-':>10}  (change + surprisal; then the dense forward: "
                  f"codes {'identical' if not r['codes_differ'] else str(r['codes_differ']) + ' differ'}, hidden "
                  f"states max |diff| {r['hidden_diff']:.2g}: {'within' if r['ok'] else 'OUTSIDE'} the contract)",
                  flush=True)
    speed.append(machine_speed(args.threads))
    print(f"({args.warmup} warm-up keystrokes per run not timed; spots {args.spots}; {args.dtype}, {args.threads} thread(s) per server; "
          f"this machine before / after: {speed[0][0]:.0f} / {speed[1][0]:.0f} GFLOP/s on a float64 GEMM, "
          f"{speed[0][1]:.0f} / {speed[1][1]:.0f} GB/s copying 256 MB)")


if __name__ == "__main__":
    main()
