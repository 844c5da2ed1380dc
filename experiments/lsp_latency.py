"""Typing latency of `vqt lsp`: didChange -> published result, incremental server vs the dense baseline.

    python experiments/lsp_latency.py                      # default model (shipped, else the demo model)
    python experiments/lsp_latency.py --model DIR --keystrokes 200

Replays typing into a document of about --tokens tokens: at cursor spots spread over the
text, a phrase with an accented letter and an emoji is typed one character per didChange,
then deleted with backspace, one character per didChange. For every keystroke it times, from sending the
didChange, (a) the publishDiagnostics for that version and (b) the completion at the cursor,
requested right after the change. The same keystrokes are replayed against `vqt lsp --dense`,
which recomputes the whole document after each change. Both servers run one after the other
on this machine with pygls' LanguageClient; timings are wall-clock and noisy on a shared CPU.
"""

from __future__ import annotations

import argparse
import asyncio
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
from vqt.text.tokenizer import Tokenizer  # noqa: E402

PHRASE = "a new café 😀 "
URI = "file:///typing.txt"


def document(tokenizer: Tokenizer, n_tokens: int) -> str:
    """About n_tokens tokens of the demo revisions, cut at a token boundary."""
    text = "\n\n".join(t for _, t in demo_revisions())
    _, offsets = tokenizer.encode_with_offsets(text)
    return text[:offsets[min(n_tokens, len(offsets)) - 1][1]]


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


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory or 'demo' (default: the server's default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--tokens", type=int, default=1000, help="document length in tokens (at most the model's max_len)")
    p.add_argument("--keystrokes", type=int, default=120)
    p.add_argument("--warmup", type=int, default=5, help="first keystrokes not timed")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server (1 keeps many small ops "
                   "from waiting on OpenMP barriers when the CPU is shared)")
    p.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "vqt-lsp-latency.log"),
                   help="the servers' log file")
    args = p.parse_args()

    text = document(Tokenizer.default(), args.tokens)
    edits = keystrokes(text, args.keystrokes)
    print(f"{len(edits)} keystrokes ({args.warmup} warm-up) into a document of {len(Tokenizer.default().encode(text))} "
          f"tokens, {args.dtype}, {args.threads} thread(s) per server")
    print(f"{'server':<12} {'didChange -> diagnostics':>26} {'didChange -> completion':>26}  MAC ratio")
    print(f"{'':<12} {'p50 ms':>12} {'p95 ms':>13} {'p50 ms':>12} {'p95 ms':>13}  median")
    for dense in (False, True):
        r = asyncio.run(replay(args, text, edits, dense))
        ratio = f"{statistics.median(r['ratios']):.1f}x" if r["ratios"] else "1.0x"
        name = "dense" if dense else "incremental"
        print(f"{name:<12} {pct(r['published'], .5):>12.1f} {pct(r['published'], .95):>13.1f} "
              f"{pct(r['completion'], .5):>12.1f} {pct(r['completion'], .95):>13.1f}  {ratio}")


if __name__ == "__main__":
    main()
